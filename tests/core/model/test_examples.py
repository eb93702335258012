"""The examples run: the seed's script with only ids changed, and the self-cognition SFT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def test_seed_example_runs_with_only_ids_changed(tmp_path):
    env = {**os.environ, "TWINKLE_SEED_ROWS": "48", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "seed_sft.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Current is step 0 of 6, metric:" in proc.stdout
    checkpoint = tmp_path / "last-checkpoint"
    assert (checkpoint / "adapter_config.json").is_file()
    assert (checkpoint / "adapter_model.safetensors").is_file()


def test_self_cognition_sft_learns_the_new_identity(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.chdir(tmp_path)
    import sft_self_cognition

    result = sft_self_cognition.train(sft_self_cognition.parse_args(["--device", "cpu"]))
    assert result["last_loss"] < result["first_loss"] - 1.5
    assert "twinkle大模型" in result["answer"]
    out = capsys.readouterr().out
    assert "Q: who are you?" in out and "twinkle大模型" in out
    assert (tmp_path / "last-checkpoint" / "adapter_model.safetensors").is_file()


def test_self_cognition_sft_packed_learns_the_new_identity(tmp_path, monkeypatch, capsys):
    """``--packing 512``: PackingDataset rows through PaddingFreeProcessor (each conversation attends to itself)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.chdir(tmp_path)
    import sft_self_cognition
    from twinkle.patch import varlen

    calls = []
    real = varlen.packed_attention

    def counting(query, key, value, cu_seq_lens, max_length, **kwargs):
        calls.append(len(cu_seq_lens) - 1)
        return real(query, key, value, cu_seq_lens, max_length, **kwargs)

    monkeypatch.setattr(varlen, "packed_attention", counting)
    result = sft_self_cognition.train(sft_self_cognition.parse_args(["--device", "cpu", "--packing", "512"]))
    assert calls and max(calls) > 1  # packed rows of several conversations took the varlen path
    assert result["last_loss"] < result["first_loss"] - 1.2
    assert "twinkle大模型" in result["answer"]
    assert (tmp_path / "last-checkpoint" / "adapter_model.safetensors").is_file()
