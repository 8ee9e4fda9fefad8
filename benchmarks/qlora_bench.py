"""QLoRA merge benchmark: ``surgeon merge --quantized-base nf4`` against the route users take today.

The route today: transformers loads the 16-bit base in 4 bits (bitsandbytes NF4, double
quantization, bf16 compute), ``model.dequantize()``, PEFT ``merge_and_unload``, ``save_pretrained``.
surgeon does the same arithmetic (quantize → dequantize → merge → bf16) a tensor at a time. Inputs
are merge_bench's synthetic TinyLlama-1.1B-shaped bf16 base and rank-16 adapter on every linear
layer. Reported: wall time, CPU time, peak RSS and working memory (peak RSS minus that of a child
that only imports the same libraries), and how far the two outputs are from each other and from
the fp64 reference (dequantize(quantize(W)) + ΔW rounded to bf16).

    python benchmarks/qlora_bench.py                  # full size (22 layers)
    python benchmarks/qlora_bench.py --layers 2       # a quick run

This process imports only the standard library (see ``_measure.py``); building and checking run
in children.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import (  # noqa: E402
    ALPHA,
    RANK,
    _tensor_files,
    child_env,
    prepare_inputs,
    summarize,
    surgeon_executable,
    warm_page_cache,
)

from _measure import (  # noqa: E402
    Run,
    bench_parser,
    import_baseline,
    load_average,
    own_peak_rss,
    run_measured,
    sides_table,
    tidy,
)

SURGEON_IMPORTS = "import torch, safetensors, surgeon.cli, surgeon.ops.qlora, surgeon.formats"
USERS_IMPORTS = (
    "import torch\nfrom transformers import AutoModelForCausalLM, BitsAndBytesConfig\n"
    "from peft import PeftModel\nimport bitsandbytes\n"
)
USERS_MERGE = (
    USERS_IMPORTS
    + """import sys
base, adapter, out = sys.argv[1:4]
config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=torch.bfloat16, device_map="cpu")
model = model.dequantize()
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""
)


