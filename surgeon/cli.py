"""The ``surgeon`` command: a thin click layer over :mod:`surgeon.ops` and :mod:`surgeon.formats`.

User mistakes surface as one ``Error:`` line and exit code 1; progress goes to stderr so that
``--json`` output on stdout stays clean for pipelines.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import click

from surgeon import __version__
from surgeon.checkpoint import Checkpoint, parse_size
from surgeon.errors import SurgeonError, describe_os_error
from surgeon.output import atomic_output, install_signal_cleanup
from surgeon.summary import adapter_summary, checkpoint_summary, render


def friendly(command):
    """Turn SurgeonError, and an OSError (the path and why), into click's one-line error instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SurgeonError as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:
            raise click.ClickException(describe_os_error(error)) from None

    return wrapper


def emit(report: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(report, indent=2) if as_json else text)


def provenance() -> dict[str, str]:
    """How an output was made, for its metadata: surgeon's version and the command line."""
    return {"surgeon_version": __version__, "surgeon_command": shlex.join(["surgeon", *sys.argv[1:]])}


def read_adapter_arg(path: str | Path, format_name: str | None, base=None):
    from surgeon import formats

    return formats.read_adapter(Path(path), format_name, base=base)


class InputPath(click.ParamType):
    """A local path that must exist, or an ``hf://org/name[@revision][/subfolder]`` Hub path,
    fetched into the local cache (only the files surgeon needs) and given as its local path."""

    name = "PATH"

    def convert(self, value, param, ctx) -> Path:
        if isinstance(value, Path):
            return value
        if str(value).startswith("hf://"):
            from surgeon.hub import resolve_hf_path

            try:
                return resolve_hf_path(str(value))
            except SurgeonError as error:
                self.fail(str(error), param, ctx)
        path = Path(value)
        try:
            path.stat()
        except OSError as error:  # not only a missing path: a folder we may not enter, a link loop
            reason = "no such file or directory" if isinstance(error, FileNotFoundError) else error.strerror
            self.fail(f"{value}: {reason}.", param, ctx)
        return path


INPUT = InputPath()


class Progress:
    """A progress bar on stderr over a checkpoint's tensors; silent when stderr is not a terminal."""

    def __init__(self, total: int, label: str):
        self.bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, show_eta=True) if sys.stderr.isatty() else None

    def __enter__(self):
        if self.bar is None:
            return None
        self.bar.__enter__()
        return lambda key: self.bar.update(1)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc) if self.bar is not None else None


DEVICE_OPTION = click.option("--device", default="auto", show_default=True, help="Where the arithmetic runs: auto (CUDA when present), cpu, cuda or cuda:N.")
FORCE_OPTION = click.option("--force", is_flag=True, help="Replace the output if it exists (an input is never replaced).")
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
FROM_OPTION = click.option("--from", "format_name", default=None, help="Adapter format, when detection from the layout is not wanted.")
NONFINITE_OPTION = click.option("--allow-nonfinite", is_flag=True, help="Apply deltas that hold NaN or Inf instead of refusing them.")
SHARD_OPTION = click.option("--shard-size", default="5GB", show_default=True, help="Largest shard of the output checkpoint (5GB, 500MB, 2GiB).")
OUTPUT_OPTION = click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output directory; written atomically.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="surgeon")
def main() -> None:
    """Checkpoint surgery for PEFT: merge, unmerge and inspect LoRA adapters on saved checkpoints.

    Every command streams one tensor at a time, so memory stays near the size of the largest
    tensor, and writes its output atomically: an interrupted run leaves nothing at the output path.

    \b
    Examples:
      surgeon inspect fixtures/tiny-llama-lora
      surgeon merge fixtures/tiny-llama fixtures/tiny-llama-lora -o merged/
      surgeon unmerge merged/ fixtures/tiny-llama-lora -o restored/ --check fixtures/tiny-llama
    """
    install_signal_cleanup()


@main.command()
@click.argument("path", type=INPUT)
@click.option("--base", type=INPUT, default=None, help="The base checkpoint, for formats whose names only it resolves (kohya, LyCORIS).")
@FROM_OPTION
@JSON_OPTION
@friendly
def inspect(path: Path, base: Path | None, format_name: str | None, as_json: bool) -> None:
    """Say what PATH is (an adapter and its format, or a checkpoint) and summarise it.

    For an adapter: format, rank, alpha, scale, targets grouped by layer, parameters and bytes.
    For a checkpoint: files, tensors, parameters, dtypes and architecture.

    \b
    Examples:
      surgeon inspect fixtures/tiny-llama-lora
      surgeon inspect my_lora.safetensors --base sd15/unet --json
    """
    from surgeon import formats

    module = formats.get(format_name) if format_name else formats.detect(path)
    if module is not None:
        adapter = formats.read_adapter(path, format_name, base=Checkpoint(base) if base else None)
        summary = adapter_summary(adapter, path, module.DESCRIPTION)
    else:
        try:
            summary = checkpoint_summary(Checkpoint(path))
        except SurgeonError as error:
            raise SurgeonError(f"{path}: neither an adapter nor a checkpoint surgeon recognises; looked for {formats.looked_for()}; and for a checkpoint: {error}") from None
    emit(summary, as_json, render(summary))


