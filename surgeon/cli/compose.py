"""``surgeon compose`` and ``surgeon resize``: adapter arithmetic on files (see docs/compose.md)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click

from surgeon.choices import COMPOSE_METHODS as METHODS
from surgeon.choices import RESULT_KINDS
from surgeon.cli.common import (
    BASE_FOR_NAMES_OPTION,
    DEVICE_OPTION,
    FORCE_OPTION,
    FROM_OPTION,
    INPUT,
    JSON_OPTION,
    NONFINITE_OPTION,
    OUTPUT_OPTION,
    SHARD_OPTION,
    Progress,
    dtype_option,
    emit,
    friendly,
    provenance,
    rank_options,
    rank_rule,
    weight_option,
)
from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    from surgeon.ops.compose import ComposeReport


def _summary(report: ComposeReport) -> str:
    ranks = sorted({m.rank for m in report.modules if m.rank is not None})
    rank_text = (
        f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}" if ranks else "no low-rank part"
    )
    error = (
        f", max relative error {report.max_relative_error:.3g}" if any(m.relative_error for m in report.modules) else ""
    )
    return f"{len(report.modules)} modules, {rank_text}{error}, in {report.seconds:.2f}s -> {report.output}"


def _report_dict(report: ComposeReport, written: list[str]) -> dict:
    return {**asdict(report), "max_relative_error": report.max_relative_error, "written": written}


@click.command(short_help="Combine adapters: weighted sums, their best low rank, TIES, DARE.")
@click.argument("adapters", nargs=-1, required=True, type=INPUT)
@OUTPUT_OPTION
@weight_option("Weight of each adapter, in order (repeat once per adapter; default 1; negative subtracts).")
@click.option(
    "--method", type=click.Choice(METHODS), default="cat", show_default=True, help="How to combine; see above."
)
@click.option(
    "--negate", is_flag=True, help="Multiply every weight by -1 (task negation: `compose A --negate` undoes A)."
)
@rank_options
@click.option(
    "--density", type=float, default=None, help="ties, dare_*, magnitude_prune: fraction of each delta's entries kept."
)
@click.option(
    "--majority-sign",
    type=click.Choice(["total", "frequency"]),
    default="total",
    show_default=True,
    help="ties, dare_ties: elect each entry's sign by total mass or by count.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="dare_*: seed of the random drop.")
@click.option(
    "--as",
    "keep",
    type=click.Choice(RESULT_KINDS),
    default="lora",
    show_default=True,
    help="ties, dare_*, magnitude_prune: keep the result as LoRA (factored to the rank), sparse, or dense (sparse "
    "format at density 1).",
)
@click.option(
    "--base",
    type=INPUT,
    default=None,
    help="The base checkpoint: resolves adapter names only it can (kohya, LyCORIS, GGUF); when ADAPTERS are "
    "full fine-tuned checkpoints, their deltas are merged into it and a full checkpoint is written.",
)
@dtype_option(
    "With full fine-tuned checkpoints and --base: output dtype of float tensors (nf4/fp4/int8: a bitsandbytes "
    "checkpoint).",
    ("nf4", "fp4", "int8"),
)
@DEVICE_OPTION
@SHARD_OPTION
@NONFINITE_OPTION
@FROM_OPTION
@FORCE_OPTION
@JSON_OPTION
@friendly
def compose(
    adapters,
    output,
    weights,
    method,
    negate,
    rank,
    energy,
    max_error,
    min_rank,
    max_rank,
    density,
    majority_sign,
    seed,
    keep,
    base,
    dtype,
    device,
    shard_size,
    allow_nonfinite,
    format_name,
    force,
    as_json,
) -> None:
    """Combine ADAPTERS (same base model) into one adapter, weighted by -w.

    \b
    Methods (ΔWᵢ is adapter i's delta, wᵢ its weight):
      cat              exact Σ wᵢ·ΔWᵢ: factors concatenated, rank Σ rᵢ (default)
      svd              best rank-R approximation of Σ wᵢ·ΔWᵢ (R by --rank/--energy/
                       --max-error; default the largest input rank), from the factors:
                       never forms the dense ΔW
      linear           PEFT's "linear": adds the A's and the B's separately (equal ranks).
                       NOT the sum of the deltas; kept for PEFT parity
      ties             trim each ΔWᵢ to --density by magnitude, elect a sign per entry,
                       average the agreeing wᵢ·ΔWᵢ (PEFT's ties_svd)
      dare_linear      drop entries at random keeping --density, rescale by 1/density, sum
      dare_ties        DARE drop and rescale, then TIES sign election
      magnitude_prune  trim each ΔWᵢ to --density by magnitude, then sum
    The last four act on each module's dense deltas, then factor back to rank R (--as lora),
    or keep the nonzeros (--as sparse) or every entry (--as dense). Sparse and dense inputs
    (sparse diffs) are summed exactly alongside the LoRA part by cat, svd and linear.
    Targets are unioned; adapters for different base models are refused (--force overrides).
    The LoRA part is written as PEFT at -o, a sparse part as surgeon's sparse diff in -o/sparse
    (apply both: surgeon merge BASE OUT OUT/sparse); a result with no LoRA part is a sparse diff.

    \b
    Examples:
      surgeon compose A B -w 0.7 -w 0.3 -o mix/                    # exact weighted sum
      surgeon compose A B --method svd --rank 32 -o mix32/
      surgeon compose A B --method ties --density 0.2 --rank 32 -o ties/
      surgeon compose A --negate -o forget/                        # task negation
      surgeon compose A diff/ --method cat -o mixed/               # LoRA + sparse diff
      surgeon compose --base BASE T1 T2 --method ties --density 0.2 -o merged/
    """
    weights = [-w for w in (weights or [1.0] * len(adapters))] if negate else list(weights)
    rule = rank_rule(rank, energy, max_error, min_rank, max_rank, required=False)
    from surgeon.ops.compose import ComposeOptions
    from surgeon.ops.merge import resolve_device

    options = ComposeOptions(
        method=method,
        rule=rule,
        density=density,
        majority_sign=majority_sign,
        seed=seed,
        keep=keep,
        device=resolve_device(device),
    )
    if _all_checkpoints(adapters, format_name):
        if base is None:
            raise SurgeonError(
                f"{adapters[0]}: a full model checkpoint; compose takes full fine-tunes only with --base, "
                "the checkpoint they were tuned from."
            )
        _compose_checkpoints(
            base, adapters, output, weights, options, force, as_json, dtype, shard_size, allow_nonfinite
        )
        return
    if dtype != "auto" or allow_nonfinite:
        raise SurgeonError(
            f"{'--dtype' if dtype != 'auto' else '--allow-nonfinite'} applies when composing full fine-tuned "
            "checkpoints with --base, not adapters."
        )
    from surgeon.bundle import write_result
    from surgeon.checkpoint import Checkpoint
    from surgeon.ops.compose import compose as compose_op
    from surgeon.ops.compose import read_adapters
    from surgeon.output import atomic_output

    base_ckpt = Checkpoint(base) if base is not None else None
    loaded = read_adapters(adapters, format_name, base=base_ckpt)
    inputs = [*adapters, *([base] if base is not None else [])]
    with atomic_output(output, inputs=inputs, force=force) as staging:
        with Progress(len({k for a, _ in loaded for k in a.deltas}), method) as tick:
            result, report = compose_op(loaded, weights or None, options, force=force, on_key=tick)
        result.metadata = provenance()
        written = write_result(result, staging, output, base=base_ckpt)
    report.output = " + ".join(written)
    emit(_report_dict(report, written), as_json, f"composed {len(adapters)} adapter(s) by {method}: {_summary(report)}")


def _all_checkpoints(paths: tuple[Path, ...], format_name: str | None) -> bool:
    """Whether PATHS are full fine-tunes (task arithmetic) rather than adapters; a mix is refused."""
    from surgeon import formats
    from surgeon.recognise import holds_weights, not_an_adapter

    adapters = [p for p in paths if format_name or formats.detect(p) is not None]
    stray = next((p for p in paths if p not in adapters and not holds_weights(p)), None)
    if stray is not None:
        raise not_an_adapter(stray)
    if adapters and len(adapters) < len(paths):
        checkpoint = next(p for p in paths if p not in adapters)
        raise SurgeonError(
            f"{checkpoint}: is a full checkpoint while {adapters[0]} is an adapter; compose takes "
            "adapters, or full fine-tunes with --base, not both."
        )
    return not adapters


def _compose_checkpoints(
    base, tuned, output, weights, options, force, as_json, dtype: str, shard_size: str, allow_nonfinite: bool
) -> None:
    from surgeon.checkpoint import Checkpoint, parse_size
    from surgeon.ops.merge import DTYPES
    from surgeon.ops.quantized_output import encoder_for
    from surgeon.ops.task_arithmetic import task_arithmetic
    from surgeon.output import atomic_output

    checkpoint = Checkpoint(base)
    encoder = encoder_for(dtype, checkpoint)
    with atomic_output(output, inputs=[Path(base), *map(Path, tuned)], force=force) as staging:
        with Progress(len(checkpoint), options.method) as tick:
            report = task_arithmetic(
                checkpoint,
                [Checkpoint(t) for t in tuned],
                staging,
                weights or None,
                options,
                dtype=DTYPES.get(dtype),
                shard_size=parse_size(shard_size),
                allow_nonfinite=allow_nonfinite,
                on_tensor=tick,
                metadata=provenance(),
                encoder=encoder,
            )
    report.output = str(output)
    summary = asdict(report) | ({"quantization_error": encoder.total_error()} if encoder else {})
    emit(
        summary,
        as_json,
        f"merged {len(tuned)} fine-tune(s) by {options.method} into {report.changed} of "
        f"{report.tensors} tensors in {report.seconds:.2f}s -> {output}",
    )


@click.command(short_help="Change an adapter's rank by the optimal truncation of each ΔW.")
@click.argument("adapter", type=INPUT)
@OUTPUT_OPTION
@rank_options
@BASE_FOR_NAMES_OPTION
@DEVICE_OPTION
@FROM_OPTION
@FORCE_OPTION
@JSON_OPTION
@friendly
def resize(
    adapter, output, rank, energy, max_error, min_rank, max_rank, base, device, format_name, force, as_json
) -> None:
    """Change an ADAPTER's rank by the optimal (Eckart–Young) truncation of each module's ΔW.

    Give exactly one of --rank, --energy or --max-error. Any adapter surgeon reads is taken:
    LoHa, LoKr and (IA)³ deltas are factored to a LoRA (the route from them to LoRA formats).

    The SVD is computed from the factors (QR of each, SVD of the r×r core), so it is exact and
    fast at any model size. Shrinking loses the tail of each spectrum; the report gives each
    module's relative Frobenius error, which is exactly √(Σ_{i>r} σᵢ² / Σ σᵢ²). Growing past a
    module's rank adds nothing: its rank stays.

    \b
    Examples:
      surgeon resize A --rank 8 -o small/
      surgeon resize A --energy 0.95 --max-rank 64 -o small/
      surgeon resize A --max-error 0.02 -o small/ --json
    """
    rule = rank_rule(rank, energy, max_error, min_rank, max_rank, required=True)
    from surgeon.bundle import write_result
    from surgeon.checkpoint import Checkpoint
    from surgeon.ops.compose import read_adapters
    from surgeon.ops.compose import resize as resize_op
    from surgeon.ops.merge import resolve_device
    from surgeon.output import atomic_output

    base_ckpt = Checkpoint(base) if base is not None else None
    ((loaded, _),) = read_adapters([adapter], format_name, base=base_ckpt)
    with atomic_output(output, inputs=[adapter, *([base] if base is not None else [])], force=force) as staging:
        with Progress(len(loaded), "resize") as tick:
            result, report = resize_op(loaded, rule, resolve_device(device), on_key=tick)
        result.metadata = {**loaded.metadata, **provenance()}
        written = write_result(result, staging, output, base=base_ckpt)
    report.output = " + ".join(written)
    emit(_report_dict(report, written), as_json, f"resized {adapter}: {_summary(report)}")
