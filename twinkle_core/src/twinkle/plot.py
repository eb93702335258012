"""``twinkle plot RUN_DIR...``: loss, lr, reward and throughput curves of one or more runs.

Reads each run's ``metrics.jsonl`` (the default JSONL tracker). With matplotlib installed it
writes a PNG (``pip install 'twinkle-core[plot]'``); ``--text`` or no matplotlib prints a
terminal summary instead: per curve its first, last, min and max and a sparkline.

The x axis is the record's step (the optimizer step for model metrics); records without a
step use their position in the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

#: Panels in display order: title -> metric names drawn there (every source that has them).
PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "learning rate": ("lr",),
    "reward": ("reward", "reward_mean", "mean_reward"),
    "throughput (tokens/s)": ("tokens_per_s",),
}

_SPARKS = "▁▂▃▄▅▆▇█"


@dataclass
class Curve:
    """One line: a run's metric from one source."""

    run: str
    source: str
    metric: str
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.run}: {self.source}/{self.metric}" if self.source else f"{self.run}: {self.metric}"


def load_curves(run_dirs: Sequence[str | Path], panels: dict[str, tuple[str, ...]] = PANELS) -> dict[str, list[Curve]]:
    """panel title -> curves, from each run's ``metrics.jsonl``.

    Raises:
        FileNotFoundError: a run directory without ``metrics.jsonl`` (the message says how runs get one).
    """
    from twinkle.tracker.jsonl import METRICS_FILE, read_metrics

    wanted = {name: title for title, names in panels.items() for name in names}
    result: dict[str, list[Curve]] = {title: [] for title in panels}
    names = _run_names([Path(p) for p in run_dirs])
    for run_dir, run_name in zip(run_dirs, names):
        path = Path(run_dir)
        file = path if path.is_file() else path / METRICS_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} does not exist: a run writes it when twinkle.initialize() keeps the default 'jsonl' tracker "
                f"(see docs/tracking.md); pass the run's directory, e.g. twinkle_runs/20261207-101500"
            )
        curves: dict[tuple[str, str], Curve] = {}
        for index, record in enumerate(read_metrics(file)):
            step = record.get("step")
            x = float(step) if isinstance(step, (int, float)) else float(index)
            for metric, value in (record.get("metrics") or {}).items():
                if metric not in wanted or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if not math.isfinite(value):
                    continue
                source = str(record.get("source") or "")
                key = (source, metric)
                if key not in curves:
                    curves[key] = Curve(run_name, source, metric)
                    result[wanted[metric]].append(curves[key])
                curves[key].x.append(x)
                curves[key].y.append(float(value))
    return result


def _run_names(paths: list[Path]) -> list[str]:
    """Short distinct names: the directory names, or more of the path where they clash."""
    names = [p.name if p.is_dir() else p.parent.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


def plot_figure(curves: dict[str, list[Curve]]) -> Any:
    """A matplotlib Figure with one panel per non-empty entry of ``curves`` (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    titles = [title for title, lines in curves.items() if lines]
    if not titles:
        raise ValueError(
            "no loss, lr, reward or tokens_per_s values in these runs' metrics.jsonl: "
            "call model.calculate_metric() (or twinkle.log_metrics) during training"
        )
    cols = 2 if len(titles) > 1 else 1
    rows = math.ceil(len(titles) / cols)
    figure = Figure(figsize=(6.0 * cols, 3.6 * rows), layout="constrained")
    for i, title in enumerate(titles):
        axes = figure.add_subplot(rows, cols, i + 1)
        for curve in curves[title]:
            axes.plot(curve.x, curve.y, label=curve.label, linewidth=1.4)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(True, alpha=0.3)
        if title == "learning rate":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        axes.legend(fontsize=7)
    return figure


def save_png(curves: dict[str, list[Curve]], output: str | Path, dpi: int = 100) -> Path:
    """Draw ``curves`` and write the PNG; returns its path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot_figure(curves).savefig(output, format="png", dpi=dpi)
    return output


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """``values`` resampled to ``width`` points as block characters (low to high)."""
    if not values:
        return ""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width)]
    low, high = min(values), max(values)
    if high == low:
        return _SPARKS[0] * len(values)
    return "".join(_SPARKS[min(int((v - low) / (high - low) * len(_SPARKS)), len(_SPARKS) - 1)] for v in values)


def text_summary(curves: dict[str, list[Curve]]) -> str:
    """One block per panel, one line per curve: points, first -> last, min/max, a sparkline."""
    lines: list[str] = []
    for title, group in curves.items():
        if not group:
            continue
        lines.append(f"{title}:")
        for curve in group:
            y = curve.y
            lines.append(
                f"  {curve.label:<40} {len(y):5d} pts  steps {curve.x[0]:g}..{curve.x[-1]:g}  "
                f"{y[0]:.4g} -> {y[-1]:.4g}  (min {min(y):.4g}, max {max(y):.4g})  {sparkline(y)}"
            )
    if not lines:
        return "no loss, lr, reward or tokens_per_s values in these runs"
    return "\n".join(lines)


def have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def main(run_dirs: Iterable[str], output: str | None = None, text: bool = False) -> int:
    """The ``twinkle plot`` command: a PNG (default ``<first run>/metrics.png``) or a text summary."""
    run_dirs = list(run_dirs)
    curves = load_curves(run_dirs)
    if text or not have_matplotlib():
        if not text:
            print("matplotlib is not installed (pip install matplotlib): a text summary instead of a PNG\n")
        print(text_summary(curves))
        return 0
    target = Path(output) if output else Path(run_dirs[0]) / "metrics.png"
    save_png(curves, target)
    print(f"wrote {target}")
    return 0


def configure_parser(parser: Any) -> None:
    """The ``twinkle plot`` command's options (registered by core's ``twinkle_register_commands``)."""
    parser.description = (
        "Curves of one or more runs overlaid, from each RUN_DIR/metrics.jsonl: a PNG with matplotlib, "
        "else (or with --text) a terminal summary."
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (twinkle_runs/<timestamp>)")
    parser.add_argument("-o", "--output", help="the PNG to write (default: RUN_DIR/metrics.png of the first run)")
    parser.add_argument("--text", action="store_true", help="print a terminal summary instead of a PNG")
    parser.set_defaults(func=_command)


def _command(args: Any) -> int:
    import sys

    try:
        return main(args.run_dirs, output=args.output, text=args.text)
    except (FileNotFoundError, ValueError) as exc:
        print(f"twinkle plot: {exc}", file=sys.stderr)
        return 1
