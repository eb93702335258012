"""ToolEnvironment: the model calls tools until it answers; a sandboxed Python tool for untrusted code.

Each turn the model either calls tools (parsed per chat format, :mod:`twinkle.env.tool_calls`), and
gets one ``tool`` message per call back, or writes no call: that text is its answer and the episode
ends with ``final_reward = answer_reward(answer, task)``. Per-turn rewards: ``call_reward`` for a
turn whose calls all ran, ``error_reward`` for a turn with a malformed call, an unknown tool or a
tool that raised (the error goes back to the model as the tool's result).

Tools are plain callables taking the call's arguments as keywords and returning text (anything
``str()`` turns into text). They run in this process: use them for trusted code (a calculator, a
lookup). Code the *model writes* runs in :class:`SandboxedPythonTool`: the rewards sandbox of
twinkle-rewards (a subprocess with resource limits, no network, no writes outside a temp dir).

Example::

    env = ToolEnvironment(
        tools={"add": lambda a, b: a + b},
        prompt=lambda task: {"messages": [{"role": "user", "content": task["question"]}]},
        answer_reward=lambda answer, task: float(answer.strip() == task["answer"]),
    )
    env.reset({"question": "1+2=", "answer": "3"})
    env.step('<tool_call>\\n{"name": "add", "arguments": {"a": 1, "b": 2}}\\n</tool_call>').messages
    # [{'role': 'tool', 'content': '3', 'name': 'add'}]
    env.step("3").final_reward   # 1.0
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twinkle.env.base import Environment, StepResult
from twinkle.env.tool_calls import ToolCallParser, tool_call_parser_for


class ToolEnvironment(Environment):
    """An agent with tools, per-turn rewards for its calls and a final reward for its answer.

    Args:
        tools: tool name -> callable (keyword arguments from the call -> the result's text).
        prompt: task -> the opening Trajectory (``{"messages": [...]}``); default: ``task["messages"]``.
        answer_reward: ``(answer_text, task) -> float``, the final reward.
        parser: a :class:`ToolCallParser`, a format name (``hermes``, ``internlm2``, ``glm``) or a
            Template (its format); default ``hermes`` (Qwen / ChatML).
        max_turns: most model turns; a model still calling tools then ends with no final reward.
        call_reward: the reward of a turn whose calls all ran.
        error_reward: the reward of a turn with a malformed call, an unknown tool or a failing tool.
        schemas: OpenAI-style function schemas put in the opening Trajectory's ``tools`` (chat
            templates list them in the system prompt); default none.

    Example: see the module docstring.
    """

    def __init__(
        self,
        tools: Mapping[str, Callable[..., Any]],
        answer_reward: Callable[[str, Mapping[str, Any]], float],
        *,
        prompt: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
        parser: ToolCallParser | str | Any = "hermes",
        max_turns: int = 4,
        call_reward: float = 0.0,
        error_reward: float = -0.1,
        schemas: list[dict[str, Any]] | None = None,
    ) -> None:
        if max_turns < 1:
            raise ValueError(f"ToolEnvironment: max_turns must be >= 1, got {max_turns}")
        self.tools = dict(tools)
        self.answer_reward = answer_reward
        self.prompt = prompt
        self.parser = parser if isinstance(parser, ToolCallParser) else tool_call_parser_for(parser)
        self.max_turns = max_turns
        self.call_reward = call_reward
        self.error_reward = error_reward
        self.schemas = schemas
        self.task: Mapping[str, Any] = {}
        self.turns = 0
        self.calls = 0

    def reset(self, task: Mapping[str, Any]) -> dict[str, Any]:
        """Start an episode; returns the opening Trajectory."""
        self.task = task
        self.turns = 0
        self.calls = 0
        opening = dict(self.prompt(task)) if self.prompt is not None else {"messages": list(task["messages"])}
        if self.schemas:
            opening["tools"] = list(self.schemas)
        return opening

    def step(self, action: str) -> StepResult:
        """Run the turn's tool calls, or score its answer when it has none."""
        self.turns += 1
        turn = self.parser.parse(action)
        if not turn.calls and not turn.errors:
            reward = float(self.answer_reward(turn.content, self.task))
            return StepResult(done=True, final_reward=reward, info={"answer": turn.content, "tool_calls": self.calls})
        messages = [{"role": "tool", "content": f"error: {error}"} for error in turn.errors]
        failed = bool(turn.errors)
        for call in turn.calls:
            self.calls += 1
            tool = self.tools.get(call.name)
            if tool is None:
                failed = True
                result = f"error: no tool {call.name!r}; tools: {', '.join(sorted(self.tools))}"
            else:
                try:
                    result = str(tool(**call.arguments))
                except Exception as exc:  # the model's arguments were wrong: it sees the error
                    failed = True
                    result = f"error: {type(exc).__name__}: {exc}"
            messages.append({"role": "tool", "content": result, "name": call.name})
        reward = self.error_reward if failed else self.call_reward
        info = {"tool_calls": self.calls, "errors": turn.errors}
        if self.turns >= self.max_turns:
            return StepResult(messages, reward=reward, done=True, info={**info, "truncated": True})
        return StepResult(messages, reward=reward, info=info)


class SandboxedPythonTool:
    """A ``python`` tool that runs the model's code in twinkle-rewards' sandbox and returns its output.

    The code runs in a fresh subprocess (``twinkle_rewards.sandbox.run_sandboxed``): CPU, memory and
    file-size limits, no sockets, no process creation, no writes outside a temp dir, a wall-clock
    timeout. The result is what it printed (the last ``max_chars``), or the error.

    Args:
        timeout: wall-clock seconds per call.
        memory_mb: the child's address-space limit.
        max_chars: the longest result returned to the model.

    Raises:
        ImportError: twinkle-rewards is not installed (the message says how to install it).

    Example::

        env = ToolEnvironment({"python": SandboxedPythonTool()}, answer_reward=...)
        SandboxedPythonTool()(code="print(6 * 7)")  # '42'
    """

    def __init__(self, timeout: float = 5.0, memory_mb: int = 512, max_chars: int = 2000) -> None:
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.max_chars = max_chars

    def __call__(self, code: str) -> str:
        try:
            from twinkle_rewards.sandbox import run_sandboxed
        except ImportError as exc:
            from twinkle._kinds import install_hint

            raise ImportError(
                f"SandboxedPythonTool runs code in twinkle-rewards' sandbox, which is not installed: "
                f"{install_hint('twinkle-rewards')}"
            ) from exc
        result = run_sandboxed(str(code), [], timeout=self.timeout, memory_mb=self.memory_mb)
        if result.timed_out:
            return f"error: timed out after {self.timeout} s"
        output = result.stdout.strip()
        if result.error:
            output = f"{output}\nerror: {result.error}".strip()
        return output[-self.max_chars :]