def verify(base: Path, adapter: Path, surgeon_out: Path, users_out: Path, layers: int) -> dict:
    """On a few merged tensors: bf16 ulps between the two outputs, and the fraction of each equal to
    the fp64 reference dequantize(quantize(W)) + ΔW rounded to bf16 (W quantized by surgeon,
    which the tests hold to bitsandbytes bit for bit); untouched tensors compared bit for bit."""
    import torch
    from safetensors import safe_open

    from surgeon.quantize import Scheme, roundtrip

    def get(files: dict[str, Path], key: str) -> torch.Tensor:
        with safe_open(files[key], framework="pt") as handle:
            return handle.get_tensor(key)

    def ulp(x: torch.Tensor) -> torch.Tensor:
        return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - 7)

    files = {"base": _tensor_files(base), "surgeon": _tensor_files(surgeon_out), "users": _tensor_files(users_out)}
    factors = _tensor_files(adapter)
    result = {"same_keys": set(files["surgeon"]) == set(files["users"]) == set(files["base"]), "merged": {}}
    last = layers - 1
    for layer, name in [(0, "self_attn.q_proj"), (last // 2, "mlp.down_proj"), (last, "mlp.up_proj")]:
        key, prefix = f"model.layers.{layer}.{name}.weight", f"base_model.model.model.layers.{layer}.{name}"
        a, b = get(factors, f"{prefix}.lora_A.weight").double(), get(factors, f"{prefix}.lora_B.weight").double()
        quantized = roundtrip(get(files["base"], key), Scheme("nf4", True, 64)).double()
        rounded = (quantized + ALPHA / RANK * (b @ a)).float().bfloat16().double()
        s, u = get(files["surgeon"], key).double(), get(files["users"], key).double()
        result["merged"][key] = {
            "ulps_surgeon_vs_users": float(((s - u).abs() / ulp(torch.maximum(s.abs(), u.abs()))).max()),
            "fraction_differing": float((s != u).double().mean()),
            "correctly_rounded_surgeon": float((s == rounded).double().mean()),
            "correctly_rounded_users": float((u == rounded).double().mean()),
        }
    result["untouched_identical"] = all(
        torch.equal(get(files["surgeon"], k), get(files["users"], k).to(torch.bfloat16))
        for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")
    )
    return result


def run_side(side: str, base: Path, adapter: Path, out: Path, logs: Path, env: dict) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    if side == "surgeon":
        command = [
            surgeon_executable(),
            "merge",
            str(base),
            str(adapter),
            "-o",
            str(out),
            "--quantized-base",
            "nf4",
            "--double-quant",
            "--dtype",
            "bf16",
        ]
    else:
        command = [sys.executable, "-c", USERS_MERGE, str(base), str(adapter), str(out)]
    return run_measured(side, command, logs / f"{side}.log", env)


def report(results: dict) -> str:
    lines = [sides_table(results["sides"])]
    r = results["ratios"]
    lines.append(
        f"\nsurgeon / today's route: wall time {r['wall']:.3f} (1/{1 / r['wall']:.1f}), working memory "
        f"{r['working_memory']:.3f} (1/{1 / r['working_memory']:.1f}); targets: <= 0.2 each"
    )
    check = results["check"]
    merged = check["merged"].values()
    lines.append(
        f"outputs: same keys {check['same_keys']}, untouched tensors identical "
        f"{check['untouched_identical']}, "
        f"merged tensors differ by at most {max(m['ulps_surgeon_vs_users'] for m in merged):.0f} bf16 ulp "
        f"({max(m['fraction_differing'] for m in merged):.2%} of elements at most); equal to the fp64 "
        f"reference rounded to bf16: surgeon {min(m['correctly_rounded_surgeon'] for m in merged):.4%}, "
        f"today's route {min(m['correctly_rounded_users'] for m in merged):.4%} of elements at least"
    )
    lines.append(
        f"layers {results['layers']}; load average before / after: {results['load_before']} / "
        f"{results['load_after']} ({os.cpu_count()} CPUs)"
    )
    return "\n".join(lines)


def main() -> None:
    args = bench_parser(__doc__, "qlora").parse_args()
    if args.role == "verify":
        print(json.dumps(verify(*map(Path, args.paths[:4]), int(args.paths[4]))))
        return
    work = args.workdir.resolve()
    base, adapter, logs = work / "base", work / "adapter", work / "logs"
    prepare_inputs(work, args.layers, args.keep)
    warm_page_cache(base)
    env = child_env(None)
    results = {"layers": args.layers, "load_before": load_average(), "runs": {}, "baselines": {}}
    imports = {"surgeon": SURGEON_IMPORTS, "users": USERS_IMPORTS}
    outputs = {side: work / f"out-{side}" for side in imports}
    for side in imports:
        print(f"{side} ...", file=sys.stderr)
        results["baselines"][side] = import_baseline(side, imports[side], logs / f"{side}-imports.log", env)
        results["runs"][side] = run_side(side, base, adapter, outputs[side], logs, env)
    results["load_after"] = load_average()
    if own_peak_rss() >= min(r.peak_rss for r in results["baselines"].values()):
        sys.exit("this process grew above a child's figure; the RSS figures are not per-child.")
    verify_command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--role",
        "verify",
        str(base),
        str(adapter),
        str(outputs["surgeon"]),
        str(outputs["users"]),
        str(args.layers),
    ]
    check = subprocess.run(verify_command, capture_output=True, text=True, check=True, env=env)
    results["check"] = json.loads(check.stdout.strip().splitlines()[-1])
    results["sides"] = {side: summarize([results["runs"][side]], [results["baselines"][side]]) for side in imports}
    s, u = results["sides"]["surgeon"], results["sides"]["users"]
    results["ratios"] = {"wall": s["wall_s"] / u["wall_s"], "working_memory": s["working_memory"] / u["working_memory"]}
    results["runs"] = {k: v.as_dict() for k, v in results["runs"].items()}
    results["baselines"] = {k: v.as_dict() for k, v in results["baselines"].items()}
    tidy(work, outputs.values(), args.keep)
    print(json.dumps(results, indent=2) if args.json else report(results))


if __name__ == "__main__":
    main()
