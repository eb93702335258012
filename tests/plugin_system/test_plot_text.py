"""`twinkle plot --text` and the automatic text summary without matplotlib (torch-free)."""

from __future__ import annotations

import twinkle.plot
from twinkle.cli import main
from twinkle.plot import sparkline
from twinkle.tracker import JsonlTracker


def write_run(run_dir):
    tracker = JsonlTracker(run_dir)
    for step in range(1, 9):
        tracker.log("train", step, {"loss": 8.0 / step, "lr": 1e-3, "tokens_per_s": 50.0})
    tracker.log("rl", 3, {"reward": 0.5, "note": "strings are skipped"})
    tracker.close()
    return run_dir


def test_text_summary(tmp_path, capsys):
    run = write_run(tmp_path / "r1")
    assert main(["plot", "--text", str(run)]) == 0
    out = capsys.readouterr().out
    line = next(text for text in out.splitlines() if "train/loss" in text)
    assert "8 pts" in line and "steps 1..8" in line and "8 -> 1" in line and "(min 1, max 8)" in line
    assert sparkline([8.0 / s for s in range(1, 9)]) in line
    assert "rl/reward" in out and "note" not in out
    assert not (run / "metrics.png").exists()


def test_falls_back_to_text_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(twinkle.plot, "have_matplotlib", lambda: False)
    run = write_run(tmp_path / "r1")
    assert main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out and "train/loss" in out


def test_missing_run_says_how_runs_get_metrics(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "metrics.jsonl does not exist" in err and "jsonl" in err


def test_sparkline():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([1, 1, 1]) == "▁▁▁"
    assert len(sparkline(list(range(100)), width=20)) == 20
