"""Atomic outputs: everything is written into a hidden sibling and renamed into place at the end.

An interrupted run (an error, Ctrl-C, SIGTERM) removes the sibling, so the destination either
holds a complete result or is untouched. Inputs are never written: a destination that is, or
contains, an input is refused before any work starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from surgeon.errors import SurgeonError


def install_signal_cleanup() -> None:
    """Make SIGTERM unwind the stack like Ctrl-C does, so that :func:`atomic_output` removes its
    staging path; the default action would kill the process where it stands."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def check_destination(dest: Path, inputs: Iterable[Path], force: bool) -> None:
    """Refuse to overwrite without ``force``, and refuse always when ``dest`` is or holds an input."""
    target = dest.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if source == target or target in source.parents:
            raise SurgeonError(f"{dest}: the output would overwrite the input {source}; choose another output path.")
        if source.is_dir() and source in target.parents:
            raise SurgeonError(f"{dest}: the output would be written inside the input {source}, changing it; choose a path outside it.")
    if dest.exists() and not force:
        raise SurgeonError(f"{dest}: already exists; pass --force to replace it, or choose another output path.")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_output(dest: str | Path, *, inputs: Iterable[Path] = (), force: bool = False, directory: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` (a directory, or a file's path) to fill; rename it
    to ``dest`` when the block ends cleanly, and delete it when it does not."""
    dest = Path(dest)
    check_destination(dest, inputs, force)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SurgeonError(f"{dest.parent}: cannot create the output's folder ({error.strerror}).") from None
    prefix = f".{dest.name}.surgeon-"
    if directory:
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=dest.parent)
        os.close(fd)
        staging = Path(name)
    try:
        yield staging
        os.chmod(staging, 0o755 if directory else 0o644)  # mkdtemp/mkstemp make them private
        if dest.exists() or dest.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.surgeon-old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, dest)
    except BaseException:
        _remove(staging)
        raise
