"""``surgeon merge`` and ``surgeon unmerge``: adapters into a checkpoint, and back off it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from surgeon.cli.common import (
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
    read_adapter_arg,
    weight_option,
)


def _transform_options(command, quantized: tuple[str, ...] = ()):
    """The options merge and unmerge share, in the order --help lists them (merge's --dtype also
    takes the ``quantized`` bitsandbytes kinds)."""
    for option in reversed(
        [
            dtype_option(
                "Output dtype of float tensors; auto keeps each tensor's own (a bitsandbytes base: its compute "
                "dtype, else bf16)." + (" nf4/fp4/int8: a bitsandbytes checkpoint." if quantized else ""),
                quantized,
            ),
            DEVICE_OPTION,
            SHARD_OPTION,
            FROM_OPTION,
            FORCE_OPTION,
            NONFINITE_OPTION,
            JSON_OPTION,
        ]
    ):
        command = option(command)
    return friendly(command)


def _answer_at_once(base: Path, adapters: tuple[Path, ...], format_name, shard_size: str, base_role: str) -> int:
    """The checks that need no torch, made before it is imported: swapped arguments and the shard
    size (in bytes, returned)."""
    from surgeon.checkpoint_files import parse_size
    from surgeon.recognise import refuse_swapped

    if format_name is None:
        refuse_swapped(base, list(adapters), base_role)
    return parse_size(shard_size)


def _run_transform(
    operation,
    base: Path,
    adapters: tuple[Path, ...],
    output: Path,
    weights,
    format_name,
    dtype,
    device,
    shard_bytes: int,
    force,
    allow_nonfinite,
    also_read: tuple[Path, ...] = (),
    **extra,
):
    from surgeon.checkpoint import Checkpoint
    from surgeon.ops.merge import DTYPES, resolve_device
    from surgeon.output import atomic_output

    checkpoint = Checkpoint(base)
    loaded = [(read_adapter_arg(a, format_name, base=checkpoint), str(a)) for a in adapters]
    device_obj = resolve_device(device)
    with atomic_output(output, inputs=[base, *adapters, *also_read], force=force) as staging:
        with Progress(len(checkpoint), operation.__name__) as tick:
            report = operation(
                checkpoint,
                loaded,
                staging,
                weights=list(weights) or None,
                allow_nonfinite=allow_nonfinite,
                dtype=DTYPES.get(dtype),
                device=device_obj,
                shard_size=shard_bytes,
                on_tensor=tick,
                metadata=provenance(),
                **extra,
            )
    report.output = str(output)
    return report


@click.command(short_help="Merge adapters into a base checkpoint, writing a full checkpoint.")
@click.argument("base", type=INPUT)
@click.argument("adapters", nargs=-1, required=True, type=INPUT)
@OUTPUT_OPTION
@weight_option("Scale for each adapter, in order (repeat once per adapter; default 1).")
@click.option(
    "--untie",
    is_flag=True,
    help="Where a changed embedding is tied to the output head, keep the head as "
    "it was (what PEFT computes unmerged) and write it untied, instead of letting it follow the embedding.",
)
@click.option(
    "--quantized-base",
    type=click.Choice(["nf4", "fp4"]),
    default=None,
    help="BASE is the 16-bit model a QLoRA adapter was trained on in 4 bits: merge into its weights as "
    "bitsandbytes quantizes them (the layers transformers quantizes).",
)
@click.option(
    "--double-quant", is_flag=True, help="With --quantized-base or --dtype nf4/fp4: bnb_4bit_use_double_quant."
)
@click.option(
    "--blocksize",
    type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]),
    default="64",
    show_default=True,
    help="With --quantized-base or --dtype nf4/fp4: the 4-bit blocksize.",
)
@click.option(
    "--report",
    "qlora_report",
    is_flag=True,
    help="With --quantized-base: per module and in total, how far the result is from the model as trained "
    "and from the naive merge (relative Frobenius distances).",
)
@click.option(
    "--probe",
    "qlora_probe",
    is_flag=True,
    help="With --quantized-base: run the model (built by transformers, held in fp32) on a few fixed tokens "
    "and print the max logit difference from the model as trained, and the naive merge's.",
)
@lambda command: _transform_options(command, quantized=("nf4", "fp4", "int8"))
def merge(
    base,
    adapters,
    output,
    weights,
    untie,
    quantized_base,
    double_quant,
    blocksize,
    qlora_report,
    qlora_probe,
    dtype,
    device,
    shard_size,
    format_name,
    force,
    allow_nonfinite,
    as_json,
) -> None:
    """Merge ADAPTERS into the BASE checkpoint and write a full checkpoint to -o.

    Each merged weight is computed in fp32 and cast back to the base's dtype (or --dtype).
    Adapters apply in the order given. Every target is checked against the base (name and
    shape) before anything is written; config and tokenizer files are copied along.

    \b
    Examples:
      surgeon merge fixtures/tiny-llama fixtures/tiny-llama-lora -o out/merged
      surgeon merge BASE QLORA_ADAPTER -o out/merged --quantized-base nf4 --double-quant --report
      surgeon merge BASE ADAPTER -o out/merged-nf4 --dtype nf4 --double-quant
    """
    shard_bytes = _answer_at_once(base, adapters, format_name, shard_size, "BASE")
    from surgeon.ops.merge import merge as merge_op
    from surgeon.ops.qlora import describe, merge_operation

    operation = (
        merge_operation(quantized_base, double_quant, int(blocksize), qlora_report, qlora_probe, dtype) or merge_op
    )
    report = _run_transform(
        operation,
        base,
        adapters,
        output,
        weights,
        format_name,
        dtype,
        device,
        shard_bytes,
        force,
        allow_nonfinite,
        untie=untie,
    )
    emit(
        asdict(report),
        as_json,
        f"merged {len(adapters)} adapter(s) into {report.changed} of {report.tensors} tensors "
        f"in {report.seconds:.2f}s -> {output}"
        + "".join(f"\nnote: {note}" for note in report.notes)
        + describe(report),
    )


def _check_against(report: dict, output: Path, check_base: Path) -> str:
    """Add how far the restored checkpoint is from the real base to ``report``; the text line."""
    from surgeon.checkpoint import Checkpoint
    from surgeon.ops.merge import compare

    differences = compare(Checkpoint(output), Checkpoint(check_base))
    worst = max(differences, key=lambda d: d.max_abs)
    report["check"] = {
        "base": str(check_base),
        "max_abs_error": worst.max_abs,
        "max_abs_error_key": worst.key,
        "max_relative_error": max(d.relative for d in differences),
    }
    return (
        f"\ncheck against {check_base}: max abs error {worst.max_abs:.3g} (in {worst.key}), "
        f"max relative error {report['check']['max_relative_error']:.3g}"
    )


@click.command(short_help="Subtract adapters from a merged checkpoint, recovering the base.")
@click.argument("merged", type=INPUT)
@click.argument("adapters", nargs=-1, required=True, type=INPUT)
@OUTPUT_OPTION
@weight_option("The weights the adapters were merged with.")
@click.option(
    "--check",
    "check_base",
    type=INPUT,
    default=None,
    help="The real base: report how far the restored checkpoint is from it (refused before anything is written "
    "when its tensors differ).",
)
@_transform_options
def unmerge(
    merged,
    adapters,
    output,
    weights,
    check_base,
    dtype,
    device,
    shard_size,
    format_name,
    force,
    allow_nonfinite,
    as_json,
) -> None:
    """Subtract ADAPTERS from a MERGED checkpoint, recovering the base: the inverse of merge.

    DoRA updates and whole-module replacements (modules_to_save) cannot be undone from a merged
    file, and are refused with the reason. Restoring a low-precision (bf16) checkpoint is exact
    only up to that precision's round-off; --check BASE measures it.

    \b
    Example:
      surgeon unmerge out/merged fixtures/tiny-llama-lora -o out/restored --check fixtures/tiny-llama
    """
    shard_bytes = _answer_at_once(merged, adapters, format_name, shard_size, "MERGED")
    from surgeon.checkpoint import Checkpoint
    from surgeon.ops.merge import unmerge as unmerge_op

    # the restored checkpoint must be the real base's model: refused before anything is written
    check = Checkpoint(check_base) if check_base else None
    report = asdict(
        _run_transform(
            unmerge_op,
            merged,
            adapters,
            output,
            weights,
            format_name,
            dtype,
            device,
            shard_bytes,
            force,
            allow_nonfinite,
            also_read=(check_base,) if check_base else (),
            check=check,
        )
    )
    text = (
        f"unmerged {len(adapters)} adapter(s) from {report['changed']} of {report['tensors']} tensors "
        f"in {report['seconds']:.2f}s -> {output}"
    )
    if check_base:
        text += _check_against(report, output, check_base)
    emit(report, as_json, text)
