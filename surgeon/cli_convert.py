"""``surgeon convert``: read an adapter in one format and write it in another, through the
canonical model. The written file is read back and compared with the source before it is put in
place, so a conversion either reproduces every ΔW or leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

import click

from surgeon.cli import FORCE_OPTION, FROM_OPTION, INPUT, JSON_OPTION, emit, friendly, main
from surgeon.convert import convert_adapter
from surgeon.formats import writers

def _render(report: dict) -> str:
    lines = [
        f"converted {report['source']} ({report['from']}, {report['targets']} targets) -> "
        f"{report['output']} ({report['to']}) in {report['seconds']:.2f}s"
    ]
    if report["check"] is not None:
        lines.append(f"read back and compared: max relative ΔW error {report['check']['max_relative_error']:.3g} (on random probes)")
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


@main.command()
@click.argument("source", type=INPUT)
@click.option("--to", "target_format", required=True, type=click.Choice(writers()), help="Format to write.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output file or directory, as the target format has it; written atomically.")
@click.option("--base", "base_path", type=INPUT, default=None,
              help="The base model's checkpoint: checks names and shapes, and is required where a format takes names or head counts from it (gguf, kohya).")
@FROM_OPTION
@FORCE_OPTION
@JSON_OPTION
@friendly
def convert(source: Path, target_format: str, output: Path, base_path: Path | None, format_name: str | None, force: bool, as_json: bool) -> None:
    """Convert the adapter SOURCE to another format (--to), writing -o.

    The format of SOURCE is detected from its layout (--from overrides). Every conversion goes
    through surgeon's canonical deltas, and the written adapter is read back and compared with
    SOURCE, target by target, before it is put in place (for kohya and LyCORIS names, only
    when --base is given: only the base resolves them). Where the target format cannot hold
    the adapter as it is (one scale for all modules, one rank, no metadata), the change made
    is listed as a note; what it cannot represent at all (DoRA in GGUF) is refused.

    \b
    Examples:
      surgeon convert fixtures/tiny-llama-lora --to mlx -o mlx_adapter/
      surgeon convert fixtures/tiny-llama-lora --to gguf --base fixtures/tiny-llama -o adapter.gguf
      surgeon convert fixtures/tiny-llama-lora --to ort -o adapter.onnx_adapter
      surgeon convert mlx_adapter/ --to peft -o peft_adapter/ --json
    """
    report = convert_adapter(source, target_format, output, format_name, base_path, force)
    emit(report, as_json, _render(report))
