"""What every command shares: options, input paths, progress, errors and output.

Nothing here imports torch or a format's reader: ``--help`` and argument errors must answer
before any of that is loaded. Commands import their library modules inside their bodies.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
from pathlib import Path

import click

from surgeon import __version__
from surgeon.errors import SurgeonError, describe_os_error
from surgeon.formats import FILE_SUFFIXES, FORMATS

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def verbose_asked() -> bool:
    """Whether the user gave ``surgeon --verbose``."""
    return bool((click.get_current_context().find_root().obj or {}).get("verbose"))


def friendly(command):
    """Turn SurgeonError and OS errors (permissions, a full disk) into click's one-line error
    instead of a traceback; ``--verbose`` adds an error's details."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SurgeonError as error:
            details = (
                ""
                if not error.details
                else f"\n{error.details}"
                if verbose_asked()
                else " (surgeon --verbose COMMAND ... says more)"
            )
            sentence = " ".join(str(error).split())  # one line, whatever a library's message held
            raise click.ClickException(f"{sentence}{details}") from None
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
        self.bar = (
            click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, show_eta=True)
            if sys.stderr.isatty()
            else None
        )

    def __enter__(self):
        if self.bar is None:
            return None
        self.bar.__enter__()
        return lambda key: self.bar.update(1)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc) if self.bar is not None else None


class OutputPath(click.Path):
    """A path surgeon writes to: an empty string is refused, since it would silently mean the current folder."""

    name = "path"

    def __init__(self, *, file: bool = False):
        super().__init__(dir_okay=not file, path_type=Path)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; name the output to write.", param, ctx)
        return super().convert(value, param, ctx)


def _directory_output(ctx, param, value: Path | None) -> Path | None:
    if value is not None and value.suffix in FILE_SUFFIXES:
        raise click.BadParameter(
            f"{value} names a {value.suffix} file, but this command writes a directory "
            f"(give a folder such as {value.with_suffix('')}/).",
            ctx,
            param,
        )
    return value


DEVICE_OPTION = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where the arithmetic runs: auto (CUDA when present), cpu, cuda or cuda:N.",
)
FORCE_OPTION = click.option(
    "--force", is_flag=True, help="Replace an output that surgeon wrote before (an input is never replaced)."
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
FROM_OPTION = click.option(
    "--from",
    "format_name",
    type=click.Choice(list(FORMATS)),
    default=None,
    help="Adapter format, when detection from the layout is not wanted.",
)
NONFINITE_OPTION = click.option(
    "--allow-nonfinite", is_flag=True, help="Apply deltas that hold NaN or Inf instead of refusing them."
)
SHARD_OPTION = click.option(
    "--shard-size", default="5GB", show_default=True, help="Largest shard of the output checkpoint (5GB, 500MB, 2GiB)."
)
OUTPUT_OPTION = click.option(
    "-o",
    "--output",
    required=True,
    type=OutputPath(),
    callback=_directory_output,
    help="Output directory; written atomically.",
)
BASE_FOR_NAMES_OPTION = click.option(
    "--base",
    "base",
    type=INPUT,
    default=None,
    help="The base checkpoint, for adapters only it resolves (kohya, LyCORIS, GGUF) or whose writer needs it.",
)


def weight_option(help_text: str):
    """-w/--weight, repeated once per input in order: what each of merge, unmerge, compose and export scales by."""
    return click.option("-w", "--weight", "weights", multiple=True, type=float, help=help_text)


def dtype_option(help_text: str, extra: tuple[str, ...] = ()):
    return click.option(
        "--dtype", type=click.Choice(DTYPE_CHOICES + extra), default="auto", show_default=True, help=help_text
    )


def rank_options(command):
    """--rank / --energy / --max-error (exactly one of them) and the clamps, for RankRule."""
    for option in reversed(
        [
            click.option(
                "--rank",
                type=click.IntRange(min=0),
                default=None,
                help="Rank of every module (one of --rank, --energy, --max-error).",
            ),
            click.option(
                "--energy",
                type=click.FloatRange(0, 1, min_open=True),
                default=None,
                help="Per module, the smallest rank keeping this fraction of Σσ² (e.g. 0.95).",
            ),
            click.option(
                "--max-error",
                type=click.FloatRange(0, 1),
                default=None,
                help="Per module, the smallest rank whose relative Frobenius error is at most this (e.g. 0.02).",
            ),
            click.option(
                "--min-rank",
                type=click.IntRange(min=0),
                default=1,
                show_default=True,
                help="Lower bound for --energy / --max-error.",
            ),
            click.option(
                "--max-rank", type=click.IntRange(min=1), default=None, help="Upper bound on every module's rank."
            ),
        ]
    ):
        command = option(command)
    return command


def rank_rule(rank, energy, max_error, min_rank, max_rank, required: bool):
    """The RankRule the options give; exactly one of rank/energy/max-error where ``required``."""
    given = [
        name
        for name, value in (("--rank", rank), ("--energy", energy), ("--max-error", max_error))
        if value is not None
    ]
    if len(given) > 1:
        raise SurgeonError(
            f"{' and '.join(given)} each choose the rank; give exactly one of --rank, --energy, --max-error."
        )
    if not given:
        if required:
            raise SurgeonError("give exactly one of --rank, --energy or --max-error to choose each module's rank.")
        if max_rank is not None:
            raise SurgeonError("--max-rank bounds --energy or --max-error; give one of them, or --rank.")
        return None
    from surgeon.ops.rank import RankRule

    return RankRule(rank=rank, energy=energy, max_error=max_error, min_rank=min_rank, max_rank=max_rank)
