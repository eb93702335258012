"""The Reward protocol: one call signature for every reward.

``reward(trajectories, **kwargs) -> list[float]``: one float per trajectory, in order.
A trajectory is ``{"messages": [...], "user_data": {...}}``; the sampled completion is
the content of the **last assistant message** and the ground truth (when a reward needs
one) lives in ``user_data`` (e.g. ``user_data["answer"]``). Extra keyword arguments are
reward-specific and optional.

A reward may be a subclass of :class:`Reward` (override :meth:`Reward.score`, or
``__call__`` for batch scoring) or a plain function with the same signature. Use
:func:`completion_text` and :func:`ground_truth` to read trajectories, and
:func:`check_rewards` to validate what a reward returned.

Example::

    class ExactMatch(Reward):
        def score(self, completion, trajectory, **kwargs):
            return float(completion.strip() == ground_truth(trajectory, "answer", self))

    ExactMatch()([{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}],
                   "user_data": {"answer": "2"}}])  # -> [1.0]
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence


class RewardInputError(ValueError):
    """A trajectory given to a reward is malformed or lacks the ground truth the reward needs."""


class Reward:
    """Base of rewards: ``reward(trajectories, **kwargs) -> list[float]``.

    Subclasses implement :meth:`score` (one trajectory) or override ``__call__`` (a batch).
    ``__call__`` validates the input list and the output (one finite float per trajectory).
    """

    #: Short name used in metrics (defaults to the class name).
    name: str = ""

    def __call__(self, trajectories: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[float]:
        """Score ``trajectories``; returns one float per trajectory.

        Raises:
            RewardInputError: not a list of trajectories, no assistant message, or missing ground truth.
        """
        check_trajectories(trajectories, self)
        rewards = [float(self.score(completion_text(t, self), t, **kwargs)) for t in trajectories]
        return check_rewards(rewards, len(trajectories), self)

    def score(self, completion: str, trajectory: Mapping[str, Any], **kwargs: Any) -> float:
        """Score one completion (the last assistant message's text) of ``trajectory``."""
        raise TypeError(f"{type(self).__name__} must implement Reward.score or Reward.__call__")


def _label(reward: Any) -> str:
    if reward is None:
        return "reward"
    return getattr(reward, "name", "") or getattr(reward, "__name__", "") or type(reward).__name__


def check_trajectories(trajectories: Any, reward: Any = None) -> None:
    """Raise :class:`RewardInputError` unless ``trajectories`` is a list of dicts with ``messages``."""
    if isinstance(trajectories, Mapping) or not isinstance(trajectories, Sequence) or isinstance(trajectories, str):
        raise RewardInputError(
            f"{_label(reward)} takes a list of trajectories, got {type(trajectories).__name__}; "
            "wrap a single trajectory in a list: reward([trajectory])"
        )
    for i, t in enumerate(trajectories):
        if not isinstance(t, Mapping) or not isinstance(t.get("messages"), list):
            raise RewardInputError(
                f"{_label(reward)}: trajectory {i} must be a dict with a 'messages' list, got {type(t).__name__} "
                f"{str(t)[:80]!r}"
            )


def completion_text(trajectory: Mapping[str, Any], reward: Any = None) -> str:
    """The text of the last assistant message (the sampled completion).

    Raises:
        RewardInputError: the trajectory has no assistant message.
    """
    for message in reversed(trajectory.get("messages") or []):
        if isinstance(message, Mapping) and message.get("role") == "assistant":
            content = message.get("content")
            if content is None:
                return ""
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # multimodal parts: keep the text parts
                return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
            return str(content)
    raise RewardInputError(
        f"{_label(reward)}: the trajectory has no assistant message; the sampled completion must be "
        "the last message with role 'assistant' (SampledSequence.trajectory has it)"
    )


def ground_truth(trajectory: Mapping[str, Any], key: str, reward: Any = None) -> Any:
    """``trajectory["user_data"][key]``, or a clear error when it is missing or empty.

    Raises:
        RewardInputError: no ``user_data`` or no non-empty ``key`` in it.
    """
    user_data = trajectory.get("user_data") or {}
    value = user_data.get(key) if isinstance(user_data, Mapping) else None
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RewardInputError(
            f"{_label(reward)} needs the ground truth in trajectory['user_data'][{key!r}], "
            f"but user_data is {dict(user_data) if isinstance(user_data, Mapping) else user_data!r}; "
            f"set user_data[{key!r}] in your preprocessor"
        )
    return value


def check_rewards(rewards: Any, expected: int, reward: Any = None) -> list[float]:
    """Validate a reward's output: a list of ``expected`` finite floats.

    Raises:
        ValueError: wrong type, wrong length, or a non-finite value.
    """
    if not isinstance(rewards, (list, tuple)):
        raise ValueError(f"{_label(reward)} returned {type(rewards).__name__}; a reward must return a list of floats")
    if len(rewards) != expected:
        raise ValueError(f"{_label(reward)} returned {len(rewards)} rewards for {expected} trajectories")
    out = []
    for i, r in enumerate(rewards):
        try:
            value = float(r)
        except (TypeError, ValueError):
            raise ValueError(f"{_label(reward)} returned a non-number {r!r} at position {i}") from None
        if not math.isfinite(value):
            raise ValueError(f"{_label(reward)} returned a non-finite reward {value} at position {i}")
        out.append(value)
    return out


def call_reward(reward: Any, trajectories: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[float]:
    """Call any reward (a :class:`Reward` or a plain function) and validate what it returns."""
    check_trajectories(trajectories, reward)
    return check_rewards(reward(list(trajectories), **kwargs), len(trajectories), reward)
