"""``surgeon extract``: a LoRA adapter (and a sparse residual) from a full fine-tune."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import click

from surgeon.choices import EMBEDDING_CHOICES, SVD_METHODS
from surgeon.cli.common import (
    DEVICE_OPTION,
    FORCE_OPTION,
    INPUT,
    JSON_OPTION,
    OUTPUT_OPTION,
    OutputPath,
    Progress,
    dtype_option,
    emit,
    friendly,
    provenance,
    rank_options,
    rank_rule,
)


@click.command(short_help="Extract a LoRA (and a sparse residual) from a full fine-tune.")
@click.argument("base", type=INPUT)
@click.argument("tuned", type=INPUT)
@OUTPUT_OPTION
@rank_options
@click.option(
    "--sparse-density",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Also keep this fraction of each residual's largest entries, written to OUTPUT/sparse/.",
)
@click.option(
    "--embeddings",
    type=click.Choice(EMBEDDING_CHOICES),
    default="auto",
    show_default=True,
    help="Embeddings and lm_head: factor like the rest (auto: unless tied to the output head, which an "
    "adapter cannot carry), leave out (listed in the report), or keep whole.",
)
@click.option(
    "--keep-changed-1d/--skip-changed-1d",
    default=True,
    show_default=True,
    help="Keep changed norms and biases as whole replacements (PEFT modules_to_save), or leave them out.",
)
@click.option("--include", multiple=True, help="Only base keys matching this regex (repeatable).")
@click.option("--exclude", multiple=True, help="Leave out base keys matching this regex (repeatable).")
@click.option(
    "--method",
    type=click.Choice(SVD_METHODS),
    default="auto",
    show_default=True,
    help="SVD method. auto: randomized (block Krylov) for a fixed rank up to 1/8 of the matrix's smaller "
    "side, else gram (eigen of the Gram matrix); exact: a full SVD, slowest, for checking.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp64"]),
    default="fp32",
    show_default=True,
    help="Precision of the delta and its SVD.",
)
@click.option(
    "--split",
    type=click.Choice(["balanced", "up", "down"]),
    default="balanced",
    show_default=True,
    help="Where the singular values go: √S on each factor, all in up (lora_B), or all in down (lora_A).",
)
@click.option(
    "--alpha",
    type=float,
    default=None,
    help="lora_alpha to write (default: equal to each module's rank, so the scale is 1).",
)
@dtype_option("dtype of the factors; auto: the tuned checkpoint's.")
@DEVICE_OPTION
@click.option(
    "--report",
    "report_path",
    type=OutputPath(file=True),
    default=None,
    help="Write the full per-module report as JSON here.",
)
@click.option(
    "--plot",
    "plot_path",
    type=OutputPath(file=True),
    default=None,
    help="Draw the normalised singular-value spectra to this PNG (needs the plot extra).",
)
@FORCE_OPTION
@JSON_OPTION
@friendly
def extract(
    base,
    tuned,
    output,
    rank,
    energy,
    max_error,
    min_rank,
    max_rank,
    sparse_density,
    embeddings,
    keep_changed_1d,
    include,
    exclude,
    method,
    precision,
    split,
    alpha,
    dtype,
    device,
    report_path,
    plot_path,
    force,
    as_json,
) -> None:
    """Extract a LoRA adapter from a full fine-tune: ΔW = TUNED − BASE, factored per module.

    Give exactly one of --rank, --energy or --max-error: the same rank everywhere, or each
    module's smallest rank that keeps that much of its spectrum or stays under that error.

    Every 2-D (and, flattened, 4-D conv) weight that changed is factored by truncated SVD and
    written as a PEFT adapter to OUTPUT, with rank_pattern/alpha_pattern when the ranks differ.
    With --sparse-density the largest entries of each residual go to OUTPUT/sparse/ (surgeon's
    sparse diff), which merge applies after the LoRA. With --rank 0 OUTPUT is a pure sparse diff.
    Every changed tensor that is not extracted is listed in the report with its delta norm.

    \b
    Examples:
      surgeon extract base/ tuned/ -o adapter/ --rank 64
      surgeon extract base/ tuned/ -o adapter/ --energy 0.9 --max-rank 256 --report report.json
      surgeon extract base/ tuned/ -o adapter/ --rank 32 --sparse-density 0.001
      surgeon merge base/ adapter/ adapter/sparse -o merged/     # LoRA, then the residual
      surgeon extract base/ tuned/ -o diff/ --rank 0 --sparse-density 0.01
    """
    from surgeon.recognise import refuse_adapter_for_checkpoint

    refuse_adapter_for_checkpoint(base, "BASE")  # before torch is imported: these answer at once
    refuse_adapter_for_checkpoint(tuned, "TUNED")
    rule = rank_rule(rank, energy, max_error, min_rank, max_rank, required=True)
    import torch

    from surgeon.bundle import write_parts
    from surgeon.checkpoint import Checkpoint
    from surgeon.ops.extract import ExtractOptions
    from surgeon.ops.extract import extract as extract_op
    from surgeon.ops.merge import DTYPES, resolve_device
    from surgeon.output import atomic_output, claimed
    from surgeon.plot import check_plot, plot_spectra

    options = ExtractOptions(
        rule=rule,
        method=method,
        precision=torch.float64 if precision == "fp64" else torch.float32,
        split=split,
        alpha=alpha,
        sparse_density=sparse_density,
        embeddings=embeddings,
        keep_changed_1d=keep_changed_1d,
        include=include,
        exclude=exclude,
        factor_dtype=DTYPES.get(dtype),
        device=resolve_device(device),
    )
    if plot_path is not None:
        check_plot(plot_path, report_path)
    base_ckpt, tuned_ckpt = Checkpoint(base), Checkpoint(tuned)
    inputs = [Path(base), Path(tuned)]
    with ExitStack() as held:  # the report and plot are claimed (checked, locked) now, not after the work
        for path in filter(None, (report_path, plot_path)):
            held.enter_context(claimed(path, inputs=[*inputs, output], force=force, directory=False))
        with atomic_output(output, inputs=inputs, force=force) as staging:
            with Progress(len(base_ckpt), "extract") as tick:
                result = extract_op(base_ckpt, tuned_ckpt, options, on_tensor=tick, keep_spectra=plot_path is not None)
            result.lora.metadata.update(provenance())
            result.sparse.metadata.update(provenance())
            written = write_parts(result.lora, result.sparse, staging, output, base=base_ckpt)
        report = {
            "base": str(base),
            "tuned": str(tuned),
            "output": str(output),
            "written": written,
            "merge_command": f"surgeon merge {base} {' '.join(written)} -o merged/",
            **result.report(),
        }
        if report_path is not None:
            with atomic_output(report_path, inputs=inputs, force=force, directory=False) as staged:
                staged.write_text(json.dumps(report, indent=2) + "\n")
        if plot_path is not None:
            with atomic_output(plot_path, inputs=inputs, force=force, directory=False) as staged:
                plot_spectra(result, staged, plot_path.suffix[1:] or "png")
    emit(report, as_json, render(report))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(report: dict) -> str:
    """The printed table: one line per changed tensor, then totals."""
    rows = report["modules"]
    width = min(60, max([len(r["key"]) for r in rows] + [6]))
    lines = [
        f"{'tensor':<{width}} {'action':<8} {'type':<9} {'rank':>5} {'energy':>7} {'rel.err':>8} {'+sparse':>8} "
        f"{'params':>10}"
    ]
    for r in rows:
        key = r["key"] if len(r["key"]) <= width else "…" + r["key"][-(width - 1) :]
        lines.append(
            f"{key:<{width}} {r['action']:<8} {r['module_type']:<9} {r['rank']:>5} {_fmt(r['energy_kept'], '.4f'):>7} "
            f"{_fmt(r['relative_error'], '.2e'):>8} {_fmt(r['relative_error_with_sparse'], '.2e'):>8} "
            f"{r['params']:>10,}" + (f"  ({r['reason']})" if r["reason"] else "")
        )
    rank = report["rank"]
    ranks = (
        "-"
        if rank is None
        else (
            f"{rank['min']}" if rank["min"] == rank["max"] else f"{rank['min']}–{rank['max']} (mean {rank['mean']:.1f})"
        )
    )
    ratio = report["adapter_bytes"] / report["full_delta_bytes"] if report["full_delta_bytes"] else 0.0
    lines += [
        "",
        f"{report['changed']} of {report['tensors']} tensors changed: {report['targets']} extracted (rank {ranks}), "
        f"{report['replaced']} kept whole, {report['skipped']} skipped"
        + (
            f"; {len(report['one_sided'])} non-float tensors in one checkpoint only left out."
            if report["one_sided"]
            else "."
        ),
        *_left_out_line(report),
        f"relative error: mean {_fmt(report['mean_relative_error'], '.3e')}, max "
        f"{_fmt(report['max_relative_error'], '.3e')}; "
        f"adapter {report['adapter_bytes'] / 1e6:.2f} MB = {ratio:.1%} of the full delta "
        f"({report['full_delta_bytes'] / 1e6:.2f} MB); "
        f"{report['seconds']:.2f}s.",
        f"written: {', '.join(report['written'])}; merge with: {report['merge_command']}",
    ]
    return "\n".join(lines)


def _left_out_line(report: dict) -> list[str]:
    left = report["left_out"]
    if not left:
        return []
    shown = ", ".join(f"{r['key']} ({r['reason']})" for r in left[:3]) + (", ..." if len(left) > 3 else "")
    share = report["left_out_share"]
    return [f"left out {len(left)} changed tensors, {share:.2%} of the total squared change: {shown}."]
