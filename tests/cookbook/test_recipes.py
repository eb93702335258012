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


def test_rl_loop_with_its_default_loss(serve, tmp_path) -> None:
    from tinker_cookbook.recipes import rl_loop

    log = tmp_path / "rl-loop"
    config = rl_loop.Config(
        base_url=serve["url"], log_path=str(log), model_name=MODEL, batch_size=2, group_size=4,
        max_tokens=12, lora_rank=4, save_every=2, max_steps=2,
    )  # fmt: skip
    assert config.loss_fn == "stable_reinforce"
    rl_loop.main(config)
    assert len(_metrics(log)) == 2


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_math_rl(serve, tmp_path, mode) -> None:
    import asyncio

    from tinker_cookbook.recipes.math_rl import train

    log = tmp_path / f"math-rl-{mode}"
    config = train.CLIConfig(
        base_url=serve["url"], log_path=str(log), model_name=MODEL, renderer_name=RENDERER, lora_rank=4,
        env="gsm8k", group_size=2, groups_per_batch=2, max_tokens=12, eval_every=2, save_every=2, max_steps=3,
        behavior_if_log_dir_exists="delete", max_steps_off_policy=2 if mode == "async" else None,
    )  # fmt: skip
    assert config.loss_fn == "stable_reinforce"
    asyncio.run(train.cli_main(config))
    assert len([m for m in _metrics(log) if "env/all/reward/total" in m]) >= 3


def test_dpo_with_evaluation(serve, tmp_path) -> None:
    from tinker_cookbook.preference import train_dpo
    from tinker_cookbook.recipes.preference.dpo.train import get_dataset_builder

    log = tmp_path / "dpo"
    config = train_dpo.Config(
        base_url=serve["url"], log_path=str(log), model_name=MODEL, renderer_name=RENDERER, lora_rank=4,
        dataset_builder=get_dataset_builder("hhh", MODEL, RENDERER, 128, 4), eval_every=2, save_every=0,
        recipe_name="recipe_preference_dpo",
        max_steps=4,
    )  # fmt: skip
    train_dpo.main(config)
    steps = _metrics(log)
    assert len([m for m in steps if "dpo_loss" in m or "loss" in m]) >= 4
    assert any(any(k.startswith("test/") for k in m) for m in steps)  # the evaluator ran (twice)


def test_on_policy_distillation_with_the_base_model_as_teacher(serve, tmp_path) -> None:
    import asyncio

    from tinker_cookbook.recipes.distillation import on_policy_distillation as opd

    log = tmp_path / "opd"
    config = opd.CLIConfig(
        base_url=serve["url"], log_path=str(log), model_name=MODEL, renderer_name=RENDERER, lora_rank=4,
        teacher_model=MODEL, dataset="deepmath", group_size=2, groups_per_batch=2, max_tokens=12,
        eval_every=0, save_every=0, max_steps=2, behavior_if_log_dir_exists="delete",
    )  # fmt: skip
    asyncio.run(opd.cli_main(config))
    steps = _metrics(log)
    assert len(steps) >= 2 and any(any("kl" in k for k in m) for m in steps)


def test_weights_download(serve, tmp_path) -> None:
    """The cookbook's weights.download of a training checkpoint: export (age-encrypted), signed URLs, delete."""
    import tinker
    from tinker_cookbook import weights

    service = tinker.ServiceClient(base_url=serve["url"])
    tc = service.create_lora_training_client(base_model=MODEL, rank=4).result()
    path = tc.save_state("to-download").result().path
    out = weights.download(tinker_path=path, output_dir=str(tmp_path / "adapter"), base_url=serve["url"])
    files = sorted(p.name for p in Path(out).iterdir() if not p.name.startswith("."))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((Path(out) / "adapter_config.json").read_text())["r"] == 4
    service.close(status="success")
