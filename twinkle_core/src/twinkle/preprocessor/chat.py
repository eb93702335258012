"""Chat preprocessors: self-cognition, Alpaca, and ShareGPT / OpenAI messages."""

from __future__ import annotations

import json
from typing import Any

from twinkle.data_format.messages import ROLES
from twinkle.preprocessor.base import BadRowError, Preprocessor

DEFAULT_SYSTEM = "You are a helpful assistant."


def _pick(value: str | tuple[str, str], tag: Any) -> str:
    """A (Chinese, English) pair picks by the row's language tag; a string is used as is."""
    if isinstance(value, (tuple, list)):
        zh, en = value
        return en if tag == "en" else zh
    return value


class SelfCognitionProcessor(Preprocessor):
    """Self-cognition rows (``query``, ``response``, optional ``tag``) -> a system/user/assistant chat.

    ``{{NAME}}`` and ``{{AUTHOR}}`` in the query and response become ``name`` and
    ``author``, as in the public ``swift/self-cognition`` data set.

    Args:
        name: the model's name, or a ``(chinese, english)`` pair chosen by the row's ``tag``.
        author: who made it, same forms as ``name``.
        system: the system prompt; ``None`` leaves it to the Template.
        on_bad_row: see :class:`Preprocessor`.

    Example::

        dataset.map(SelfCognitionProcessor("twinkle大模型", "ModelScope社区"))
    """

    def __init__(
        self,
        name: str | tuple[str, str],
        author: str | tuple[str, str],
        system: str | None = DEFAULT_SYSTEM,
        on_bad_row: str = "raise",
    ) -> None:
        super().__init__(on_bad_row)
        for label, value in (("name", name), ("author", author)):
            ok = isinstance(value, str) or (
                isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, str) for v in value)
            )
            if not ok or not value:
                raise ValueError(f"SelfCognitionProcessor: {label} must be a string or a (chinese, english) pair")
        self.name = name
        self.author = author
        self.system = system

    def preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        query = self.text(row, "query")
        response = self.text(row, "response")
        tag = row.get("tag")
        name, author = _pick(self.name, tag), _pick(self.author, tag)
        query = query.replace("{{NAME}}", name).replace("{{AUTHOR}}", author)
        response = response.replace("{{NAME}}", name).replace("{{AUTHOR}}", author)
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        return {"messages": messages}

    def __repr__(self) -> str:
        return f"SelfCognitionProcessor(name={self.name!r}, author={self.author!r})"


class AlpacaProcessor(Preprocessor):
    """Alpaca rows (``instruction``, optional ``input``, ``output``, optional ``system``) -> a chat.

    The user turn is the instruction, followed by the input on a new line when there is one.

    Args:
        system: a system prompt for rows without a ``system`` column; ``None``: none.
        on_bad_row: see :class:`Preprocessor`.

    Example::

        dataset.map("AlpacaProcessor")
    """

    def __init__(self, system: str | None = None, on_bad_row: str = "raise") -> None:
        super().__init__(on_bad_row)
        self.system = system

    def preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        instruction = self.text(row, "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise BadRowError("input", f"expected text, got {type(extra).__name__}")
        output = self.text(row, "output")
        system = row.get("system") or self.system
        user = f"{instruction}\n{extra}" if extra.strip() else instruction
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return {"messages": messages}


#: ShareGPT speaker names -> roles.
SHAREGPT_ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}


class MessagesProcessor(Preprocessor):
    """Chat rows already holding a conversation -> a Trajectory.

    Accepts OpenAI-style ``messages`` (``[{'role', 'content', ...}]``) or ShareGPT
    ``conversations`` (``[{'from': 'human'|'gpt'|'system'|'observation', 'value'}]``), an
    optional ``system`` column and an optional ``tools`` column (a list or its JSON
    text). Other columns are dropped. Rows are checked: known roles, text content, and
    (``require_assistant=True``) at least one assistant turn.

    Args:
        require_assistant: a row without an assistant message is a bad row.
        on_bad_row: see :class:`Preprocessor`.

    Example::

        dataset.map("MessagesProcessor")
    """

    def __init__(self, require_assistant: bool = True, on_bad_row: str = "raise") -> None:
        super().__init__(on_bad_row)
        self.require_assistant = require_assistant

    def preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("messages") is not None:
            field, raw = "messages", row["messages"]
        elif row.get("conversations") is not None:
            field, raw = "conversations", row["conversations"]
        else:
            raise BadRowError(
                "messages",
                f"missing (nor 'conversations'); the row has columns {sorted(row)}",
                fix="rename the conversation column to 'messages' or 'conversations'",
            )
        if not isinstance(raw, list) or not raw:
            raise BadRowError(field, f"expected a non-empty list of messages, got {raw!r:.60}")
        messages = [self._message(field, j, m) for j, m in enumerate(raw)]
        system = row.get("system")
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        if self.require_assistant and not any(m["role"] == "assistant" for m in messages):
            raise BadRowError(
                field,
                "has no assistant message, so nothing would be trained",
                fix="pass MessagesProcessor(require_assistant=False) for prompt-only data",
            )
        trajectory: dict[str, Any] = {"messages": messages}
        tools = row.get("tools")
        if tools:
            if isinstance(tools, str):
                try:
                    json.loads(tools)
                except json.JSONDecodeError as exc:
                    raise BadRowError("tools", f"is not valid JSON ({exc})") from None
            else:
                tools = json.dumps(tools, ensure_ascii=False)
            trajectory["tools"] = tools
        return trajectory

    @staticmethod
    def _message(field: str, j: int, message: Any) -> dict[str, Any]:
        if not isinstance(message, dict):
            raise BadRowError(f"{field}[{j}]", f"expected a dict, got {type(message).__name__}")
        if "role" in message:
            role, content = message.get("role"), message.get("content")
        elif "from" in message:
            speaker = message.get("from")
            role = SHAREGPT_ROLES.get(str(speaker).lower())
            if role is None:
                raise BadRowError(
                    f"{field}[{j}].from", f"unknown speaker {speaker!r}; known: {', '.join(SHAREGPT_ROLES)}"
                )
            content = message.get("value")
        else:
            raise BadRowError(
                f"{field}[{j}]", f"needs 'role' and 'content' (or 'from' and 'value'), got {sorted(message)}"
            )
        if role not in ROLES:
            raise BadRowError(f"{field}[{j}].role", f"{role!r} is not one of {', '.join(ROLES)}")
        out: dict[str, Any] = {"role": role, "content": content}
        tool_calls = message.get("tool_calls")
        if content is None and not (role == "assistant" and tool_calls):
            raise BadRowError(f"{field}[{j}].content", "is missing")
        if content is not None and not isinstance(content, str):
            raise BadRowError(f"{field}[{j}].content", f"expected text, got {type(content).__name__}")
        if tool_calls:
            out["tool_calls"] = [_normalize_call(field, j, c) for c in tool_calls]
        for key in ("reasoning_content", "tool_call_id", "name"):
            if message.get(key) is not None:
                out[key] = message[key]
        return out


def _normalize_call(field: str, j: int, call: Any) -> dict[str, Any]:
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRowError(f"{field}[{j}].tool_calls", f"each call needs a function name, got {call!r:.80}")
    arguments = function.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
