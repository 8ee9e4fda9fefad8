"""Extract benchmark: ``surgeon extract`` against ``mergekit-extract-lora`` on a Llama-1B-shaped pair.

Builds, on disk, the synthetic bf16 base of ``merge_bench.py`` (TinyLlama-1.1B shapes: hidden
2048, intermediate 5632, 22 layers, vocab 32000, 32/4 heads, untied lm_head) and a "fine-tune"
of it: every linear weight plus a rank-32 delta and small noise (entries of the delta ~0.002
against weights ~0.02, noise ~0.0001), saved in bf16. Then, each in its own child process, it
times reading both checkpoints (the floor), surgeon at rank 64 with each SVD method, and
mergekit-extract-lora at rank 64 (installed in its own virtual environment under bench-work/,
sharing the system torch), and reports wall time, peak RSS, working memory (peak RSS minus a
child that only imports the same libraries) and the mean relative Frobenius error of each
adapter against the true delta tuned − base, measured afterwards outside the timings.

    python benchmarks/extract_bench.py                       # full size: ~4.4 GB of inputs in bench-work/extract
    python benchmarks/extract_bench.py --layers 4            # quicker, same per-module picture
    python benchmarks/extract_bench.py --keep --methods randomized,gram --skip-mergekit

This process imports only the standard library (see ``_measure.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import build_base, child_env, linear_shapes, surgeon_executable, warm_page_cache  # noqa: E402

from _measure import load_average, mib, own_peak_rss, run_measured, table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TRUE_RANK, RANK, DELTA_STD, NOISE_STD = 32, 64, 0.002, 0.0001
INPUTS_VERSION = 1
SURGEON_IMPORTS = "import torch, safetensors, transformers, surgeon.cli, surgeon.ops.extract, surgeon.formats"
MERGEKIT_IMPORTS = "import torch, transformers, mergekit.scripts.extract_lora"
READ_BOTH = """import sys, torch
from surgeon.checkpoint import Checkpoint
base, tuned = Checkpoint(sys.argv[1]), Checkpoint(sys.argv[2])
for key in base.keys():
    torch.equal(base.get(key), tuned.get(key))
