"""``surgeon compose`` and ``surgeon resize``: adapter arithmetic on files (see docs/compose.md)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from surgeon.cli import (DEVICE_OPTION, FORCE_OPTION, FROM_OPTION, INPUT, JSON_OPTION, OUTPUT_OPTION, SHARD_OPTION,
                         Progress, emit, friendly, main, provenance, read_adapter_arg)
from surgeon.bundle import write_result
from surgeon.errors import SurgeonError
from surgeon.output import atomic_output
from surgeon.ops.compose import METHODS, RESULT_KINDS, ComposeOptions, ComposeReport
from surgeon.ops.rank import RankRule


def rank_options(command):
    """--rank / --energy / --max-error (one of them) and the clamps, for RankRule."""
    for option in reversed([
        click.option("--rank", type=int, default=None, help="Output rank of every module."),
        click.option("--energy", type=float, default=None, help="Per module, the smallest rank keeping this fraction of Σσ² (e.g. 0.95)."),
        click.option("--max-error", type=float, default=None, help="Per module, the smallest rank whose relative Frobenius error is at most this (e.g. 0.02)."),
        click.option("--min-rank", type=int, default=1, show_default=True, help="Lower bound for --energy / --max-error."),
        click.option("--max-rank", type=int, default=None, help="Upper bound on every module's rank."),
    ]):
        command = option(command)
    return command


def rank_rule(rank, energy, max_error, min_rank, max_rank, required: bool) -> RankRule | None:
    if not required and rank is None and energy is None and max_error is None:
        if max_rank is not None:
            raise SurgeonError("--max-rank bounds --energy or --max-error; give one of them, or --rank.")
        return None
    return RankRule(rank=rank, energy=energy, max_error=max_error, min_rank=min_rank, max_rank=max_rank)


def _summary(report: ComposeReport) -> str:
    ranks = sorted({m.rank for m in report.modules if m.rank is not None})
    rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}" if ranks else "no low-rank part"
    error = f", max relative error {report.max_relative_error:.3g}" if any(m.relative_error for m in report.modules) else ""
    return f"{len(report.modules)} modules, {rank_text}{error}, in {report.seconds:.2f}s -> {report.output}"


def _report_dict(report: ComposeReport, written: list[str]) -> dict:
    return {**asdict(report), "max_relative_error": report.max_relative_error, "written": written}


@main.command()
@click.argument("adapters", nargs=-1, required=True, type=INPUT)
@OUTPUT_OPTION
@click.option("-w", "--weight", "weights", multiple=True, type=float, help="Weight of each adapter, in order (repeat once per adapter; default 1; negative subtracts).")
@click.option("--method", type=click.Choice(METHODS), default="cat", show_default=True, help="How to combine; see above.")
@click.option("--negate", is_flag=True, help="Multiply every weight by -1 (task negation: `compose A --negate` undoes A).")
@rank_options
@click.option("--density", type=float, default=None, help="ties, dare_*, magnitude_prune: fraction of each delta's entries kept.")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True, help="ties, dare_ties: elect each entry's sign by total mass or by count.")
@click.option("--seed", type=int, default=0, show_default=True, help="dare_*: seed of the random drop.")
@click.option("--as", "keep", type=click.Choice(RESULT_KINDS), default="lora", show_default=True, help="ties, dare_*, magnitude_prune: keep the result as LoRA (factored to the rank), sparse, or dense (sparse format at density 1).")
@click.option("--base", type=INPUT, default=None, help="The base checkpoint, when ADAPTERS are full fine-tuned checkpoints: merge their deltas and write a full checkpoint.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True, help="With --base: output dtype of float tensors.")
@DEVICE_OPTION
@SHARD_OPTION
@FROM_OPTION
@FORCE_OPTION
@JSON_OPTION
@friendly
def compose(adapters, output, weights, method, negate, rank, energy, max_error, min_rank, max_rank, density, majority_sign,
            seed, keep, base, dtype, device, shard_size, format_name, force, as_json) -> None:
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
    from surgeon.ops.merge import resolve_device

    options = ComposeOptions(method=method, rule=rule, density=density, majority_sign=majority_sign, seed=seed, keep=keep,
                             device=resolve_device(device))
    if base is not None:
        _compose_checkpoints(base, adapters, output, weights, options, dtype, shard_size, force, as_json)
        return
    if dtype != "auto":
        raise SurgeonError("--dtype applies with --base; composed adapters keep their inputs' dtype.")
    from surgeon.ops.compose import compose as compose_op

    loaded = [(read_adapter_arg(a, format_name), str(a)) for a in adapters]
    with atomic_output(output, inputs=map(Path, adapters), force=force) as staging:
        with Progress(len({k for a, _ in loaded for k in a.deltas}), method) as tick:
            result, report = compose_op(loaded, weights or None, options, force=force, on_key=tick)
        result.metadata = provenance()
        written = write_result(result, staging, output)
    report.output = " + ".join(written)
    emit(_report_dict(report, written), as_json, f"composed {len(adapters)} adapter(s) by {method}: {_summary(report)}")


def _compose_checkpoints(base, tuned, output, weights, options, dtype, shard_size, force, as_json) -> None:
    from surgeon.checkpoint import Checkpoint, parse_size
    from surgeon.ops.merge import DTYPES
    from surgeon.ops.task_arithmetic import task_arithmetic

    from surgeon import formats

    for path in tuned:
        if formats.detect(path) is not None:
            raise SurgeonError(f"{path}: is an adapter, but --base takes full fine-tuned checkpoints; drop --base to compose adapters.")
    checkpoint = Checkpoint(base)
    with atomic_output(output, inputs=[Path(base), *map(Path, tuned)], force=force) as staging:
        with Progress(len(checkpoint), options.method) as tick:
            report = task_arithmetic(checkpoint, [Checkpoint(t) for t in tuned], staging, weights or None, options,
                                     dtype=None if dtype == "auto" else DTYPES[dtype], shard_size=parse_size(shard_size),
                                     on_tensor=tick, metadata=provenance())
    report.output = str(output)
    emit(asdict(report), as_json, f"merged {len(tuned)} fine-tune(s) by {options.method} into {report.changed} of "
         f"{report.tensors} tensors in {report.seconds:.2f}s -> {output}")


@main.command()
@click.argument("adapter", type=INPUT)
@OUTPUT_OPTION
@rank_options
@DEVICE_OPTION
@FROM_OPTION
@FORCE_OPTION
@JSON_OPTION
@friendly
def resize(adapter, output, rank, energy, max_error, min_rank, max_rank, device, format_name, force, as_json) -> None:
    """Change an ADAPTER's rank by the optimal (Eckart–Young) truncation of each module's ΔW.

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
    from surgeon.ops.compose import resize as resize_op
    from surgeon.ops.merge import resolve_device

    rule = rank_rule(rank, energy, max_error, min_rank, max_rank, required=True)
    loaded = read_adapter_arg(adapter, format_name)
    with atomic_output(output, inputs=[Path(adapter)], force=force) as staging:
        with Progress(len(loaded), "resize") as tick:
            result, report = resize_op(loaded, rule, resolve_device(device), on_key=tick)
        result.metadata = {**loaded.metadata, **provenance()}
        written = write_result(result, staging, output)
    report.output = " + ".join(written)
    emit(_report_dict(report, written), as_json, f"resized {adapter}: {_summary(report)}")
