"""Cold `import twinkle` and `twinkle.initialize()` times, each in a fresh interpreter.

    python benchmarks/import_time.py [--runs 15]

Prints the median over runs, with all plugins that are installed in this environment
loaded by initialize(). For scale it also times `import torch` and the reference
framework's figure from the issue (1.1 s on this machine class).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = """
import time, json, warnings
t0 = time.perf_counter()
import twinkle
t1 = time.perf_counter()
warnings.simplefilter("ignore")
rt = twinkle.initialize(mode="local")
t2 = time.perf_counter()
plugins = sorted(n for n, i in rt.plugins.plugins.items() if i.ok)
print(json.dumps({"import": t1 - t0, "initialize": t2 - t1, "plugins": plugins}))
"""

BASELINE = "import time; t=time.perf_counter(); import {module}; print(time.perf_counter()-t)"
REFERENCE_IMPORT_S = 1.1  # the reference framework's `import twinkle`, from the issue


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    samples = [json.loads(run(PROBE)) for _ in range(args.runs)]
    imp = statistics.median(s["import"] for s in samples) * 1e3
    init = statistics.median(s["initialize"] for s in samples) * 1e3
    rows = [("import twinkle", imp, 50.0, REFERENCE_IMPORT_S * 1e3 / imp), ("twinkle.initialize()", init, 250.0, None)]
    try:
        torch_ms = statistics.median(float(run(BASELINE.format(module="torch"))) for _ in range(3)) * 1e3
    except subprocess.CalledProcessError:
        torch_ms = float("nan")
    print(f"plugins loaded by initialize(): {', '.join(samples[0]['plugins'])}")
    print(f"{'what':<24}{'median ms':>12}{'goal ms':>10}{'speed-up vs reference import (1.1 s)':>38}")
    for name, value, goal, ratio in rows:
        shown = f"{ratio:.1f}x" if ratio else "-"
        print(f"{name:<24}{value:>12.1f}{goal:>10.0f}{shown:>38}")
    print(f"{'import torch (scale)':<24}{torch_ms:>12.1f}")


if __name__ == "__main__":
    main()
