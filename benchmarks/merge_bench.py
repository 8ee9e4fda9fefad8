"""Merge benchmark: ``surgeon merge`` against PEFT's ``merge_and_unload`` on a Llama-1B-shaped model.

Builds, on disk, a synthetic bf16 base shaped like TinyLlama-1.1B (hidden 2048, intermediate 5632,
22 layers, vocab 32000, 32 heads, 4 KV heads, untied lm_head) and a rank-16 PEFT LoRA adapter on
every linear layer, then times both tools on them in child processes and reports wall time, CPU
time, peak RSS and working memory (peak RSS minus that of a child that only imports the same
libraries). Finally it checks that both merged checkpoints agree to bf16 round-off, so that the
two sides did the same work.

    python benchmarks/merge_bench.py                  # full size: ~2.2 GB base, ~7 GB of disk
    python benchmarks/merge_bench.py --layers 2       # a quick run
    python benchmarks/merge_bench.py --keep --repeat 2

This process imports only the standard library: a child's peak RSS on Linux starts from its
parent's (see ``_measure.py``), so building and checking run in children too.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import (  # noqa: E402
    MiB,
    Run,
    bench_parser,
    import_baseline,
    load_average,
    mib,
    own_peak_rss,
    run_measured,
    sides_table,
    tidy,
)

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 32, 4
RANK, ALPHA = 16, 32
INPUTS_VERSION = 1

SURGEON_IMPORTS = "import torch, safetensors, surgeon.cli, surgeon.ops.merge, surgeon.formats"
PEFT_IMPORTS = "import torch\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n"
PEFT_MERGE = (
    PEFT_IMPORTS
    + """import sys
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""
)


def linear_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of each LoRA target in one decoder layer."""
    kv = HIDDEN // HEADS * KV_HEADS
    return {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (kv, HIDDEN),
        "self_attn.v_proj": (kv, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTERMEDIATE),
    }


def base_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        shapes += [(f"model.layers.{i}.{name}.weight", shape) for name, shape in linear_shapes().items()]
        shapes += [
            (f"model.layers.{i}.input_layernorm.weight", (HIDDEN,)),
            (f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,)),
        ]
    return shapes + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


# --- children: building the inputs, checking the outputs -------------------------------------------------


def build_base(path: Path, layers: int) -> None:
    """config.json by transformers, and one model.safetensors written a tensor at a time: the
    header is planned from the shapes, so no more than one tensor is ever in memory."""
    import torch
    from transformers import LlamaConfig

    path.mkdir(parents=True)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        vocab_size=VOCAB,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    shapes = base_shapes(layers)
    entries, offset = {}, 0
    for key, shape in shapes:
        size = 2 * math.prod(shape)
        entries[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    generator = torch.Generator().manual_seed(0)
    with open(path / "model.safetensors", "wb") as sink:
        sink.write(len(header).to_bytes(8, "little") + header)
        for key, shape in shapes:
            if len(shape) == 1:
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = torch.randn(shape, generator=generator, dtype=torch.bfloat16).mul_(0.02)
            sink.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def build_adapter(path: Path, base: Path, layers: int) -> None:
    """adapter_config.json by peft, and fp32 factors (PEFT's default) with B non-zero."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    targets = sorted({name.split(".")[-1] for name in linear_shapes()})
    LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=targets, task_type="CAUSAL_LM", base_model_name_or_path=str(base)
    ).save_pretrained(path)
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        for name, (rows, cols) in linear_shapes().items():
            prefix = f"base_model.model.model.layers.{i}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, cols, generator=generator) / cols**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(rows, RANK, generator=generator) * 0.01
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


