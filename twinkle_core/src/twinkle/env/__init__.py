"""Multi-turn agents: environments (kind ``environment``), tool calls, token-in-token-out episodes.

* :class:`Environment` (``reset(task) -> Trajectory``, ``step(action) -> StepResult``): the base
  of the ``environment`` kind; plugins register more (``register("environment", name, target)``).
* :class:`ToolEnvironment`: the model calls tools (parsed per chat format) until it answers;
  per-turn rewards for its calls, a final reward for its answer. :class:`SandboxedPythonTool` runs
  code the model writes in twinkle-rewards' sandbox.
* :func:`run_episodes`: batched multi-turn rollouts with a sampler; each :class:`Episode` is one
  token sequence with the loss mask on the model's tokens only (``episode.row(advantages=a)``).
* Tool-call parsers for the shipped chat formats: :class:`HermesToolCallParser` (Qwen / ChatML),
  :class:`InternLM2ToolCallParser`, :class:`GLMToolCallParser` (ChatGLM3, GLM-4);
  :func:`tool_call_parser_for` picks a template's.

See ``docs/rl.md`` (multi-turn agents) and ``examples/agent_tools.py``.
"""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {
    "environment": {
        "ToolEnvironment": "twinkle.env.tools:ToolEnvironment",
    },
}

_EXPORTS = {
    "StepResult": "twinkle.env.base:StepResult",
    "SandboxedPythonTool": "twinkle.env.tools:SandboxedPythonTool",
    "Episode": "twinkle.env.episode:Episode",
    "run_episodes": "twinkle.env.episode:run_episodes",
    "ToolCall": "twinkle.env.tool_calls:ToolCall",
    "ParsedTurn": "twinkle.env.tool_calls:ParsedTurn",
    "ToolCallParser": "twinkle.env.tool_calls:ToolCallParser",
    "HermesToolCallParser": "twinkle.env.tool_calls:HermesToolCallParser",
    "InternLM2ToolCallParser": "twinkle.env.tool_calls:InternLM2ToolCallParser",
    "GLMToolCallParser": "twinkle.env.tool_calls:GLMToolCallParser",
    "tool_call_parser_for": "twinkle.env.tool_calls:tool_call_parser_for",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.env.base import Environment as Environment
    from twinkle.env.base import StepResult as StepResult
    from twinkle.env.episode import Episode as Episode
    from twinkle.env.episode import run_episodes as run_episodes
    from twinkle.env.tool_calls import GLMToolCallParser as GLMToolCallParser
    from twinkle.env.tool_calls import HermesToolCallParser as HermesToolCallParser
    from twinkle.env.tool_calls import InternLM2ToolCallParser as InternLM2ToolCallParser
    from twinkle.env.tool_calls import ParsedTurn as ParsedTurn
    from twinkle.env.tool_calls import ToolCall as ToolCall
    from twinkle.env.tool_calls import ToolCallParser as ToolCallParser
    from twinkle.env.tool_calls import tool_call_parser_for as tool_call_parser_for
    from twinkle.env.tools import SandboxedPythonTool as SandboxedPythonTool
    from twinkle.env.tools import ToolEnvironment as ToolEnvironment
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__, _EXPORTS)
