"""Benchmark: `surgeon compose --method svd` against PEFT's add_weighted_adapter(combination_type="svd").

Two random rank-64 PEFT LoRA adapters on Llama-1B (TinyLlama) shapes: hidden 2048, intermediate
5632, 22 layers, 32 heads with 4 key/value heads, all seven projections targeted. Both tools
make the rank-64 approximation of their sum; each runs in its own child process, so wall time
and peak RSS (from wait4) are its own, and the error of each result against the exact sum is
measured afterwards, outside the timings.

    python benchmarks/compose_bench.py                  # full run (PEFT: ~30 s per module on 2 cores)
    python benchmarks/compose_bench.py --peft-layers 2  # PEFT on the first 2 layers only, its time
                                                        # scaled by 22/2 (each module is an independent SVD)
    python benchmarks/compose_bench.py --json bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000
PROJECTIONS = {  # name: (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
    "self_attn.v_proj": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def make_adapter(out: Path, layers: int, rank: int, alpha: int, seed: int) -> Path:
    """A PEFT LoRA adapter directory with random factors, as PEFT saves it."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for name, (rows, cols) in PROJECTIONS.items():
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, cols, generator=generator) / math.sqrt(cols)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(rows, rank, generator=generator) / math.sqrt(rank)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({n.rpartition(".")[2] for n in PROJECTIONS}),
        "base_model_name_or_path": "tinyllama-shapes",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


PEFT_CHILD = textwrap.dedent("""
    import json, sys, time, torch, transformers
    from peft import PeftModel
    a, b, out, layers, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    config = transformers.LlamaConfig(hidden_size={HIDDEN}, intermediate_size={INTERMEDIATE}, num_hidden_layers=layers,
                                      num_attention_heads={HEADS}, num_key_value_heads={KV_HEADS}, vocab_size={VOCAB})
    torch.set_default_dtype(torch.bfloat16)  # the base only hosts the adapters; bf16 halves its memory
    model = transformers.LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    model = PeftModel.from_pretrained(model, a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    started = time.perf_counter()
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="svd", svd_rank=rank)
    seconds = time.perf_counter() - started
    model.save_pretrained(out, selected_adapters=["mix"])
    print(json.dumps({{"compose_seconds": seconds}}))
""").format(HIDDEN=HIDDEN, INTERMEDIATE=INTERMEDIATE, HEADS=HEADS, KV_HEADS=KV_HEADS, VOCAB=VOCAB)


def run_measured(command: list[str], threads: int | None) -> dict:
    """Run ``command`` (with ``threads`` intra-op threads when given): its wall time, its own peak
    RSS (reaped with wait4) and the JSON it prints."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}))
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out_chunks: list[str] = []
    err_chunks: list[str] = []

    readers = [
        threading.Thread(target=lambda s, c: c.append(s.read()), args=(stream, chunks))
        for stream, chunks in ((process.stdout, out_chunks), (process.stderr, err_chunks))
    ]
    for reader in readers:
        reader.start()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    for reader in readers:
        reader.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{''.join(err_chunks)[-3000:]}")
    stdout = "".join(out_chunks)
    return {
        "wall_seconds": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "report": json.loads(stdout[stdout.index("{") :]),
    }


def errors(results: dict[str, Path], adapters: list[Path], rank: int) -> dict[str, float]:
    """Mean over the modules all results have, of each result's ‖ΔW_result − ΣΔWᵢ‖_F / ‖ΣΔWᵢ‖_F, next to the optimal
    (Eckart–Young) value at ``rank`` from a dense SVD of the sum, and each result's worst excess
    over that optimum."""
    from surgeon.formats import peft
    from surgeon.ops.rank import tail_error

    inputs = [peft.read(a) for a in adapters]
    outputs = {name: peft.read(path) for name, path in results.items()}
    found: dict[str, list[float]] = {"optimal": [], **{name: [] for name in results}}
    excess = {name: 0.0 for name in results}
    for key in set.intersection(*(set(a.deltas) for a in outputs.values())):
        exact = sum(a.deltas[key][0].materialize() for a in inputs)
        norm = torch.linalg.norm(exact)
        optimal = tail_error(torch.linalg.svdvals(exact), rank)
        found["optimal"].append(optimal)
        for name, adapter in outputs.items():
            error = float(torch.linalg.norm(sum(d.materialize() for d in adapter.deltas[key]) - exact) / norm)
            found[name].append(error)
            excess[name] = max(excess[name], error - optimal)
    figures = {f"{name}_mean_relative_error": sum(v) / len(v) for name, v in found.items()}
    figures.update({f"{name}_max_excess_over_optimal": v for name, v in excess.items()})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="Where the adapters go (default: a temporary directory)."
    )
    parser.add_argument(
        "--peft-layers",
        type=int,
        default=None,
        help="Run PEFT on the first N layers only and scale its time to --layers.",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="Intra-op threads of both tools (default: torch's). "
        "On a loaded machine 1 avoids OpenMP oversubscription, which hurts surgeon's many small QRs most.",
    )
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--skip-error", action="store_true", help="Do not measure the errors (saves the dense SVDs).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="compose-bench-"))
    adapters = [
        make_adapter(work / "a", args.layers, args.rank, 2 * args.rank, 0),
        make_adapter(work / "b", args.layers, args.rank, args.rank, 1),
    ]
    figures: dict = {
        "layers": args.layers,
        "rank": args.rank,
        "modules": args.layers * len(PROJECTIONS),
        "threads": args.threads or torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "torch": torch.__version__,
    }

    out = work / "surgeon-out"
    surgeon = run_measured(
        [
            sys.executable,
            "-c",
            "from surgeon.cli import main; main()",
            "compose",
            *map(str, adapters),
            "--method",
            "svd",
            "--rank",
            str(args.rank),
            "--device",
            "cpu",
            "-o",
            str(out),
            "--force",
            "--json",
        ],
        args.threads,
    )
    figures["surgeon"] = {
        "wall_seconds": surgeon["wall_seconds"],
        "compose_seconds": surgeon["report"]["seconds"],
        "peak_rss_mb": surgeon["peak_rss_mb"],
    }
    if not args.skip_peft:
        import peft

        peft_out = work / "peft-out"
        peft_layers = min(args.peft_layers or args.layers, args.layers)
        # PEFT loads the adapters into a model of peft_layers blocks and ignores the layers it lacks
        result = run_measured(
            [sys.executable, "-c", PEFT_CHILD, *map(str, adapters), str(peft_out), str(peft_layers), str(args.rank)],
            args.threads,
        )
        scale = args.layers / peft_layers
        figures["peft"] = {
            "version": peft.__version__,
            "layers_run": peft_layers,
            "compose_seconds_measured": result["report"]["compose_seconds"],
            "compose_seconds": result["report"]["compose_seconds"] * scale,
            "extrapolated": scale != 1,
            "wall_seconds_measured": result["wall_seconds"],
            "peak_rss_mb_measured": result["peak_rss_mb"],
        }
        figures["speedup_compose"] = figures["peft"]["compose_seconds"] / figures["surgeon"]["compose_seconds"]
        if scale == 1:
            figures["speedup_wall"] = figures["peft"]["wall_seconds_measured"] / figures["surgeon"]["wall_seconds"]
    if not args.skip_error:
        results = {"surgeon": out, **({"peft": work / "peft-out" / "mix"} if "peft" in figures else {})}
        figures["error"] = errors(results, adapters, args.rank)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
