"""`twinkle plot`: a PNG whose panels hold the runs' curves (checked on the figure's line data)."""

from __future__ import annotations

import pytest
from twinkle.cli import main
from twinkle.plot import load_curves, plot_figure
from twinkle.tracker import JsonlTracker


def write_run(run_dir, scale=1.0, rl=False):
    tracker = JsonlTracker(run_dir)
    for step in range(1, 6):
        tracker.log(
            "train", step, {"loss": scale * 3.0 / step, "lr": 1e-3 * (6 - step) / 5, "tokens_per_s": 100.0 * step}
        )
    tracker.log("eval", 5, {"loss": scale * 0.9})
    if rl:
        for step in range(1, 4):
            tracker.log("rl", step, {"reward": 0.25 * step, "kl": 0.01})
    tracker.close()
    return run_dir


def test_figure_has_the_expected_curves_of_two_runs(tmp_path):
    a = write_run(tmp_path / "run-a")
    b = write_run(tmp_path / "run-b", scale=2.0, rl=True)
    figure = plot_figure(load_curves([a, b]))
    panels = {
        ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
        for ax in figure.axes
    }
    assert list(panels) == ["loss", "learning rate", "reward", "throughput (tokens/s)"]
    loss = panels["loss"]
    assert set(loss) == {"run-a: train/loss", "run-a: eval/loss", "run-b: train/loss", "run-b: eval/loss"}
    assert loss["run-a: train/loss"] == ([1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 1.5, 1.0, 0.75, 0.6])
    assert loss["run-b: train/loss"][1] == pytest.approx([6.0, 3.0, 2.0, 1.5, 1.2])
    assert loss["run-b: eval/loss"] == ([5.0], [1.8])
    assert panels["learning rate"]["run-a: train/lr"][1] == pytest.approx([1e-3, 8e-4, 6e-4, 4e-4, 2e-4])
    assert panels["reward"] == {"run-b: rl/reward": ([1.0, 2.0, 3.0], [0.25, 0.5, 0.75])}  # kl is not plotted
    assert panels["throughput (tokens/s)"]["run-a: train/tokens_per_s"][1] == [100.0, 200.0, 300.0, 400.0, 500.0]


def test_cli_writes_a_png(tmp_path, capsys):
    a = write_run(tmp_path / "run-a")
    assert main(["plot", str(a)]) == 0
    png = a / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().out
    out = tmp_path / "figs" / "two.png"
    assert main(["plot", str(a), str(write_run(tmp_path / "run-b")), "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000
    from matplotlib.image import imread

    height, width, _ = imread(out).shape  # 2 x 2 panels of 6 x 3.6 inches at 100 dpi
    assert (width, height) == (1200, 720)
