"""docs/model.md's Python blocks run as written."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[3] / "docs" / "model.md"


def test_model_doc_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert blocks
    for block in blocks:
        code = block.replace("/tmp/twinkle-docs-checkpoint", str(tmp_path / "ckpt"))
        exec(compile(code, str(DOC), "exec"), {"__name__": "docs_model"})
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").is_file()
