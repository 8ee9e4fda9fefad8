"""GPU extract benchmark: surgeon against its cold read and against ``mergekit-extract-lora --cuda``.

Makes a Llama-7B-shaped pair (hidden 4096, intermediate 11008, 32 heads, vocab 32000, untied
lm_head; 16 decoder layers by default, bf16) on the GPU in seconds: weights drawn there, every
linear weight of the "fine-tune" plus a rank-32 delta and noise, each tensor written straight
into safetensors shards (no model is constructed; config.json is written by hand). Then, each
in its own child process and each after evicting both checkpoints from the page cache:

* the cold read: every tensor of both checkpoints read and moved to the device (the floor);
* ``surgeon extract --rank 64`` with ``--method auto`` and ``--method exact``;
* ``mergekit-extract-lora --max-rank 64 --cuda`` (from ``--mergekit-path``, a folder that
  ``gpu_bench.sh`` fills from wheels brought along; skipped when absent).

Each adapter's relative Frobenius error against the true delta tuned − base is measured
afterwards, outside the timings, and the figures printed with their ratios to the cold read
and to mergekit. Run it through ``benchmarks/gpu_bench.sh``, which installs what is missing
offline; ``--device cpu --size tiny --layers 1`` is the dry run that checks it works.

This process imports only the standard library (see ``_measure.py``); torch runs in children.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_bench import extract_arguments  # noqa: E402

from _measure import ChildFailed, run_measured, table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SIZES = {
    "7b": dict(hidden=4096, intermediate=11008, heads=32, vocab=32000),
    "tiny": dict(hidden=256, intermediate=688, heads=4, vocab=1024),
}
TRUE_RANK, RANK, WEIGHT_STD, DELTA_STD, NOISE_STD = 32, 64, 0.02, 0.002, 0.0001
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SURGEON = "from surgeon.cli import main; main()"
MERGEKIT = "import sys; sys.argv[0] = 'mergekit-extract-lora'; from mergekit.scripts.extract_lora import main; main()"


def tensor_shapes(size: dict, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LlamaForCausalLM of these dimensions, in checkpoint order."""
    h, i = size["hidden"], size["intermediate"]
    per_layer = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, h),
        "self_attn.v_proj": (h, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
    }
    shapes = [("model.embed_tokens.weight", (size["vocab"], h))]
    for layer in range(layers):
        shapes += [(f"model.layers.{layer}.{name}.weight", shape) for name, shape in per_layer.items()]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (size["vocab"], h))]


