"""DPO and GRPO losses and gradients equal TRL's implementations on the same random inputs.

TRL's own trainers are built around a tiny random Qwen2 and their loss methods are called on
a batch; our losses get the same logits and log-probabilities in Twinkle's layout
(``shift_labels``, interleaved preference pairs, ``old_logps``/``ref_logps`` aligned with labels).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from twinkle.loss.base import token_logps  # noqa: E402
from twinkle.loss.preference import DPOLoss  # noqa: E402
from twinkle.loss.rl import CISPOLoss, DAPOLoss, DrGRPOLoss, GRPOLoss, GSPOLoss  # noqa: E402

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "twinkle_core" / "src" / "twinkle" / "assets" / "tiny-qwen2"


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=3008,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=2,
    )
    return Qwen2ForCausalLM(config).float()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        scale = float(b[name].abs().max()) + 1e-12
        diff = float((a[name] - b[name]).abs().max())
        assert diff <= 1e-4 * scale + 1e-7, f"{name}: max |diff| {diff:.3e}, max |grad| {scale:.3e}"


# ------------------------------------------------------------------------------------------ DPO
PAIRS = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "It is five, I believe."},
    {"prompt": "Capital of Italy?", "chosen": "Rome.", "rejected": "Milan is the capital."},
]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_matches_trl(tmp_path, tokenizer, loss_type):
    from trl import DPOConfig, DPOTrainer

    base = tiny_model()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=0.2,
        loss_type=[loss_type],
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=2,
        max_length=64,
        bf16=False,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to("cpu") if hasattr(v, "to") else v for k, v in batch.items()}
    model = trainer.model
    model.train()
    # TRL keeps the adapter's initial weights as its reference; move the trained adapter away from it
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." in name:
                p.add_(torch.randn_like(p) * 0.5)
    ref_adapter = "ref" if "ref" in model.peft_config else None

    model.zero_grad()
    trl_loss = trainer.compute_loss(model, batch)
    trl_loss.backward()
    trl_grads = grads(model)

    # Twinkle: the same tokens, pairs interleaved [chosen_0, rejected_0, ...], reference = adapter disabled
    n = batch["input_ids"].shape[0] // 2
    order = [i for k in range(n) for i in (k, n + k)]
    input_ids = batch["input_ids"][order]
    attention = batch["attention_mask"][order]
    completion = batch["completion_mask"][order]
    shift_labels = torch.full_like(input_ids, -100)
    shift_labels[:, :-1] = torch.where(completion[:, 1:] > 0, input_ids[:, 1:], -100)
    inputs = {"shift_labels": shift_labels, "row_ids": torch.arange(2 * n).unsqueeze(1).expand_as(input_ids)}
    with torch.no_grad():  # the same reference as TRL's: its "ref" adapter, else the adapter disabled
        if ref_adapter is None:
            with model.disable_adapter():
                ref_logits = model(input_ids=input_ids, attention_mask=attention).logits
        else:
            model.set_adapter(ref_adapter)
            ref_logits = model(input_ids=input_ids, attention_mask=attention).logits
            model.set_adapter("default")
    inputs["ref_logps"] = token_logps(inputs, {"logits": ref_logits})
    model.zero_grad()
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    out = DPOLoss(beta=0.2, loss_type=loss_type)(inputs, {"logits": logits})
    ours = out.loss / out.num_tokens
    ours.backward()

    assert float(ours.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-5, abs=1e-7)
    assert abs(float(trl_loss.detach()) - 0.6931) > 1e-3 or loss_type != "sigmoid"  # a real margin, not log 2
    assert_same_grads(grads(model), trl_grads)


# ------------------------------------------------------------------------------------------ GRPO
B, P, C = 4, 5, 6  # completions, prompt length, completion length


def grpo_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    return {
        "prompt_ids": torch.randint(3, 3000, (B, P), generator=g),
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(3, 3000, (B, C), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.2, -0.7, 0.4, -0.9]),
        "old_per_token_logps": torch.randn(B, C, generator=g) * 0.2 - 8.0,
        "ref_per_token_logps": torch.randn(B, C, generator=g) * 0.2 - 8.0,
        "num_items_in_batch": completion_mask.sum(),
    }


def twinkle_inputs(batch: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Twinkle's layout of the same batch: labels/old/ref aligned with shift_labels over prompt+completion."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    t = P + C
    shift = torch.full((B, t), -100, dtype=torch.long)
    old = torch.zeros(B, t)
    ref = torch.zeros(B, t)
    m = batch["completion_mask"].bool()
    shift[:, P - 1 : t - 1] = torch.where(m, batch["completion_ids"], -100)
    old[:, P - 1 : t - 1] = batch["old_per_token_logps"] * m
    ref[:, P - 1 : t - 1] = batch["ref_per_token_logps"] * m
    inputs = {
        "shift_labels": shift,
        "old_logps": old,
        "ref_logps": ref,
        "advantages": batch["advantages"].unsqueeze(1).expand(B, t),
        "row_ids": torch.arange(B).unsqueeze(1).expand(B, t),
    }
    return inputs, input_ids, attention


GRPO_CASES = [
    # (TRL config, our loss)
    ({"loss_type": "grpo", "beta": 0.04, "use_bias_correction_kl": False}, GRPOLoss(epsilon=0.2, beta=0.04)),
    ({"loss_type": "grpo", "beta": 0.04}, GRPOLoss(epsilon=0.2, beta=0.04, kl_ratio_correction=True)),
    ({"loss_type": "grpo", "beta": 0.0, "epsilon_high": 0.28}, GRPOLoss(epsilon=0.2, epsilon_high=0.28)),
    ({"loss_type": "bnpo", "beta": 0.04, "use_bias_correction_kl": False}, GRPOLoss(beta=0.04, aggregation="token")),
    ({"loss_type": "dapo", "beta": 0.0, "epsilon_high": 0.28}, DAPOLoss()),
    ({"loss_type": "dr_grpo", "beta": 0.04}, DrGRPOLoss(max_completion_length=C, beta=0.04, kl_ratio_correction=True)),
    (
        {
            "loss_type": "grpo",
            "beta": 0.0,
            "importance_sampling_level": "sequence",
            "epsilon": 3e-4,
            "epsilon_high": 4e-4,
        },
        GSPOLoss(),
    ),
    ({"loss_type": "cispo", "beta": 0.0, "epsilon_high": 5.0}, CISPOLoss(max_ratio=5.0)),
]


@pytest.mark.parametrize(
    ("trl_kwargs", "loss"), GRPO_CASES, ids=[f"{c[0]['loss_type']}-{i}" for i, c in enumerate(GRPO_CASES)]
)
def test_grpo_matches_trl(tmp_path, tokenizer, trl_kwargs, loss):
    from trl import GRPOConfig, GRPOTrainer

    model = tiny_model()
    trl_kwargs = dict(trl_kwargs)
    beta = trl_kwargs.pop("beta")
    args = GRPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=B,
        num_generations=B,
        max_completion_length=C,
        beta=0.0,
        **trl_kwargs,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "hi"}] * B),
        processing_class=tokenizer,
    )
    trainer.beta = beta  # set after construction so TRL does not load a separate reference model
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    model.train()
    batch = grpo_batch()

    model.zero_grad()
    trl_loss = trainer._compute_loss(model, dict(batch))
    trl_loss.backward()
    trl_grads = grads(model)

    inputs, input_ids, attention = twinkle_inputs(batch)
    model.zero_grad()
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    out = loss(inputs, {"logits": logits})
    ours = out.loss / out.num_tokens
    ours.backward()

    assert float(ours.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-5, abs=1e-8)
    assert_same_grads(grads(model), trl_grads)


# ----------------------------------------------------------------- rollout correction (TRL 1.16 IS)
PROMPTS = [[5, 9, 13, 200, 41], [77, 3, 8]]  # two prompts (one left-padded by TRL), 2 completions each
COMPLETIONS = [[300, 17, 2], [44, 45, 46, 47, 48], [901, 2], [12, 13, 14, 15]]


def fake_generate(trainer, sampling_logps):
    """Replaces GRPOTrainer._generate: fixed completions and the sampler's per-token log-probs (as vLLM's)."""
    prompt_ids = [PROMPTS[i // 2] for i in range(len(COMPLETIONS))]

    def _generate(prompts):
        texts = [trainer._tokenizer.decode(ids) for ids in COMPLETIONS]
        return prompt_ids, COMPLETIONS, None, texts, sampling_logps, {}, None, None

    return _generate


ROLLOUT_CASES = [
    # TRL's default: vllm_importance_sampling_correction=True, mode "sequence_mask", clip_max 3.0
    ({}, {"rollout_correction": "sequence_mask"}),
    ({"vllm_importance_sampling_mode": "token_truncate"}, {"rollout_correction": "token_truncate"}),
    (
        {"vllm_importance_sampling_mode": "token_mask", "vllm_importance_sampling_clip_min": 0.5},
        {"rollout_correction": "token_mask", "rollout_clip_min": 0.5},
    ),
    (
        {"vllm_importance_sampling_mode": "sequence_truncate", "vllm_importance_sampling_clip_max": 2.0},
        {"rollout_correction": "sequence_truncate", "rollout_clip_max": 2.0},
    ),
]


@pytest.mark.parametrize(
    ("trl_kwargs", "our_kwargs"), ROLLOUT_CASES, ids=[c[1]["rollout_correction"] for c in ROLLOUT_CASES]
)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_rollout_correction_matches_trl(tmp_path, tokenizer, trl_kwargs, our_kwargs, loss_type):
    """TRL's own _generate_and_score_completions (vLLM generation replaced by fixed tokens and sampler
    log-probs) computes its importance-sampling weights; _compute_loss applies them. Ours gets the same
    tokens, the same advantages and the sampler log-probs as old_logps."""
    from trl import GRPOConfig, GRPOTrainer

    model = tiny_model()
    args = GRPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=5,
        beta=0.0,  # set after construction with a reference of our own (no hub download)
        loss_type=loss_type,
        **({"epsilon_high": 0.28} if loss_type == "dapo" else {}),
        **trl_kwargs,
    )
    rewards = iter([[1.0, 0.0, 0.3, 0.9]])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[lambda completions, **kw: next(rewards)],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "hi"}] * 4),
        processing_class=tokenizer,
    )
    assert trainer.vllm_importance_sampling_correction  # on by default in TRL
    from trl.trainer.utils import add_fused_lm_head

    trainer.beta, trainer.ref_model = 0.04, tiny_model(seed=1).eval()
    add_fused_lm_head(trainer.ref_model)  # as TRL prepares its own reference model
    trainer.use_vllm = True  # only the importance-sampling branches read it from here on
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    model.train()

    # the trainer's log-probs of the completions, then sampler log-probs that differ from them
    input_ids, attention, shift = _rollout_layout(trainer)
    with torch.no_grad():
        trainer_logps = token_logps(
            {"shift_labels": shift}, {"logits": model(input_ids=input_ids, attention_mask=attention).logits}
        )
    p = input_ids.shape[1] - max(len(c) for c in COMPLETIONS)
    # sampler = trainer + noise: token ratios exp(-noise) above 3 and below 0.5, sequence ratios 4.5 and 2.5
    noise = [[-1.3, 0.2, -0.4], [0.1, -0.2, 0.8, -0.3, 0.05], [0.3, -0.2], [-0.5, -0.4, 0.1, -0.1]]
    sampler = trainer_logps.clone()
    for i, row in enumerate(noise):
        sampler[i, p - 1 : p - 1 + len(row)] += torch.tensor(row)
    sampling_logps = [sampler[i, p - 1 : p - 1 + len(c)].tolist() for i, c in enumerate(COMPLETIONS)]
    trainer._generate = fake_generate(trainer, sampling_logps)

    batch = trainer._generate_and_score_completions([{"prompt": "hi"}] * 4)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("sampling/")}
    model.zero_grad()
    trl_loss = trainer._compute_loss(model, batch)
    trl_loss.backward()
    trl_grads = grads(model)

    mask = shift != -100
    old = torch.zeros_like(sampler)
    old[mask] = sampler[mask]
    ref = torch.zeros_like(sampler)
    comp_mask = batch["completion_mask"].bool()
    ref[:, p - 1 : -1][comp_mask] = batch["ref_per_token_logps"][comp_mask]
    b, t = shift.shape
    inputs = {
        "shift_labels": shift,
        "old_logps": old,
        "ref_logps": ref,
        "advantages": batch["advantages"].unsqueeze(1).expand(b, t),
        "row_ids": torch.arange(b).unsqueeze(1).expand(b, t),
    }
    loss_cls = DAPOLoss if loss_type == "dapo" else GRPOLoss
    loss = loss_cls(beta=0.04, kl_ratio_correction=True, **our_kwargs)
    model.zero_grad()
    out = loss(inputs, {"logits": model(input_ids=input_ids, attention_mask=attention).logits})
    ours = out.loss / out.num_tokens
    ours.backward()

    assert float(ours.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-5, abs=1e-8)
    assert_same_grads(grads(model), trl_grads)
    # TRL's sampling/* metrics are ours under other names
    assert out.extra["rollout_logp_gap"] == pytest.approx(
        trl_metrics["sampling/sampling_logp_difference/mean"], rel=1e-5
    )
    assert out.extra["rollout_logp_gap_max"] == pytest.approx(
        trl_metrics["sampling/sampling_logp_difference/max"], rel=1e-5
    )
    for stat in ("min", "mean", "max"):
        trl_value = trl_metrics[f"sampling/importance_sampling_ratio/{stat}"]
        assert out.extra[f"rollout_is_{stat}"] == pytest.approx(trl_value, rel=1e-5, abs=1e-7)
    # the thresholds bite: something was masked or truncated
    share = out.extra.get("rollout_masked_fraction", out.extra.get("rollout_truncated_fraction"))
    assert 0 < share < 1


def _rollout_layout(trainer):
    """Twinkle's layout of the fixed batch: prompts left-padded as TRL does, completions right-padded."""
    pad = trainer._tokenizer.pad_token_id
    p = max(len(x) for x in PROMPTS)
    c = max(len(x) for x in COMPLETIONS)
    ids, att, shift = [], [], []
    for i, comp in enumerate(COMPLETIONS):
        prompt = PROMPTS[i // 2]
        row = [pad] * (p - len(prompt)) + prompt + comp + [pad] * (c - len(comp))
        ids.append(row)
        att.append([0] * (p - len(prompt)) + [1] * (len(prompt) + len(comp)) + [0] * (c - len(comp)))
        labels = [-100] * (p + c)
        labels[p - 1 : p - 1 + len(comp)] = comp
        shift.append(labels)
    return torch.tensor(ids), torch.tensor(att), torch.tensor(shift)
