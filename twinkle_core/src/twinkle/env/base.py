"""The Environment: what a multi-turn agent acts in (``reset(task)``, ``step(action)``).

An environment is a small state machine the rollout loop (:func:`twinkle.env.run_episodes`) drives:

* ``reset(task) -> Trajectory``: the start of the conversation (``{"messages": [...], "tools"?:
  [...]}``) for one task (a dict: the prompt's ``user_data``, a row of a dataset ...).
* ``step(action) -> StepResult``: the model's turn (its text, the assistant message's content)
  goes in; the environment answers with new messages (tool results, a user's follow-up), the
  turn's reward, and whether the episode is over (then ``final_reward`` scores the outcome).

Environments only see text; the rollout loop keeps the tokens (token in, token out: what the
model sampled is trained exactly as sampled, and the environment's messages are tokenized once,
with the loss masked off them). One environment object runs one episode at a time; the loop
makes one per episode (``make_env()``).

Example::

    class Guess(Environment):
        def reset(self, task):
            self.answer = task["answer"]
            return {"messages": [{"role": "user", "content": "Guess a digit."}]}

        def step(self, action):
            if action.strip() == self.answer:
                return StepResult(done=True, final_reward=1.0)
            return StepResult([{"role": "user", "content": "No, again."}], reward=-0.1)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass
class StepResult:
    """What an environment returns for one model turn.

    Attributes:
        messages: new messages for the model (``{"role": "tool" | "user", "content": ...}``);
            ignored when ``done``.
        reward: this turn's reward (per-turn shaping: a well-formed tool call, a penalty ...).
        done: the episode is over.
        final_reward: the outcome's reward (when ``done``), added to the turn rewards.
        info: anything to log (tool errors, the parsed calls ...).
    """

    messages: list[dict[str, Any]] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    final_reward: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


class Environment:
    """Base of environments (kind ``environment``): ``reset(task)`` then ``step(action)`` until done.

    Subclasses implement :meth:`reset` and :meth:`step`. ``max_turns`` bounds an episode: the rollout
    loop ends it (truncated, no final reward) after that many model turns.
    """

    #: Most model turns per episode.
    max_turns: int = 8

    def reset(self, task: Mapping[str, Any]) -> dict[str, Any]:
        """Start an episode for ``task``; returns the opening Trajectory (``{"messages": [...]}``)."""
        raise TypeError(f"{type(self).__name__} must implement Environment.reset")

    def step(self, action: str) -> StepResult:
        """Take the model's turn (the assistant message's text); returns the environment's answer."""
        raise TypeError(f"{type(self).__name__} must implement Environment.step")
