"""``surgeon inspect``: what a path is, summarised."""

from __future__ import annotations

from pathlib import Path

import click

from surgeon.cli.common import FROM_OPTION, INPUT, JSON_OPTION, emit, friendly


@click.command(short_help="Say what a path is (adapter and format, or checkpoint) and summarise it.")
@click.argument("path", type=INPUT)
@click.option(
    "--base", type=INPUT, default=None, help="The base checkpoint, for formats only it resolves (kohya, LyCORIS, GGUF)."
)
@FROM_OPTION
@JSON_OPTION
@friendly
def inspect(path: Path, base: Path | None, format_name: str | None, as_json: bool) -> None:
    """Say what PATH is (an adapter and its format, or a checkpoint) and summarise it.

    For an adapter: format, rank, alpha, scale, targets grouped by layer, parameters and bytes.
    For a checkpoint: files, tensors, parameters, dtypes and architecture. A safetensors
    checkpoint or PEFT LoRA adapter is summarised from its header alone, in milliseconds.

    \b
    Examples:
      surgeon inspect fixtures/tiny-llama-lora
      surgeon inspect my_lora.safetensors --base sd15/unet --json
    """
    from surgeon.summary import render, summarise

    summary = summarise(path, format_name, base)
    emit(summary, as_json, render(summary))