def _tensor_files(directory: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            where.update({key: file for key in handle.keys()})
    return where


def verify(base: Path, adapter: Path, surgeon_out: Path, peft_out: Path, layers: int) -> dict:
    """How far the two merged checkpoints are from each other and from an fp64 reference, in
    bf16 ulps, on a few merged tensors; and whether untouched tensors came through bit for bit."""
    import torch
    from safetensors import safe_open

    def get(files: dict[str, Path], key: str) -> torch.Tensor:
        with safe_open(files[key], framework="pt") as handle:
            return handle.get_tensor(key)

    def ulp(x: torch.Tensor) -> torch.Tensor:  # bf16 keeps 8 significant bits
        return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - 7)

    files = {"base": _tensor_files(base), "surgeon": _tensor_files(surgeon_out), "peft": _tensor_files(peft_out)}
    result = {
        "same_keys": set(files["surgeon"]) == set(files["peft"]) == set(files["base"]),
        "merged": {},
        "untouched": {},
    }
    factors = _tensor_files(adapter)
    scale = ALPHA / RANK
    last = layers - 1
    picks = [
        (0, "self_attn.q_proj"),
        (0, "self_attn.k_proj"),
        (last // 2, "mlp.down_proj"),
        (last // 2, "mlp.gate_proj"),
        (last, "self_attn.v_proj"),
        (last, "self_attn.o_proj"),
        (last, "mlp.up_proj"),
    ]
    for layer, name in picks:
        key = f"model.layers.{layer}.{name}.weight"
        prefix = f"base_model.model.model.layers.{layer}.{name}"
        a = get(factors, f"{prefix}.lora_A.weight").double()
        b = get(factors, f"{prefix}.lora_B.weight").double()
        reference = get(files["base"], key).double() + scale * (b @ a)
        s, p = get(files["surgeon"], key), get(files["peft"], key)
        assert s.dtype == p.dtype == torch.bfloat16, (key, s.dtype, p.dtype)
        s, p, rounded = s.double(), p.double(), reference.float().bfloat16().double()
        result["merged"][key] = {
            "max_abs_surgeon_vs_peft": float((s - p).abs().max()),
            "ulps_surgeon_vs_peft": float(((s - p).abs() / ulp(torch.maximum(s.abs(), p.abs()))).max()),
            "fraction_differing": float((s != p).double().mean()),
            "correctly_rounded_surgeon": float((s == rounded).double().mean()),
            "correctly_rounded_peft": float((p == rounded).double().mean()),
            "max_abs_delta": float((reference - get(files["base"], key).double()).abs().max()),
        }
    for key in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        f"model.layers.{last}.input_layernorm.weight",
    ):
        original = get(files["base"], key)
        result["untouched"][key] = all(torch.equal(original, get(files[side], key)) for side in ("surgeon", "peft"))
    return result


# --- the parent: orchestration and report ----------------------------------------------------------------


def surgeon_executable() -> str:
    """The installed console script itself, not a pyenv-style shim that would add its own start-up."""
    script = Path(sysconfig.get_path("scripts")) / "surgeon"
    found = str(script) if script.is_file() else shutil.which("surgeon")
    if not found:
        sys.exit("the surgeon command is not installed; run `pip install -e .` in the repository first.")
    return found


def child(role: str, *arguments) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", role, *map(str, arguments)]


def prepare_inputs(work: Path, layers: int, keep: bool) -> Run | None:
    """Build base and adapter unless --keep finds ones of this shape already; the build's figures, if built."""
    marker = work / "inputs.json"
    wanted = {"layers": layers, "version": INPUTS_VERSION}
    if keep and marker.is_file() and json.loads(marker.read_text()) == wanted:
        return None
    marker.unlink(missing_ok=True)
    for stale in (work / "base", work / "adapter"):
        shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    print(f"building inputs in {work} ({layers} layers) ...", file=sys.stderr)
    build = run_measured("build inputs", child("build", work, layers), work / "logs" / "build.log")
    marker.write_text(json.dumps(wanted))
    return build


def warm_page_cache(directory: Path) -> None:
    """Read the base once so that both tools find it in the page cache (neither pays the cold read)."""
    for file in directory.glob("*.safetensors"):
        with open(file, "rb", buffering=0) as source:
            while source.read(8 * MiB):
                pass


def child_env(threads: int | None) -> dict:
    """Offline, and with --threads the same thread count for both sides' torch (MKL, OpenMP)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_side(side: str, base: Path, adapter: Path, out: Path, logs: Path, attempt: int, env: dict) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # the previous run's writeback must not land in this run's time
    if side == "surgeon":
        command = [surgeon_executable(), "merge", str(base), str(adapter), "-o", str(out)]
    else:
        command = [sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(out)]
    return run_measured(side, command, logs / f"{side}-{attempt}.log", env)


def summarize(runs: list[Run], baseline: list[Run]) -> dict:
    wall = statistics.median(r.wall_s for r in runs)
    import_wall = statistics.median(r.wall_s for r in baseline)
    peak = statistics.median(r.peak_rss for r in runs)
    base_rss = statistics.median(r.peak_rss for r in baseline)
    return {
        "wall_s": wall,
        "cpu_s": statistics.median(r.cpu_s for r in runs),
        "peak_rss": peak,
        "import_wall_s": import_wall,
        "import_rss": base_rss,
        "work_wall_s": wall - import_wall,
        "working_memory": peak - base_rss,
    }


def report(results: dict) -> str:
    lines = [sides_table(results["sides"])]
    r = results["ratios"]
    lines.append(
        f"\nsurgeon / PEFT: wall time {r['wall']:.3f} (1/{1 / r['wall']:.1f}), wall without imports "
        f"{r['work_wall']:.3f} (1/{1 / r['work_wall']:.1f}), working memory {r['working_memory']:.3f} "
        f"(1/{1 / r['working_memory']:.1f}); targets: <= 0.2 each"
    )
    if len(results["runs"]["surgeon"]) > 1:
        for side, runs in results["runs"].items():
            lines.append(f"{side} runs: " + ", ".join(f"{x['wall_s']:.1f}s/{mib(x['peak_rss'])}" for x in runs))
    check = results["check"]
    worst = max(check["merged"].values(), key=lambda m: m["ulps_surgeon_vs_peft"])
    lines.append(
        f"outputs agree: same keys {check['same_keys']}, untouched tensors identical "
        f"{all(check['untouched'].values())}, "
        f"merged tensors differ by at most {worst['ulps_surgeon_vs_peft']:.0f} bf16 ulp "
        f"(max abs {max(m['max_abs_surgeon_vs_peft'] for m in check['merged'].values()):.2e}, "
        f"{max(m['fraction_differing'] for m in check['merged'].values()):.2%} of elements at most; "
        "equal to the fp64 reference rounded to bf16: surgeon "
        f"{min(m['correctly_rounded_surgeon'] for m in check['merged'].values()):.4%}, "
        f"PEFT {min(m['correctly_rounded_peft'] for m in check['merged'].values()):.4%} of elements at least)"
    )
    lines.append(
        f"load average before / after: {results['load_before']} / {results['load_after']} ({os.cpu_count()} CPUs, "
        f"torch threads: {results['threads'] or 'default'})"
    )
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, "merge")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per side, interleaved; figures are medians (default 1)"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads for both sides (OMP/MKL_NUM_THREADS; default: torch's own choice)"
    )
    args = parser.parse_args()

    if args.role == "build":
        work, layers = Path(args.paths[0]), int(args.paths[1])
        build_base(work / "base", layers)
        build_adapter(work / "adapter", work / "base", layers)
        return
    if args.role == "verify":
        print(json.dumps(verify(*map(Path, args.paths[:4]), int(args.paths[4]))))
        return

    work = args.workdir.resolve()
    base, adapter, logs = work / "base", work / "adapter", work / "logs"
    build = prepare_inputs(work, args.layers, args.keep)
    warm_page_cache(base)
    env = child_env(args.threads)
    results = {
        "layers": args.layers,
        "threads": args.threads,
        "load_before": load_average(),
        "build": build.as_dict() if build else None,
        "runs": {"surgeon": [], "peft": []},
        "baselines": {"surgeon": [], "peft": []},
    }
    imports = {"surgeon": SURGEON_IMPORTS, "peft": PEFT_IMPORTS}
    outputs = {side: work / f"out-{side}" for side in imports}
    for attempt in range(args.repeat):
        for side in ("surgeon", "peft"):
            print(f"run {attempt + 1}/{args.repeat}: {side} ...", file=sys.stderr)
            results["baselines"][side].append(
                import_baseline(side, imports[side], logs / f"{side}-imports-{attempt}.log", env).as_dict()
            )
            results["runs"][side].append(run_side(side, base, adapter, outputs[side], logs, attempt, env).as_dict())
    results["load_after"] = load_average()
    results["parent_peak_rss"] = own_peak_rss()
    floor = min(r["peak_rss"] for group in results["baselines"].values() for r in group)
    if results["parent_peak_rss"] >= floor:
        sys.exit(
            f"this process reached {mib(results['parent_peak_rss'])}, above a child's figure; the RSS figures are not "
            "per-child."
        )
    check = subprocess.run(
        child("verify", base, adapter, outputs["surgeon"], outputs["peft"], args.layers),
        capture_output=True,
        text=True,
        check=True,
    )
    results["check"] = json.loads(check.stdout.strip().splitlines()[-1])
    results["sides"] = {
        side: summarize([Run(**r) for r in results["runs"][side]], [Run(**r) for r in results["baselines"][side]])
        for side in imports
    }
    s, p = results["sides"]["surgeon"], results["sides"]["peft"]
    results["ratios"] = {
        "wall": s["wall_s"] / p["wall_s"],
        "work_wall": s["work_wall_s"] / p["work_wall_s"],
        "working_memory": s["working_memory"] / p["working_memory"],
    }
    tidy(work, outputs.values(), args.keep)
    print(json.dumps(results, indent=2) if args.json else report(results))


if __name__ == "__main__":
    main()
