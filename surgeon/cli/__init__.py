"""The ``surgeon`` command: a thin click layer over the library (:mod:`surgeon.ops`,
:mod:`surgeon.formats`, :mod:`surgeon.convert`, :mod:`surgeon.hub`).

One module per command group, each defining plain click commands that this module registers on
:data:`main`; none imports this module, so there is no import cycle. Command modules import torch
and the formats' readers inside the commands, after the arguments are checked: ``--help`` and
argument errors answer without them. User mistakes surface as one ``Error:`` line and exit code
1; progress goes to stderr so that ``--json`` output on stdout stays clean for pipelines.
"""

from __future__ import annotations

import os

import click

from surgeon import __version__
from surgeon.cli import compose, convert, export, extract, hub, inspect, transform


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="surgeon")
@click.option("-v", "--verbose", is_flag=True, help="Say more in errors (every format's detection rule, say).")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Checkpoint surgery for parameter-efficient fine-tuning, on saved checkpoints.

    Merge adapters into a base and take them back off, extract LoRA and sparse deltas from full
    fine-tunes, compose and resize adapters, convert between adapter formats (PEFT, kohya,
    diffusers, LyCORIS, mlx-lm, GGUF, ONNX Runtime), export to ONNX, and pull from and push to
    the Hugging Face Hub. Every command streams one tensor at a time and writes its output
    atomically: an interrupted run leaves nothing at the output path.

    \b
    Examples:
      surgeon inspect fixtures/tiny-llama-lora
      surgeon merge fixtures/tiny-llama fixtures/tiny-llama-lora -o out/merged
      surgeon extract fixtures/tiny-llama out/merged --rank 8 -o out/extracted
      surgeon convert fixtures/tiny-llama-lora --to mlx -o out/mlx-adapter
    """
    from surgeon.output import install_signal_cleanup

    # torch's OpenMP threads spin after each parallel operation (libgomp's default), taking the cores
    # from surgeon's own reader, writer and step threads: a QLoRA merge on 2 cores spent a quarter of
    # its CPU time spinning. torch is not imported yet, so its OpenMP runtime reads this when it loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ctx.obj = {"verbose": verbose}
    install_signal_cleanup()


for command in (
    inspect.inspect,
    transform.merge,
    transform.unmerge,
    extract.extract,
    compose.compose,
    compose.resize,
    convert.convert,
    export.export_onnx,
    hub.pull,
    hub.push,
):
    main.add_command(command)
