"""How fast surgeon answers: `surgeon --help`, header-only `inspect` of the bundled adapter and
checkpoint, and a merge of the tiny fixture, each against `python -c "import torch"` in the same
run (the floor every torch tool pays). Runs interleave, and medians are reported.

Targets (issue 12): --help and header-only inspect at most 0.3 s; a tiny merge at most 1.3x the
bare torch import.

    python benchmarks/startup_bench.py              # 7 runs of each
    python benchmarks/startup_bench.py --repeat 15 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from _measure import REPO, run_measured

SURGEON = [sys.executable, "-c", "from surgeon.cli import main; main()"]
FIXTURES = REPO / "fixtures"


def commands(scratch: Path) -> dict[str, list[str]]:
    return {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "surgeon --help": [*SURGEON, "--help"],
        "surgeon inspect fixtures/tiny-llama-lora": [*SURGEON, "inspect", str(FIXTURES / "tiny-llama-lora")],
        "surgeon inspect fixtures/tiny-llama": [*SURGEON, "inspect", str(FIXTURES / "tiny-llama")],
        "surgeon merge (tiny fixture)": [
            *SURGEON,
            "merge",
            str(FIXTURES / "tiny-llama"),
            str(FIXTURES / "tiny-llama-lora"),
            "-o",
            str(scratch / "merged"),
            "--force",
        ],
    }


def measure(repeat: int) -> dict[str, list[float]]:
    scratch = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    try:
        walls: dict[str, list[float]] = {}
        for _ in range(repeat):
            for label, command in commands(scratch).items():
                run = run_measured(label, command, scratch / "log.txt", env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
                walls.setdefault(label, []).append(run.wall_s)
        return walls
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def report(walls: dict[str, list[float]]) -> dict:
    medians = {label: statistics.median(found) for label, found in walls.items()}
    torch_import = medians["python -c 'import torch'"]
    rows = {
        label: {"median_s": round(m, 3), "vs_torch_import": round(m / torch_import, 2)} for label, m in medians.items()
    }
    checks = {
        "--help <= 0.3 s": medians["surgeon --help"] <= 0.3,
        "header-only inspect <= 0.3 s": max(
            medians["surgeon inspect fixtures/tiny-llama-lora"], medians["surgeon inspect fixtures/tiny-llama"]
        )
        <= 0.3,
        "tiny merge <= 1.3x import torch": medians["surgeon merge (tiny fixture)"] <= 1.3 * torch_import,
    }
    return {
        "runs": len(next(iter(walls.values()))),
        "load_average": os.getloadavg()[0],
        "commands": rows,
        "targets": checks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7, help="runs of each command (medians are reported)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    found = report(measure(args.repeat))
    if args.json:
        print(json.dumps(found, indent=2))
        return
    print(f"{found['runs']} runs each, load average {found['load_average']:.2f}; medians of wall time:")
    for label, row in found["commands"].items():
        print(f"  {label:<44} {row['median_s']:>7.3f} s  {row['vs_torch_import']:>5.2f}x import torch")
    for target, met in found["targets"].items():
        print(f"  {'met' if met else 'MISSED':<6} {target}")


if __name__ == "__main__":
    main()
