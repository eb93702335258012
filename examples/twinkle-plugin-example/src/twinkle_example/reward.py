"""KeywordReward: does the completion mention every required keyword?"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from twinkle.reward import Reward


class KeywordReward(Reward):
    """1.0 when the completion contains every keyword (case-insensitive), else 0.0.

    Keywords come from the constructor or, per trajectory, from ``user_data['keywords']``.

    Example::

        KeywordReward(["twinkle"])([{"messages": [{"role": "assistant", "content": "I am Twinkle"}]}])  # [1.0]
    """

    def __init__(self, keywords: Sequence[str] = ()) -> None:
        self.keywords = [k.lower() for k in keywords]

    def score(self, completion: str, trajectory: Mapping[str, Any], **kwargs: Any) -> float:
        keywords = self.keywords or [k.lower() for k in (trajectory.get("user_data") or {}).get("keywords", [])]
        if not keywords:
            raise ValueError("KeywordReward needs keywords: pass KeywordReward([...]) or set user_data['keywords']")
        text = completion.lower()
        return float(all(k in text for k in keywords))
