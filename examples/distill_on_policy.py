"""On-policy distillation on CPU: a student LoRA learns small additions from a teacher LoRA.

The loop is the user's, top to bottom:

    the student samples (TorchSampler, adapter "default") -> the teacher scores the student's own
    tokens (the same sampler, adapter "teacher": Sampler.compute_logps) -> forward_backward with
    PPOLoss(teacher_kl_coef=1): the per-token reverse KL to the teacher as a per-token advantage
    -> clip_grad_and_step -> LocalCheckpointEngine syncs the student's LoRA into the sampler.

Stage 1 is the format warm-up of examples/grpo.py (one random digit after "a+b="), shared by
both. Stage 2 trains the teacher adapter with SFT on the right sums. Stage 3 distils: no
reward is used, yet the student's accuracy rises toward the teacher's, and the reverse KL
(student || teacher) on the student's samples falls, as does the exact KL of the answer
distributions (before vs after).

    python examples/distill_on_policy.py       # seed 0: exact answer KL 0.554 -> 0.222 in 20 steps
"""

from __future__ import annotations

import argparse
import random
import time

import twinkle
from twinkle import assets
from twinkle.checkpoint_engine import LocalCheckpointEngine
from twinkle.data_format import SamplingParams
from twinkle.data_format.sampling import build_input_feature
from twinkle.model import TransformersModel
from twinkle.sampler import TorchSampler

MAX_OPERAND = 2  # a, b in 0..2: 9 problems, answers 0..4


def problems(tokenizer) -> list[dict]:
    """Every "a+b=" problem as a token prompt whose user_data holds the answer."""
    return [
        {"input_ids": tokenizer.encode(f"{a}+{b}="), "user_data": {"answer": str(a + b)}}
        for a in range(MAX_OPERAND + 1)
        for b in range(MAX_OPERAND + 1)
    ]


def sft_rows(tokenizer, rng: random.Random, n: int, correct: bool) -> list[dict]:
    """One digit then EOS after each prompt: random digits (format only) or the right sum."""
    rows = []
    for problem in rng.choices(problems(tokenizer), k=n):
        digit = problem["user_data"]["answer"] if correct else str(rng.randint(0, 2 * MAX_OPERAND))
        rows.append(build_input_feature(problem["input_ids"], tokenizer.encode(digit) + [tokenizer.eos_token_id]))
    return rows


def answer_kl(model, tokenizer) -> float:
    """Exact KL(student || teacher) of the next-token distributions after "a+b=", mean over the 9 problems."""
    import torch

    rows = [{"input_ids": p["input_ids"]} for p in problems(tokenizer)]
    student = model.forward_only(inputs=rows, adapter_name="default", return_logits=True)["logits"]
    teacher = model.forward_only(inputs=rows, adapter_name="teacher", return_logits=True)["logits"]
    kls = []
    for i, row in enumerate(rows):
        last = len(row["input_ids"]) - 1
        ls = torch.log_softmax(student[i, last].float(), -1)
        lt = torch.log_softmax(teacher[i, last].float(), -1)
        kls.append(float((ls.exp() * (ls - lt)).sum()))
    return sum(kls) / len(kls)


def accuracy(sequences) -> float:
    return sum(seq.text.strip() == seq.user_data["answer"] for seq in sequences) / len(sequences)


def main(steps: int = 20, seed: int = 0, group_size: int = 8, lr: float = 5e-3, verbose: bool = True) -> dict:
    """Run the example; returns the student's accuracy and reverse KL per step and the teacher's accuracy."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    twinkle.initialize(mode="local", seed=seed)
    rng = random.Random(seed)
    model_dir = str(assets.path("tiny-qwen2"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    # ---- stage 1: format warm-up (full parameters), then the sampler gets these base weights --------
    model = TransformersModel(model_id=model_dir, seed=seed, device="cpu")
    model.set_optimizer("AdamW", lr=3e-3)
    for _ in range(30):
        model.forward_backward(inputs=sft_rows(tokenizer, rng, 32, correct=False))
        model.clip_grad_and_step()
    sampler = TorchSampler(model_id=model_dir, seed=seed, device="cpu")
    engine = LocalCheckpointEngine()
    engine.sync(model, sampler)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)

    # ---- stage 2: the teacher, an adapter that knows the sums (served by the same sampler) ----------
    model.add_adapter_to_model("teacher", lora)
    model.set_optimizer("AdamW", lr=1e-2)
    for _ in range(25):
        model.forward_backward(inputs=sft_rows(tokenizer, rng, 32, correct=True))
        model.clip_grad_and_step()
    engine.sync(model, sampler, adapter_name="teacher")

    # ---- stage 3: the student adapter distils on its own samples ------------------------------------
    model.add_adapter_to_model("default", lora)
    model.set_optimizer("AdamW", lr=lr)
    model.set_loss("PPOLoss", teacher_kl_coef=1.0)
    engine.sync(model, sampler, adapter_name="default")

    kl_before = answer_kl(model, tokenizer)
    params = dict(max_tokens=2, temperature=1.0, num_samples=group_size)
    teacher_seqs = sampler.sample(problems(tokenizer), SamplingParams(**params, seed=seed), adapter_name="teacher")
    teacher_acc = accuracy([s for r in teacher_seqs for s in r.sequences])
    acc_curve: list[float] = []
    kl_curve: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        responses = sampler.sample(
            problems(tokenizer), SamplingParams(**params, seed=seed * 100_000 + step), adapter_name="default"
        )
        sequences = [seq for response in responses for seq in response.sequences]
        rows = [seq.input_feature for seq in sequences]
        teacher = sampler.compute_logps(rows, adapter_name="teacher")  # the teacher's view of the student's tokens
        out = model.forward_backward(inputs=[dict(row, teacher_logps=t) for row, t in zip(rows, teacher)])
        model.clip_grad_and_step(max_grad_norm=1.0)
        engine.sync(model, sampler, adapter_name="default")
        acc_curve.append(accuracy(sequences))
        kl_curve.append(out["teacher_kl"])
        if verbose:
            print(f"step {step:3d}  student accuracy {acc_curve[-1]:.3f}  reverse KL to teacher {kl_curve[-1]:.3f}")
    elapsed = time.perf_counter() - started
    kl_after = answer_kl(model, tokenizer)
    twinkle.shutdown()
    window = max(1, steps // 5)
    summary = {
        "accuracy": acc_curve,
        "teacher_kl": kl_curve,
        "teacher_accuracy": teacher_acc,
        "first_accuracy": sum(acc_curve[:window]) / window,
        "last_accuracy": sum(acc_curve[-window:]) / window,
        "first_kl": sum(kl_curve[:window]) / window,
        "last_kl": sum(kl_curve[-window:]) / window,
        "answer_kl_before": kl_before,
        "answer_kl_after": kl_after,
        "seconds": elapsed,
    }
    if verbose:
        print(
            f"student accuracy {summary['first_accuracy']:.3f} -> {summary['last_accuracy']:.3f} "
            f"(teacher {teacher_acc:.3f}); sampled reverse KL {summary['first_kl']:.3f} -> {summary['last_kl']:.3f}; "
            f"exact KL at the answer {kl_before:.3f} -> {kl_after:.3f} ({elapsed:.0f}s of distillation)"
        )
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed, lr=args.lr)