def llama_config(size: dict, layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": size["hidden"],
        "intermediate_size": size["intermediate"],
        "num_hidden_layers": layers,
        "num_attention_heads": size["heads"],
        "num_key_value_heads": size["heads"],
        "vocab_size": size["vocab"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def is_target(key: str) -> bool:
    return key.endswith(".weight") and key.rsplit(".", 2)[-2] in TARGETS


# --- children ------------------------------------------------------------------------------------------


def build(work: Path, size: dict, layers: int, device: str) -> None:
    """base and tuned, drawn on ``device`` and streamed a tensor at a time into 2 GB shards."""
    import torch

    from surgeon.checkpoint import StreamingWriter, TensorInfo

    shapes = tensor_shapes(size, layers)
    specs = [(key, TensorInfo(shape, torch.bfloat16)) for key, shape in shapes]
    generator = torch.Generator(device).manual_seed(0)
    writers = {}
    for name in ("base", "tuned"):
        (work / name).mkdir(parents=True)
        (work / name / "config.json").write_text(json.dumps(llama_config(size, layers), indent=2))
        writers[name] = StreamingWriter(work / name, specs, shard_size=2 * 10**9)
    with writers["base"], writers["tuned"]:
        for key, shape in shapes:
            if len(shape) == 1:
                weight = torch.ones(shape, device=device)
            else:
                weight = torch.randn(shape, device=device, generator=generator).mul_(WEIGHT_STD)
            writers["base"].write(key, weight.to(torch.bfloat16).cpu())
            if is_target(key):
                up = torch.randn(shape[0], TRUE_RANK, device=device, generator=generator)
                down = torch.randn(TRUE_RANK, shape[1], device=device, generator=generator)
                down.mul_(DELTA_STD / TRUE_RANK**0.5)
                noise = torch.randn(shape, device=device, generator=generator).mul_(NOISE_STD)
                weight = weight.to(torch.bfloat16).float().add_(noise.addmm_(up, down))
            writers["tuned"].write(key, weight.to(torch.bfloat16).cpu())


def evict(paths: list[Path]) -> None:
    """Drop the checkpoints' pages from the page cache, so that the next reader pays the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")  # root only; fadvise below works without
    except OSError:
        pass
    for path in paths:
        for file in sorted(path.rglob("*.safetensors")):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_both(base: Path, tuned: Path, device: str) -> None:
    """Every tensor of both checkpoints onto ``device``, one after the other: the floor for extract."""
    import torch

    from surgeon.checkpoint import Checkpoint

    started, total = time.perf_counter(), 0
    for checkpoint in (Checkpoint(base), Checkpoint(tuned)):
        for key in checkpoint.keys():
            total += checkpoint.get(key).to(device).numel()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    print(json.dumps({"seconds": time.perf_counter() - started, "elements": total}))


def measure_errors(base: Path, tuned: Path, device: str, outputs: dict[str, Path]) -> dict:
    """Per adapter: mean and max over targets of ‖ΔW_adapter − (tuned − base)‖_F / ‖tuned − base‖_F
    (fp64 on ``device``; a target the adapter lacks counts as error 1)."""
    import torch

    from surgeon.checkpoint import Checkpoint
    from surgeon.formats import peft
    from surgeon.keys import bind_to_base

    base_ckpt, tuned_ckpt = Checkpoint(base), Checkpoint(tuned)
    adapters = {name: bind_to_base(peft.read(path), base_ckpt.keys(), str(path)) for name, path in outputs.items()}
    errors: dict[str, list[float]] = {name: [] for name in outputs}
    for key in filter(is_target, base_ckpt.keys()):
        delta = tuned_ckpt.get(key).to(device, torch.float64) - base_ckpt.get(key).to(device, torch.float64)
        norm = float(torch.linalg.norm(delta))
        for name, adapter in adapters.items():
            found = [d for d in adapter.deltas.get(key, []) if d.factored() is not None]
            approx = sum(d.materialize(device, torch.float64) for d in found) if found else torch.zeros_like(delta)
            errors[name].append(float(torch.linalg.norm(delta - approx)) / norm)
    return {name: {"mean": sum(v) / len(v), "max": max(v)} for name, v in errors.items()}


# --- the parent ----------------------------------------------------------------------------------------


def child(role: str, *arguments) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", role, *map(str, arguments)]


def timed(name: str, command: list[str], work: Path, env: dict, deadline: float) -> dict:
    """One cold run: checkpoints evicted, then ``command`` timed (wall, CPU, peak RSS), stopped at
    ``deadline`` (a time.monotonic() value) and then reported as failed."""
    subprocess.run(child("evict", work / "base", work / "tuned"), check=True)
    timeout = max(5, int(deadline - time.monotonic()))
    limited = ["timeout", str(timeout), *command] if shutil.which("timeout") else command
    print(f"{name} ...", file=sys.stderr, flush=True)
    try:
        return run_measured(name, limited, work / "logs" / f"{name}.log", env).as_dict()
    except ChildFailed as failure:
        print(failure, file=sys.stderr)
        return {"failed": str(failure).splitlines()[0]}


def runs(args: argparse.Namespace, work: Path, env: dict, deadline: float) -> tuple[dict, dict[str, Path]]:
    """The timed runs, each given at most ``--run-timeout`` and what is left before ``deadline``."""
    base, tuned = work / "base", work / "tuned"

    def limit() -> float:
        return min(time.monotonic() + args.run_timeout, deadline)

    results = {"cold-read": timed("cold-read", child("read", base, tuned, args.device), work, env, limit())}
    outputs = {}
    for method in args.methods.split(","):
        name = f"surgeon-{method}"
        outputs[name] = work / f"out-{name}"
        command = [sys.executable, "-c", SURGEON, *extract_arguments(base, tuned, outputs[name], method, args.device)]
        results[name] = timed(name, command, work, env, limit())
    if args.mergekit_path and (args.mergekit_path / "mergekit").is_dir():
        outputs["mergekit"] = work / "out-mergekit"
        command = [
            sys.executable,
            "-c",
            MERGEKIT,
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
        mergekit_env = {
            **env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(args.mergekit_path), env.get("PYTHONPATH")])),
        }
        results["mergekit"] = timed(
            "mergekit", command + (["--cuda"] if args.device.startswith("cuda") else []), work, mergekit_env, limit()
        )
    else:
        print(
            f"no mergekit in {args.mergekit_path}; run through gpu_bench.sh with wheels to compare with it",
            file=sys.stderr,
        )
    return results, {name: path for name, path in outputs.items() if "failed" not in results[name]}


def report(results: dict) -> str:
    cold = results["runs"]["cold-read"].get("wall_s")
    theirs = results["runs"].get("mergekit", {}).get("wall_s")
    rows = []
    for name, run in results["runs"].items():
        if "failed" in run:
            rows.append([name, "failed", "", "", "", ""])
            continue
        error = results["errors"].get(name)
        rows.append(
            [
                name,
                f"{run['wall_s']:.1f}",
                f"{run['wall_s'] / cold:.2f}×" if cold else "",
                f"{theirs / run['wall_s']:.2f}×" if theirs and name != "cold-read" else "",
                f"{error['mean']:.5f}" if error else "",
                f"{error['max']:.5f}" if error else "",
            ]
        )
    head = (
        f"{results['device_name']}; {results['layers']} layers of {results['size']}, rank {RANK}; "
        f"inputs {results['input_gb']:.1f} GB, built in {results['build_s']:.0f} s; "
        f"cold read inside the child {results.get('read_inside_s', float('nan')):.1f} s"
    )
    return head + "\n" + table(["run", "wall s", "× cold read", "mergekit ÷ run", "mean error", "max error"], rows)


def device_name(device: str) -> str:
    code = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')"
    name = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    return name if device.startswith("cuda") else f"CPU (device {device})"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--methods", default="auto,exact", help="surgeon --method values to time (comma-separated)")
    parser.add_argument(
        "--mergekit-path",
        type=Path,
        default=REPO / "bench-work" / "mergekit-pkgs",
        help="a folder holding the mergekit package (pip install --target); skipped when absent",
    )
    parser.add_argument("--run-timeout", type=float, default=180, help="seconds each timed run may take")
    parser.add_argument(
        "--budget",
        type=float,
        default=470,
        help="seconds for the whole benchmark: runs are stopped so that it ends in time (8 min)",
    )
    parser.add_argument("--results", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the inputs and adapters")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse()
    if args.role == "build":
        return build(Path(args.paths[0]), SIZES[args.paths[1]], int(args.paths[2]), args.paths[3])
    if args.role == "evict":
        return evict([Path(p) for p in args.paths])
    if args.role == "read":
        return read_both(Path(args.paths[0]), Path(args.paths[1]), args.paths[2])
    if args.role == "errors":
        base, tuned, device, *pairs = args.paths
        outputs = {name: Path(path) for name, path in zip(pairs[::2], pairs[1::2])}
        return print(json.dumps(measure_errors(Path(base), Path(tuned), device, outputs)))

    deadline = time.monotonic() + args.budget - 40  # left for measuring the errors and the report
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    print(f"building a {args.size}-shaped pair of {args.layers} layers in {work} on {args.device} ...", file=sys.stderr)
    started = time.perf_counter()
    run_measured("build", child("build", work, args.size, args.layers, args.device), work / "logs" / "build.log", env)
    results = {
        "device_name": device_name(args.device),
        "size": args.size,
        "layers": args.layers,
        "build_s": time.perf_counter() - started,
        "input_gb": sum(f.stat().st_size for f in work.rglob("*.safetensors")) / 1e9,
    }
    results["runs"], outputs = runs(args, work, env, deadline)
    if "failed" not in results["runs"]["cold-read"]:
        results["read_inside_s"] = json.loads((work / "logs" / "cold-read.log").read_text().splitlines()[-1])["seconds"]
    pairs = [str(x) for name, path in outputs.items() for x in (name, path)]
    measured = subprocess.run(
        child("errors", work / "base", work / "tuned", args.device, *pairs),
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    results["errors"] = json.loads(measured.stdout.strip().splitlines()[-1])
    if args.results:
        args.results.write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(report(results))


if __name__ == "__main__":
    main()
