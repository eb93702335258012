"""docs/megatron.md's quick start runs as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "megatron.md"


def test_quick_start_runs_and_saves_a_peft_adapter(tmp_path, monkeypatch, capsys) -> None:
    code = re.search(r"## Quick start.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out
    assert "'step': 2" in printed  # 4 micro-batches, gradient_accumulation_steps=2
    adapter = tmp_path / "output" / "megatron-lora"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (adapter / "adapter_model.safetensors").is_file()
