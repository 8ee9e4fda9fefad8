"""``surgeon convert``: an adapter from one format to another (the work is :mod:`surgeon.convert`)."""

from __future__ import annotations

from pathlib import Path

import click

from surgeon.cli.common import FORCE_OPTION, FROM_OPTION, INPUT, JSON_OPTION, OutputPath, emit, friendly
from surgeon.errors import SurgeonError
from surgeon.formats import FORMATS, writers


def _render(report: dict) -> str:
    lines = [
        f"converted {report['source']} ({report['from']}, {report['targets']} targets) -> "
        f"{report['output']} ({report['to']}) in {report['seconds']:.2f}s"
    ]
    if report["check"] is not None:
        lines.append(
            f"read back and compared: max relative ΔW error {report['check']['max_relative_error']:.3g} (on random "
            "probes)"
        )
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


@click.command(short_help="Convert an adapter to another format; the result is read back and checked.")
@click.argument("source", type=INPUT)
@click.option("--to", "target_format", required=True, type=click.Choice(writers()), help="Format to write.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=OutputPath(),
    help="Output file (gguf, ort, kohya, diffusers) or directory (peft, mlx, sparse); written atomically.",
)
@click.option(
    "--base",
    "base_path",
    type=INPUT,
    default=None,
    help="The base model's checkpoint: checks names and shapes; needed to read kohya and LyCORIS names "
    "and to write gguf.",
)
@FROM_OPTION
@FORCE_OPTION
@JSON_OPTION
@friendly
def convert(
    source: Path,
    target_format: str,
    output: Path,
    base_path: Path | None,
    format_name: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Convert the adapter SOURCE to another format (--to), writing -o.

    The format of SOURCE is detected from its layout (--from overrides). Every conversion goes
    through surgeon's canonical deltas, and the written adapter is read back and compared with
    SOURCE, target by target, before it is put in place (for kohya and LyCORIS names, only
    when --base is given: only the base resolves them). Where the target format cannot hold
    the adapter as it is (one scale for all modules, one rank, no metadata), the change made
    is listed as a note; what it cannot represent at all (DoRA in GGUF) is refused.

    \b
    Examples:
      surgeon convert fixtures/tiny-llama-lora --to mlx -o out/mlx-adapter
      surgeon convert fixtures/tiny-llama-lora --to gguf --base fixtures/tiny-llama -o out/adapter.gguf
      surgeon convert fixtures/tiny-llama-lora --to ort -o out/adapter.onnx_adapter
      surgeon convert out/mlx-adapter --to peft -o out/peft-adapter --json
    """
    target = FORMATS[target_format]
    if target.write_needs_base and base_path is None:
        raise SurgeonError(
            f"--to {target_format} needs --base, the base model's checkpoint directory (config.json beside "
            "the weights): its tensor names and head counts come from there."
        )
    target.check_output(output)
    from surgeon.convert import convert_adapter

    report = convert_adapter(source, target_format, output, format_name, base_path, force)
    emit(report, as_json, _render(report))
