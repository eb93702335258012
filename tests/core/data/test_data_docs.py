"""The quick start in docs/data.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[3] / "docs" / "data.md"


def test_quick_start_runs(capsys):
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, str(DOC), "exec"), {"__name__": "docs_data_quick_start"})
    printed = capsys.readouterr().out
    assert "twinkle大模型" in printed or "ModelScope社区" in printed