def _transform_options(command):
    """The options merge and unmerge share, in the order --help lists them."""
    for option in reversed([
        click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
                     help="Output dtype of float tensors; auto keeps each tensor's own."),
        DEVICE_OPTION, SHARD_OPTION, FROM_OPTION, FORCE_OPTION, NONFINITE_OPTION, JSON_OPTION,
    ]):
        command = option(command)
    return friendly(command)


def _dtype_option(value: str):
    from surgeon.ops.merge import DTYPES

    return None if value == "auto" else DTYPES[value]


def _run_transform(operation, base: str, adapters: tuple[str, ...], output: Path, weights, format_name, dtype, device, shard_size, force, allow_nonfinite):
    from surgeon.ops.merge import resolve_device

    checkpoint = Checkpoint(base)
    loaded = [(read_adapter_arg(a, format_name, base=checkpoint), a) for a in adapters]
    device_obj = resolve_device(device)
    inputs = [Path(base), *map(Path, adapters)]
    with atomic_output(output, inputs=inputs, force=force) as staging:
        with Progress(len(checkpoint), operation.__name__) as tick:
            report = operation(
                checkpoint, loaded, staging, weights=list(weights) or None, allow_nonfinite=allow_nonfinite,
                dtype=_dtype_option(dtype), device=device_obj, shard_size=parse_size(shard_size), on_tensor=tick,
                metadata=provenance(),
            )
    report.output = str(output)
    return report


@main.command()
@click.argument("base", type=INPUT)
@click.argument("adapters", nargs=-1, required=True, type=INPUT)
@OUTPUT_OPTION
@click.option("-w", "--weight", "weights", multiple=True, type=float, help="Scale for each adapter, in order (repeat once per adapter; default 1).")
@_transform_options
def merge(base, adapters, output, weights, dtype, device, shard_size, format_name, force, allow_nonfinite, as_json) -> None:
    """Merge ADAPTERS into the BASE checkpoint and write a full checkpoint to -o.

    Each merged weight is computed in fp32 and cast back to the base's dtype (or --dtype).
    Adapters apply in the order given. Every target is checked against the base (name and
    shape) before anything is written; config and tokenizer files are copied along.

    \b
    Example:
      surgeon merge fixtures/tiny-llama fixtures/tiny-llama-lora -o merged/
    """
    from surgeon.ops.merge import merge as merge_op

    report = _run_transform(merge_op, base, adapters, output, weights, format_name, dtype, device, shard_size, force, allow_nonfinite)
    emit(asdict(report), as_json, f"merged {len(adapters)} adapter(s) into {report.changed} of {report.tensors} tensors "
          f"in {report.seconds:.2f}s -> {output}")


@main.command()
@click.argument("merged", type=INPUT)
@click.argument("adapters", nargs=-1, required=True, type=INPUT)
@OUTPUT_OPTION
@click.option("-w", "--weight", "weights", multiple=True, type=float, help="The weights the adapters were merged with.")
@click.option("--check", "check_base", type=INPUT, default=None,
              help="The real base: report how far the restored checkpoint is from it (refused before anything is written "
                   "when its tensors differ).")
@_transform_options
def unmerge(merged, adapters, output, weights, check_base, dtype, device, shard_size, format_name, force, allow_nonfinite, as_json) -> None:
    """Subtract ADAPTERS from a MERGED checkpoint, recovering the base: the inverse of merge.

    DoRA updates and whole-module replacements (modules_to_save) cannot be undone from a merged
    file, and are refused with the reason. Restoring a low-precision (bf16) checkpoint is exact
    only up to that precision's round-off; --check BASE measures it.

    \b
    Example:
      surgeon unmerge merged/ fixtures/tiny-llama-lora -o restored/ --check fixtures/tiny-llama
    """
    from surgeon.ops.merge import check_comparable, compare
    from surgeon.ops.merge import unmerge as unmerge_op

    if check_base:  # refused before anything is written, so a failed --check leaves no output
        check_comparable(Checkpoint(merged), Checkpoint(check_base))
    report = asdict(_run_transform(unmerge_op, merged, adapters, output, weights, format_name, dtype, device, shard_size, force, allow_nonfinite))
    text = f"unmerged {len(adapters)} adapter(s) from {report['changed']} of {report['tensors']} tensors in {report['seconds']:.2f}s -> {output}"
    if check_base:
        differences = compare(Checkpoint(output), Checkpoint(check_base))
        worst = max(differences, key=lambda d: d.max_abs)
        report["check"] = {
            "base": str(check_base),
            "max_abs_error": worst.max_abs,
            "max_abs_error_key": worst.key,
            "max_relative_error": max(d.relative for d in differences),
        }
        text += (f"\ncheck against {check_base}: max abs error {worst.max_abs:.3g} (in {worst.key}), "
                 f"max relative error {report['check']['max_relative_error']:.3g}")
    emit(report, as_json, text)


# Commands of the other capabilities live in their own modules and register on `main` when imported.
# (one import per module, below)
from surgeon import cli_compose  # noqa: E402,F401
from surgeon import cli_convert  # noqa: E402,F401
from surgeon import cli_hub  # noqa: E402,F401
from surgeon import cli_export  # noqa: E402,F401
from surgeon import cli_extract  # noqa: E402,F401