"""


# --- children: building the inputs, measuring the outputs ------------------------------------------------


def build_tuned(base: Path, out: Path) -> None:
    """base + a rank-32 delta + noise on every linear weight, bf16, streamed a tensor at a time."""
    import torch

    from surgeon.checkpoint import Checkpoint, StreamingWriter

    checkpoint = Checkpoint(base)
    out.mkdir(parents=True)
    shutil.copy2(base / "config.json", out / "config.json")
    targets = {name.rsplit(".", 1)[-1] for name in linear_shapes()}
    generator = torch.Generator().manual_seed(7)
    specs = [(key, checkpoint.info(key)) for key in checkpoint.keys()]
    with StreamingWriter(out, specs) as writer:
        for key, _ in specs:
            tensor = checkpoint.get(key)
            if key.rsplit(".", 2)[-2] in targets:
                m, n = tensor.shape
                up = torch.randn(m, TRUE_RANK, generator=generator)
                down = torch.randn(TRUE_RANK, n, generator=generator).mul_(DELTA_STD / TRUE_RANK**0.5)
                delta = torch.addmm(torch.randn(m, n, generator=generator).mul_(NOISE_STD), up, down)
                tensor = (tensor.float() + delta).to(tensor.dtype)
            writer.write(key, tensor)


def measure_errors(base: Path, tuned: Path, outputs: dict[str, Path]) -> dict:
    """Per adapter: mean and max over targets of ‖ΔW_adapter − (tuned − base)‖_F / ‖tuned − base‖_F,
    and how many targets it holds (a missing target counts as error 1)."""
    import torch

    from surgeon.checkpoint import Checkpoint
    from surgeon.formats import peft
    from surgeon.keys import bind_to_base

    base_ckpt, tuned_ckpt = Checkpoint(base), Checkpoint(tuned)
    adapters = {name: bind_to_base(peft.read(path), base_ckpt.keys(), str(path)) for name, path in outputs.items()}
    targets = [
        k
        for k in base_ckpt.keys()
        if len(base_ckpt.info(k).shape) == 2 and k.rsplit(".", 2)[-2] in {n.rsplit(".", 1)[-1] for n in linear_shapes()}
    ]
    errors: dict[str, list[float]] = {name: [] for name in outputs}
    for key in targets:
        delta = tuned_ckpt.get(key).double() - base_ckpt.get(key).double()
        norm = float(torch.linalg.norm(delta))
        for name, adapter in adapters.items():
            found = [d for d in adapter.deltas.get(key, []) if hasattr(d, "rank")]
            approx = sum(d.materialize(dtype=torch.float64) for d in found) if found else torch.zeros_like(delta)
            errors[name].append(float(torch.linalg.norm(delta - approx)) / norm)
    return {
        name: {
            "mean_relative_error": sum(v) / len(v),
            "max_relative_error": max(v),
            "targets": len(targets),
            "extracted": sum(1 for k in targets if adapters[name].deltas.get(k)),
            "ranks": sorted({d.rank for d in adapters[name].low_ranks().values()}),
        }
        for name, v in errors.items()
    }


# --- the parent: orchestration and report ----------------------------------------------------------------


def child(role: str, *arguments) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", role, *map(str, arguments)]


def mergekit_venv(work: Path) -> Path | None:
    """bench-work/mergekit-venv with mergekit installed (sharing the system torch), or None with
    the reason printed when pip cannot install it."""
    venv = REPO / "bench-work" / "mergekit-venv"
    script = venv / "bin" / "mergekit-extract-lora"
    if script.is_file():
        return venv
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mergekit"], capture_output=True, text=True)
    if installed.returncode != 0 or not script.is_file():
        print(f"mergekit did not install; skipping it:\n{installed.stderr[-2000:]}", file=sys.stderr)
        return None
    return venv


def prepare_inputs(work: Path, layers: int, keep: bool) -> dict | None:
    marker = work / "inputs.json"
    wanted = {"layers": layers, "version": INPUTS_VERSION}
    if keep and marker.is_file() and json.loads(marker.read_text()) == wanted:
        return None
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    build = run_measured("build inputs", child("build", work, layers), work / "logs" / "build.log")
    marker.write_text(json.dumps(wanted))
    return build.as_dict()


def run_side(name: str, command: list[str], out: Path, logs: Path, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    return run_measured(name, command, logs / f"{name}.log", env).as_dict()


def report(results: dict) -> str:
    rows = []
    for name, run in results["runs"].items():
        error = results["errors"].get(name, {})
        baseline = results["import_rss"].get(name.split("-")[0])
        rows.append(
            [
                name,
                f"{run['wall_s']:.1f}",
                f"{run['cpu_s']:.1f}",
                mib(run["peak_rss"]),
                mib(run["peak_rss"] - baseline) if baseline else "-",
                f"{error['mean_relative_error']:.6f}" if error else "-",
                f"{error['max_relative_error']:.6f}" if error else "-",
                mib(results["adapter_bytes"][name]) if name in results.get("adapter_bytes", {}) else "-",
            ]
        )
    lines = [
        table(
            ["", "wall s", "CPU s", "peak RSS", "working memory", "mean rel. error", "max rel. error", "adapter"], rows
        )
    ]
    if "mergekit" in results["runs"]:
        mergekit, theirs = results["runs"]["mergekit"], results["errors"]["mergekit"]["mean_relative_error"]
        for name, run in results["runs"].items():
            if name.startswith("surgeon"):
                ours = results["errors"][name]["mean_relative_error"]
                lines.append(
                    f"{name}: {mergekit['wall_s'] / run['wall_s']:.1f}× less wall time, "
                    f"{mergekit['cpu_s'] / run['cpu_s']:.1f}× less CPU time "
                    f"than mergekit; mean error {100 * (ours / theirs - 1):+.4f}% relative to mergekit's"
                )
    lines.append(
        f"largest tensor {mib(results['largest_tensor_bytes'])} (bf16); {results['modules']} targets at rank {RANK}; "
        f"load average before / after: {results['load_before']} / {results['load_after']} ({os.cpu_count()} CPUs)"
    )
    return "\n".join(lines)


def extract_arguments(base: Path, tuned: Path, output: Path, method: str, device: str) -> list[str]:
    """``surgeon extract``'s arguments for the comparison: the linear weights alone at RANK, which is
    what mergekit-extract-lora extracts by default (like for like)."""
    return [
        "extract", str(base), str(tuned), "-o", str(output), "--rank", str(RANK), "--method", method,
        "--device", device, "--embeddings", "skip", "--skip-changed-1d",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=REPO / "bench-work" / "extract",
        help="inputs and outputs (default: bench-work/extract, git-ignored)",
    )
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (default 22, the full size)")
    parser.add_argument(
        "--methods", default="randomized,gram,exact", help="surgeon SVD methods to time (comma-separated)"
    )
    parser.add_argument("--device", default="cpu", help="surgeon's --device (and mergekit's --cuda when cuda)")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--keep", action="store_true", help="reuse inputs of an earlier --keep run, and keep them")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "build":
        work, layers = Path(args.paths[0]), int(args.paths[1])
        build_base(work / "base", layers)
        build_tuned(work / "base", work / "tuned")
        return
    if args.role == "errors":
        base, tuned, *pairs = args.paths
        print(
            json.dumps(measure_errors(Path(base), Path(tuned), {n: Path(p) for n, p in zip(pairs[::2], pairs[1::2])}))
        )
        return

    work = args.workdir.resolve()
    base, tuned, logs = work / "base", work / "tuned", work / "logs"
    print(f"building inputs in {work} ({args.layers} layers) ...", file=sys.stderr)
    build = prepare_inputs(work, args.layers, args.keep)
    warm_page_cache(base)
    warm_page_cache(tuned)
    env = child_env(None)
    results: dict = {
        "layers": args.layers,
        "rank": RANK,
        "modules": args.layers * len(linear_shapes()),
        "build": build,
        "load_before": load_average(),
        "runs": {},
        "import_rss": {},
        "errors": {},
        "largest_tensor_bytes": 32000 * 2048 * 2,
    }
    results["import_rss"]["surgeon"] = run_measured(
        "surgeon imports", [sys.executable, "-c", SURGEON_IMPORTS], logs / "surgeon-imports.log", env
    ).peak_rss
    results["runs"]["read-both"] = run_side(
        "read-both", [sys.executable, "-c", READ_BOTH, str(base), str(tuned)], work / "none", logs, env
    )
    outputs = {}
    for method in [m for m in args.methods.split(",") if m]:
        name = f"surgeon-{method}"
        outputs[name] = work / f"out-{name}"
        print(f"{name} ...", file=sys.stderr)
        command = [surgeon_executable(), *extract_arguments(base, tuned, outputs[name], method, args.device)]
        results["runs"][name] = run_side(name, command, outputs[name], logs, env)
    venv = None if args.skip_mergekit else mergekit_venv(work)
    if venv is not None:
        print("mergekit-extract-lora ...", file=sys.stderr)
        python = str(venv / "bin" / "python")
        results["mergekit_version"] = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        results["import_rss"]["mergekit"] = run_measured(
            "mergekit imports", [python, "-c", MERGEKIT_IMPORTS], logs / "mergekit-imports.log", env
        ).peak_rss
        outputs["mergekit"] = work / "out-mergekit"
        command = [
            str(venv / "bin" / "mergekit-extract-lora"),
            "--model",
            str(tuned),
            "--base-model",
            str(base),
            "--out-path",
            str(outputs["mergekit"]),
            "--max-rank",
            str(RANK),
            "--no-copy-tokenizer",
            "--quiet",
        ]
        results["runs"]["mergekit"] = run_side(
            "mergekit", command + (["--cuda"] if args.device.startswith("cuda") else []), outputs["mergekit"], logs, env
        )
    results["load_after"] = load_average()
    results["parent_peak_rss"] = own_peak_rss()
    pairs = [str(x) for name, path in outputs.items() for x in (name, path)]
    measured = subprocess.run(child("errors", base, tuned, *pairs), capture_output=True, text=True, check=True)
    results["errors"] = json.loads(measured.stdout.strip().splitlines()[-1])
    results["adapter_bytes"] = {
        name: sum(f.stat().st_size for f in path.rglob("*.safetensors")) for name, path in outputs.items()
    }
    for out in outputs.values():
        shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2) if args.json else report(results))


if __name__ == "__main__":
    main()
