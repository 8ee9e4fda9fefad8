"""The one exception type for mistakes a user can fix.

The CLI prints a :class:`SurgeonError` as a single sentence and exits non-zero, with no
traceback: anything else escaping is a bug in surgeon and keeps its traceback.
"""


class SurgeonError(Exception):
    """Bad input or a request surgeon refuses; the message names the file, the tensor and the fix."""


def describe_os_error(error: OSError) -> str:
    """An operating-system failure (permission denied, disk full, read-only folder) as one line:
    the path it happened on and the system's reason, for the CLI to print instead of a traceback."""
    reason = error.strerror or str(error)
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}." if paths else f"{reason}."
