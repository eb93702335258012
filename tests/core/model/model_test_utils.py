"""Helpers shared by the model tests (imported by module name; pytest puts this folder on sys.path)."""

from __future__ import annotations

from twinkle.testing import random_token_rows


def make_rows(n: int, seed: int = 0, min_len: int = 6, max_len: int = 24, vocab: int = 3000) -> list[dict]:
    """Encoded rows with varying lengths, a prompt part masked with -100 and their ``length`` (ids from 3 up)."""
    return random_token_rows(n, seed, vocab=vocab, min_len=min_len, max_len=max_len, first_id=3, with_length=True)
