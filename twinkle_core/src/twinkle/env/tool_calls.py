"""Tool calls in the text a model writes, per chat format of the templates Twinkle ships.

* :class:`HermesToolCallParser`: Qwen2/2.5/3 and other ChatML templates (the bundled tiny model):
  ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``, one block per call.
* :class:`InternLM2ToolCallParser`: InternLM2 (``InternLM2Template``):
  ``<|action_start|><|plugin|>\\n{"name": "f", "parameters": {...}}<|action_end|>``.
* :class:`GLMToolCallParser`: ChatGLM3 and GLM-4 (``ChatGLM3Template``, ``GLM4Template``): the
  turn is the tool's name on the first line, then its arguments: a JSON object (GLM-4) or
  ChatGLM3's ``tool_call(a=1, b="x")`` code block.

:func:`tool_call_parser_for` picks the parser of a template. ``parse(text)`` returns a
:class:`ParsedTurn`: the text outside the calls, the calls, and an error for each block that looked
like a call but did not parse (so an environment can give that turn a penalty instead of failing).

Example::

    parser = HermesToolCallParser()
    turn = parser.parse('<tool_call>\\n{"name": "add", "arguments": {"a": 1, "b": 2}}\\n</tool_call>')
    turn.calls  # [ToolCall(name='add', arguments={'a': 1, 'b': 2})]
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    """One call: the tool's name and its keyword arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParsedTurn:
    """A model turn split into its text and its tool calls.

    Attributes:
        content: the text outside the call blocks (stripped).
        calls: the calls that parsed, in order.
        errors: why each malformed call block did not parse.
    """

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _call_from_json(text: str, arguments_key: str = "arguments") -> ToolCall:
    """``{"name": ..., "arguments": {...}}`` (arguments may be a JSON string) -> ToolCall; ValueError if not."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} in {text[:80]!r}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise ValueError(f"a tool call needs a 'name' string: {text[:80]!r}")
    arguments = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments are not JSON: {exc.msg} in {arguments[:80]!r}") from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ValueError(f"arguments must be an object, got {type(arguments).__name__}")
    return ToolCall(obj["name"], arguments)


class ToolCallParser:
    """Base: ``parse(text) -> ParsedTurn``."""

    #: The format's name (``hermes``, ``internlm2``, ``glm``).
    name: str = ""

    def parse(self, text: str) -> ParsedTurn:
        """Split ``text`` into content and tool calls."""
        raise NotImplementedError


class _BlockParser(ToolCallParser):
    """Calls are JSON objects between an opening and a closing marker."""

    start: str = ""
    end: str = ""
    arguments_key: str = "arguments"

    def parse(self, text: str) -> ParsedTurn:
        pattern = re.compile(re.escape(self.start) + r"(.*?)(?:" + re.escape(self.end) + r"|$)", re.DOTALL)
        calls: list[ToolCall] = []
        errors: list[str] = []
        for match in pattern.finditer(text):
            body = match.group(1).strip()
            if not match.group(0).endswith(self.end):
                errors.append(f"a call block without its closing {self.end}")
                continue
            try:
                calls.append(_call_from_json(body, self.arguments_key))
            except ValueError as exc:
                errors.append(str(exc))
        content = pattern.sub("", text).strip()
        return ParsedTurn(content, calls, errors)


class HermesToolCallParser(_BlockParser):
    """Qwen / ChatML (Hermes) calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""

    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"


class InternLM2ToolCallParser(_BlockParser):
    """InternLM2 calls: ``<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>``."""

    name = "internlm2"
    start = "<|action_start|><|plugin|>"
    end = "<|action_end|>"
    arguments_key = "parameters"


_IDENTIFIER = re.compile(r"[A-Za-z_][\w.\-]*")
_CODE_BLOCK = re.compile(r"^```(?:python)?\s*\n?(.*?)\n?```\s*$", re.DOTALL)


class GLMToolCallParser(ToolCallParser):
    """ChatGLM3 / GLM-4 calls: the tool's name on the first line, then its arguments.

    GLM-4 writes a JSON object (``get_weather\\n{"city": "Beijing"}``); ChatGLM3 a code block
    (``get_weather\\n```python\\ntool_call(city="Beijing")\\n```"``). A turn whose first line is not
    an identifier followed by arguments is plain content (the final answer).
    """

    name = "glm"

    def parse(self, text: str) -> ParsedTurn:
        stripped = text.strip()
        head, sep, rest = stripped.partition("\n")
        head, rest = head.strip(), rest.strip()
        if not sep or not _IDENTIFIER.fullmatch(head) or not (rest.startswith("{") or rest.startswith("```")):
            return ParsedTurn(stripped)
        try:
            if rest.startswith("{"):
                arguments = json.loads(rest)
                if not isinstance(arguments, dict):
                    raise ValueError("arguments must be a JSON object")
            else:
                arguments = self._chatglm3_arguments(rest)
        except (ValueError, SyntaxError) as exc:
            return ParsedTurn("", errors=[f"{head}: {exc}"])
        return ParsedTurn("", [ToolCall(head, arguments)])

    @staticmethod
    def _chatglm3_arguments(block: str) -> dict[str, Any]:
        match = _CODE_BLOCK.match(block)
        if not match:
            raise ValueError("an unclosed code block")
        tree = ast.parse(match.group(1).strip(), mode="eval")
        call = tree.body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError("expected tool_call(name=value, ...) with keyword arguments")
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg is not None}


PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesToolCallParser,
    "internlm2": InternLM2ToolCallParser,
    "glm": GLMToolCallParser,
}


def tool_call_parser_for(template: Any) -> ToolCallParser:
    """The parser of ``template``'s chat format (a Template object, or a parser name: ``hermes``...).

    ChatGLM3/GLM-4 -> :class:`GLMToolCallParser`, InternLM2 -> :class:`InternLM2ToolCallParser`,
    any other :class:`~twinkle.template.base.Template` (a tokenizer's own chat template: Qwen and the
    ChatML families) -> :class:`HermesToolCallParser`.

    Raises:
        ValueError: an unknown parser name, or ChatGLM2 (its format has no tool role).
    """
    if isinstance(template, str):
        if template not in PARSERS:
            raise ValueError(f"unknown tool-call format {template!r}; one of {', '.join(PARSERS)}")
        return PARSERS[template]()
    names = {cls.__name__ for cls in type(template).__mro__}
    if "ChatGLM2Template" in names:
        raise ValueError("ChatGLM2's chat format has no tool role; use ChatGLM3Template or GLM4Template for tools")
    if names & {"ChatGLM3Template", "GLM4Template"}:
        return GLMToolCallParser()
    if "InternLM2Template" in names:
        return InternLM2ToolCallParser()
    return HermesToolCallParser()
