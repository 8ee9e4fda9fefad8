"""Wall time, CPU time and peak RSS of one child process at a time, for the benchmarks.

Peak RSS comes from ``os.wait4`` on that one child, so each figure is the child's own (not the
cumulative maximum that ``getrusage(RUSAGE_CHILDREN)`` reports). On Linux a child's ``ru_maxrss``
starts from the RSS of the process that spawned it (exec carries the old address space's high
water mark over), so the process calling :func:`run_measured` must stay small: it imports only
the standard library, and anything heavy (building inputs, checking outputs) runs in a child too.

"Working memory" is a run's peak RSS minus the peak RSS of a process that only imports what that
run imports: the memory the work itself needs, without the fixed cost of torch & co.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

MiB = 2**20
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    label: str
    wall_s: float
    cpu_s: float
    peak_rss: int  # bytes

    def as_dict(self) -> dict:
        return asdict(self)


class ChildFailed(RuntimeError):
    pass


def run_measured(label: str, command: Sequence[str], log: Path, env: dict | None = None) -> Run:
    """Run ``command`` with stdout and stderr to ``log``; its wall time, user+system CPU time and peak RSS."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        started = time.perf_counter()
        child = subprocess.Popen(list(command), stdout=sink, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise ChildFailed(f"{label} exited with {child.returncode}; last lines of {log}:\n{tail}")
    return Run(label, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)


def import_baseline(label: str, imports: str, log: Path, env: dict | None = None) -> Run:
    """A child that runs ``imports`` (Python source) and exits: the fixed cost a run's figures include."""
    return run_measured(label, [sys.executable, "-c", imports], log, env)


def own_peak_rss() -> int:
    """This process's peak RSS: every child's figure is at least this (see the module docstring)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The options every benchmark shares: --workdir, --layers, --keep, --json, and the hidden
    --role/paths by which a benchmark runs its own build and check steps as children."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=REPO / "bench-work" / name,
        help=f"inputs and outputs (default: bench-work/{name}, git-ignored)",
    )
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (default 22, the full size)")
    parser.add_argument("--keep", action="store_true", help="reuse inputs of an earlier --keep run, and keep them")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    return parser


def tidy(work: Path, outputs, keep: bool) -> None:
    """Remove the outputs, and the inputs too unless --keep asked for them."""
    for out in outputs:
        shutil.rmtree(out, ignore_errors=True)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def mib(n: float) -> str:
    return f"{n / MiB:,.0f} MiB"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table, first column left-aligned, the rest right-aligned."""
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def sides_table(sides: dict[str, dict]) -> str:
    """The table every benchmark prints: each side's wall (and wall less imports), CPU, peak RSS,
    imports-only RSS and working memory."""
    columns = ("wall_s", "work_wall_s", "cpu_s")
    rows = [
        [side, *(f"{s[c]:.1f}" for c in columns), mib(s["peak_rss"]), mib(s["import_rss"]), mib(s["working_memory"])]
        for side, s in sides.items()
    ]
    return table(["", "wall s", "wall - imports s", "CPU s", "peak RSS", "imports-only RSS", "working memory"], rows)
