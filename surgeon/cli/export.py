"""``surgeon export-onnx``: a checkpoint (with adapters merged first, if given) to an ONNX graph that
has been checked against torch before it is called done."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from surgeon.choices import EXPORT_TASKS as TASKS
from surgeon.choices import EXPORTERS
from surgeon.cli.common import (
    DEVICE_OPTION,
    FORCE_OPTION,
    FROM_OPTION,
    INPUT,
    JSON_OPTION,
    OutputPath,
    Progress,
    emit,
    friendly,
    provenance,
    verbose_asked,
    weight_option,
)
from surgeon.errors import SurgeonError
from surgeon.summary import human_bytes


def _merged_copy(
    base: Path, adapters: tuple[Path, ...], weights, format_name, device: str, scratch: Path
) -> tuple[Path, Path | None]:
    """Merge the adapters into a scratch copy of the base, streaming as ``surgeon merge`` does; and
    the prefix-tuning adapter to trace with the model, if one is given."""
    from surgeon.checkpoint import Checkpoint
    from surgeon.onnx_export import split_adapters
    from surgeon.ops.merge import merge, resolve_device

    checkpoint = Checkpoint(base)
    loaded, loaded_weights, prefix = split_adapters(list(adapters), list(weights) or None, format_name, checkpoint)
    if not loaded:
        return base, prefix
    merged = scratch / "merged"
    merged.mkdir()
    with Progress(len(checkpoint), "merge") as tick:
        merge(checkpoint, loaded, merged, weights=loaded_weights, device=resolve_device(device), on_tensor=tick)
    return merged, prefix


def _text(report) -> str:
    lines = [
        f"exported {report.source}{' + ' + ', '.join(report.adapters) if report.adapters else ''} "
        f"({report.architecture}, {report.task} -> {report.graph_output}) with the {report.exporter} exporter, "
        f"opset {report.opset}, in {report.export_seconds:.1f}s -> {report.output} ({human_bytes(report.bytes)}"
        f"{', external data' if report.external_data else ''})"
    ]
    check = report.verification
    if check is None:
        lines.append("not verified (--no-verify)")
    else:
        shapes = ", ".join(f"{c['batch']}" + (f"x{c['sequence']}" if c["sequence"] else "") for c in check["cases"])
        padded = "one padded row each; " if check["cases"][0]["padded_row"] else ""
        lines.append(
            f"{'verified' if check['passed'] else 'FAILED verification'} against torch with {check['runtime']} on "
            f"batch{' x sequence' if check['cases'][0]['sequence'] else ''} "
            f"{shapes} ({padded}{check['compared_values']:,} compared values): max abs diff "
            f"{check['max_abs_diff']:.3g}, max relative diff {check['max_relative_diff']:.3g} (atol {check['atol']:g})"
        )
    return "\n".join(lines)


@click.command("export-onnx", short_help="Export a checkpoint (adapters merged in) to ONNX and verify it.")
@click.argument("checkpoint", type=INPUT)
@click.option(
    "-o",
    "--output",
    required=True,
    type=OutputPath(),  # a file, or the folder of a task of several graphs
    help="The .onnx file to write; weights over 2 GB go to OUTPUT.data beside it. For text2text-generation and "
    "automatic-speech-recognition, a folder: encoder_model.onnx, decoder_model.onnx and the model's config.",
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    type=INPUT,
    help="Merge this adapter into CHECKPOINT first (repeat for several; applied in order); a PEFT "
    "prefix-tuning adapter, or an AdapterHub bottleneck or prefix-tuning adapter, is traced into the graph with the "
    "model instead.",
)
@weight_option("Scale for each --adapter, in order (default 1).")
@click.option(
    "--task",
    type=click.Choice(list(TASKS)),
    default=None,
    help="What to export; default from config.json's architectures (causal LM -> logits, ViT classifier -> logits, "
    "CLIP -> one graph of text and image, T5/BART/Whisper -> encoder and decoder graphs).",
)
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's own; 17 for legacy).")
@click.option(
    "--exporter",
    type=click.Choice(EXPORTERS),
    default="auto",
    show_default=True,
    help="auto is dynamo (needs onnxscript), falling back to legacy (TorchScript) if dynamo fails.",
)
@click.option(
    "--atol",
    type=float,
    default=1e-4,
    show_default=True,
    help="Largest absolute difference between onnxruntime and torch that passes.",
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="Skip the onnxruntime-vs-torch check (the graph is still run through onnx.checker).",
)
@FROM_OPTION
@DEVICE_OPTION
@FORCE_OPTION
@JSON_OPTION
@friendly
def export_onnx(
    checkpoint, output, adapters, weights, task, opset, exporter, atol, no_verify, format_name, device, force, as_json
) -> None:
    """Export a transformers CHECKPOINT (or CHECKPOINT with --adapter merged in) to ONNX, and verify it.

    The model is built from the checkpoint's config.json by transformers (pip install
    '.[onnx]' in surgeon's checkout), exported in fp32 without KV cache, with dynamic batch and sequence
    axes, checked with onnx.checker, then run in onnxruntime and in torch on the same inputs
    (batch and sequence >= 2, one padded row): only unmasked positions are compared. Above --atol
    the command fails and leaves the graph as OUTPUT.unverified, never at OUTPUT. The command
    and its report are recorded in the graph's metadata_props.

    \b
    Examples:
      surgeon export-onnx merged/ -o merged.onnx
      surgeon export-onnx fixtures/tiny-llama --adapter fixtures/tiny-llama-lora -o merged.onnx
      surgeon export-onnx hf://google/vit-base-patch16-224 --adapter vit-lora -o vit.onnx
      surgeon export-onnx hf://google-t5/t5-small -o t5-onnx   (encoder_model.onnx, decoder_model.onnx)
      surgeon export-onnx hf://org/base --adapter hf://org/adapter -o model.onnx --json
    """
    from surgeon.onnx_export import TASKS as GRAPHS
    from surgeon.onnx_export import export, resolve_task
    from surgeon.output import check_destination, claimed, scratch_beside

    folder = GRAPHS[resolve_task(checkpoint, output, task)].folder
    check_destination(output, [checkpoint, *adapters], force, directory=folder)
    options = dict(
        task=task,
        opset=opset,
        exporter=exporter,
        atol=atol,
        check=not no_verify,
        force=force,
        provenance=provenance(),
        adapters=[str(a) for a in adapters],
        verbose=verbose_asked(),
    )
    if adapters:
        with (
            claimed(output, inputs=[checkpoint, *adapters], force=force, directory=folder),
            scratch_beside(output) as scratch,
        ):
            merged, prefix = _merged_copy(checkpoint, adapters, weights, format_name, device, scratch)
            report = export(merged, output, prefix=prefix, **options)
    elif weights:
        raise SurgeonError("--weight scales an --adapter; give it only together with --adapter.")
    else:
        report = export(checkpoint, output, **options)
    report.source = str(checkpoint)
    emit(asdict(report), as_json, _text(report))
    if report.verified is False:
        check = report.verification
        raise SurgeonError(
            f"{output}: onnxruntime and torch differ by up to {check['max_abs_diff']:.3g} at unmasked positions, above "
            "--atol "
            f"{atol:g}; the graph is kept as {report.output} for inspection, not at {output}."
        )
