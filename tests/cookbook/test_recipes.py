"""tinker-cookbook 0.6.1's recipes, as shipped, against `twinkle serve` on the bundled tiny model.

Each recipe runs a few steps with its own defaults (losses, checkpoint TTLs, evaluators) and only
the model name, renderer, data paths and sizes (batch, steps, lengths) set; the conftest says how
those are pointed at the local server. A test passes when the recipe finishes and its log/checkpoint
outputs show the steps ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import MODEL, RENDERER, chat_jsonl

pytestmark = pytest.mark.timeout(600)


def _metrics(log_path: Path) -> list[dict]:
    path = Path(log_path) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _checkpoints(log_path: Path) -> list[dict]:
    path = Path(log_path) / "checkpoints.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_sl_loop(serve, tmp_path) -> None:
    from tinker_cookbook.recipes import sl_loop

    log = tmp_path / "sl-loop"
    config = sl_loop.Config(
        base_url=serve["url"], log_path=str(log), model_name=MODEL, batch_size=8, max_length=128,
        lora_rank=4, save_every=2, max_steps=3,
    )  # fmt: skip
    sl_loop.main(config)
    steps = _metrics(log)
    assert len(steps) == 3
    assert all(m["train_mean_nll"] > 0 for m in steps)
    names = [c["name"] for c in _checkpoints(log)]
    assert "000002" in names and "final" in names


def test_chat_sl_with_rolling_saves(serve, tmp_path) -> None:
    from tinker_cookbook.recipes.chat_sl import train

    log = tmp_path / "chat-sl"
    config = train.CLIConfig(
        base_url=serve["url"], log_path=str(log), model_name=MODEL, renderer_name=RENDERER,
        dataset=str(chat_jsonl(tmp_path / "chats.jsonl")), batch_size=8, max_length=128, lora_rank=4,
        save_every=0, eval_every=2, rolling_save_every=2, max_steps=4, behavior_if_log_dir_exists="delete",
    )  # fmt: skip
    train.cli_main(config)
    assert len(_metrics(log)) == 4
    saved = {c["name"]: c for c in _checkpoints(log)}
    assert saved["000002"]["rolling"] and "final" in saved  # the rolling save (TTL 7200 s), deleted at the end
