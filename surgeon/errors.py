"""The one exception type for mistakes a user can fix.

The CLI prints a :class:`SurgeonError` as a single sentence and exits non-zero, with no
traceback: anything else escaping is a bug in surgeon and keeps its traceback. ``details``
holds what is too long for that sentence (every format's detection rule, say); the CLI shows it
under ``--verbose``.
"""


class SurgeonError(Exception):
    """Bad input or a request surgeon refuses; the message names the file, the tensor and the fix."""

    def __init__(self, message: str, details: str | None = None):
        super().__init__(message)
        self.details = details


def missing_extra(extra: str, packages: list[str], what: str) -> str:
    """The sentence for an optional dependency that is not installed: which package, and the
    extra that brings it, named the way the README installs extras."""
    names = " ".join(packages)
    return (
        f"{what} needs {', '.join(packages)}, which is not installed; run pip install {names} "
        f"(or, in surgeon's checkout, pip install '.[{extra}]')."
    )


def describe_os_error(error: OSError) -> str:
    """An operating-system failure (permission denied, disk full, read-only folder) as one line:
    the path it happened on and the system's reason, for the CLI to print instead of a traceback."""
    reason = error.strerror or str(error)
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}." if paths else f"{reason}."


class NotWeightDeltas(SurgeonError):
    """An adapter surgeon reads but cannot turn into weight deltas (prefix tuning, bottleneck
    adapters: they add computation at run time, not values to weights). The message is the
    refusal, saying why and what to use instead; ``facts`` is what ``inspect`` shows of it;
    ``peft_runs_it``: PEFT can attach it to the model, so that export-onnx traces it into the graph."""

    def __init__(self, message: str, facts: dict, peft_runs_it: bool = False):
        super().__init__(message)
        self.facts = facts
        self.peft_runs_it = peft_runs_it
