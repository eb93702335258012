"""Helpers shared by the model tests (imported by module name; pytest puts this folder on sys.path)."""

from __future__ import annotations


def make_rows(n: int, seed: int = 0, min_len: int = 6, max_len: int = 24, vocab: int = 3000) -> list[dict]:
    """Encoded rows with varying lengths and a prompt part masked with -100."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randint(3, vocab - 1) for _ in range(length)]
        prompt = rng.randint(1, length - 2)
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "length": length})
    return rows
