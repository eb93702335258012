"""GPU: MegatronModel on CUDA against TransformersModel, and megatron-core's optimizer path.

Skipped without CUDA. Run on the lent GPU machine by benchmarks/run_megatron_gpu.sh.
Figures are printed (run with -s) so the log carries them.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from conftest import tiny_config

pytestmark = pytest.mark.gpu

TOL = 2e-3


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """fp32 parity needs fp32 matmuls (no TF32) on both backends."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _pair(model_type: str = "qwen2", **kwargs):
    from twinkle.model.transformers_model import TransformersModel
    from twinkle_megatron.model import MegatronModel

    cfg = tiny_config(model_type)
    hf = TransformersModel(config=cfg, device="cuda", attn_implementation="eager", seed=5, **kwargs)
    mg = MegatronModel(config=cfg, device="cuda", seed=5, **kwargs)
    return hf, mg


def _train(model, rows, steps: int, **optim) -> list[float]:
    model.set_optimizer("AdamW", lr=1e-2, **optim)
    model.set_lr_scheduler("CosineWarmupScheduler", num_warmup_steps=1, num_training_steps=steps + 2)
    seen = []
    for step in range(steps):
        seen.append(model.forward_backward(inputs=rows[:2] if step % 2 == 0 else rows[2:]).loss)
        result = model.clip_grad_and_step(max_grad_norm=1.0)
        if result["stepped"]:
            seen.append(result["grad_norm"])
    return seen


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3_moe"])
def test_gpu_logits_and_training_match_transformers(model_type: str, rows) -> None:
    hf, mg = _pair(model_type)
    try:
        a = hf.forward_only(inputs=rows, return_logits=True)
        b = mg.forward_only(inputs=rows, return_logits=True)
        width = a.logits.shape[1]
        valid = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]).bool()
        diff = (a.logits - b.logits)[valid.to(a.logits.device)].abs().max().item()
        print(f"GPU {model_type}: logits max |diff| {diff:.3e}; loss hf={a.loss:.6f} megatron={b.loss:.6f}")
        assert diff < TOL
        assert b.loss == pytest.approx(a.loss, abs=TOL)
        ta, tb = _train(hf, rows, 4, weight_decay=0.0), _train(mg, rows, 4, weight_decay=0.0)
        print(f"GPU {model_type} torch AdamW: hf={ta}\n  megatron={tb}")
        assert tb == pytest.approx(ta, abs=TOL)
    finally:
        mg.close()


def test_gpu_megatron_optimizer_matches_torch_adamw(rows) -> None:
    """megatron-core's optimizer + DDP grad buffers give the numbers of torch AdamW (weight_decay=0)."""
    hf, mg = _pair("qwen2")
    try:
        ta = _train(hf, rows, 4, weight_decay=0.0)
        tb = _train(mg, rows, 4, weight_decay=0.0, use_megatron_optimizer=True)
        print(f"GPU megatron optimizer (full): hf={ta}\n  megatron={tb}")
        assert tb == pytest.approx(ta, abs=TOL)
    finally:
        mg.close()


def test_gpu_megatron_optimizer_lora_with_accumulation(rows) -> None:
    hf, mg = _pair("qwen3")
    try:
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
        for model in (hf, mg):
            model.add_adapter_to_model("default", config, gradient_accumulation_steps=2)
        ta = _train(hf, rows, 6, weight_decay=0.0)
        tb = _train(mg, rows, 6, weight_decay=0.0, use_megatron_optimizer=True)
        print(f"GPU megatron optimizer (LoRA, GA=2): hf={ta}\n  megatron={tb}")
        assert tb == pytest.approx(ta, abs=TOL)
    finally:
        mg.close()


def test_gpu_bf16_megatron_optimizer_trains_and_saves_for_transformers(rows, tmp_path) -> None:
    from transformers import AutoModelForCausalLM
    from twinkle_megatron.model import MegatronModel

    mg = MegatronModel(config=tiny_config("qwen2"), device="cuda", torch_dtype="bfloat16", seed=5)
    try:
        mg.set_optimizer("AdamW", lr=1e-2, use_megatron_optimizer=True)
        losses = [mg.forward_backward(inputs=rows).loss for _ in range(1)]
        for _ in range(8):
            mg.clip_grad_and_step(max_grad_norm=1.0)
            losses.append(mg.forward_backward(inputs=rows).loss)
        print(f"GPU bf16 megatron optimizer losses: {losses}")
        assert losses[-1] < losses[0] - 0.1
        path = mg.save(tmp_path / "bf16", save_optimizer=True)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
        ids = torch.tensor([rows[1]["input_ids"]], device="cuda")
        with torch.no_grad():
            ref = hf(input_ids=ids).logits.float()
        ours = mg.forward_only(inputs=rows[1:2], return_logits=True).logits.float()
        diff = (ref - ours).abs().max().item()
        print(f"GPU bf16 transformers-loaded logits max |diff| {diff:.3e}")
        assert diff < 0.1
    finally:
        mg.close()
