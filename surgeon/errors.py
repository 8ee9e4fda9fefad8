"""The one exception type for mistakes a user can fix.

The CLI prints a :class:`SurgeonError` as a single sentence and exits non-zero, with no
traceback: anything else escaping is a bug in surgeon and keeps its traceback.
"""


class SurgeonError(Exception):
    """Bad input or a request surgeon refuses; the message names the file, the tensor and the fix."""
