"""Outputs that cannot destroy anything: every file and directory surgeon writes goes through here.

- Inputs are never written: a destination that is, holds, or lies inside an input is refused.
- Nothing is replaced without ``--force``; and ``--force`` replaces only a file of a kind surgeon
  writes (:data:`SURGEON_FILES`, or a GGUF or ONNX Runtime adapter by its magic) or a directory
  holding nothing but what surgeon writes (:data:`SURGEON_WRITES`). ``-o . --force`` in a project
  folder is refused, naming what it holds.
- One run at a time per destination: a lock file beside it (``.NAME.surgeon-lock``, holding the
  PID, with an advisory ``flock`` the kernel drops when the process dies) turns a second
  concurrent run into an error instead of a silent replacement.
- Atomic: the result is written into a hidden sibling (``.NAME.surgeon-PID-XXXXXXXX``) and renamed
  into place at the end; an error, Ctrl-C or SIGTERM removes it. A sibling left by a process
  that was killed (``kill -9``, power loss) is removed by the next run writing the same
  destination, which says so; an output that a killed ``--force`` run had moved aside is put back.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from itertools import islice
from pathlib import Path

from surgeon.errors import SurgeonError

# What surgeon writes into an output directory, by name, so that --force can tell its own outputs
# from anything else: checkpoints (model*.safetensors and their index; pull's pickles and GGUF),
# adapters (adapter_config.json, adapter_model.safetensors, mlx-lm's adapters.safetensors,
# sparse_config.json, sparse_model.safetensors), ONNX graphs and their data (export-onnx's folders of
# encoder and decoder), and the config, tokenizer, template and card files that merge copies from a
# base and pull fetches. Subfolders count when all they hold does
# (extract's sparse/, a pulled repository's components).
SURGEON_WRITES = (
    "*.safetensors",
    "*.index.json",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.gguf",
    "*.npz",
    "*.onnx_adapter",
    "*.onnx",
    "*.onnx.data",
    "*config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "chat_template.json",
    "README.md",
)
# What a single-file output (convert's file formats, --report, --plot, export-onnx) may replace
# with --force: the same, plus reports, plots and ONNX graphs. A notes.txt or a script is not.
SURGEON_FILES = (
    *SURGEON_WRITES,
    "*.json",
    "*.onnx.unverified",
    *(f"*.{image}" for image in ("png", "svg", "svgz", "pdf", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp")),
)
NAME_MAX = 255  # bytes in one path component on every common filesystem
# Room that staging names add to the output's name: ".NAME.surgeon-<pid>-old-<8 random>".
_ADDED = len(".") + len(".surgeon-") + 10 + len("-old-") + 8
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_HELD: set[Path] = set()  # destinations this process has locked (export-onnx locks, then exports)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, while imports run single-threaded


def install_signal_cleanup() -> None:
    """Make SIGTERM unwind the stack like Ctrl-C does, so that :func:`atomic_output` removes its
    staging path (the default action would kill the process where it stands); and make a write
    past the file-size limit an OSError that names the file, not a silent SIGXFSZ kill."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _absolute(path: str | Path) -> Path:
    """The absolute path without following links: ``-o .`` is the current folder by its name."""
    return Path(os.path.abspath(path))


def _short(name: str) -> str:
    """``name`` as staging and lock names embed it: cut, with a hash to keep it unique, where
    the added characters would pass the 255-byte limit on a file name."""
    raw = os.fsencode(name)
    if len(raw) + _ADDED <= NAME_MAX:
        return name
    head = raw[: NAME_MAX - _ADDED - 9].decode(errors="ignore")
    return f"{head}~{hashlib.sha256(raw).hexdigest()[:8]}"


def _sibling(dest: Path, tag: str) -> Path:
    return dest.parent / f".{_short(dest.name)}.surgeon-{tag}"


def _check_path(dest: Path, inputs: Iterable[Path]) -> None:
    """Refuse a name no filesystem takes, and a destination that is, holds or lies in an input."""
    if len(os.fsencode(dest.name)) > NAME_MAX:
        raise SurgeonError(
            f"{dest.parent / dest.name[:40]}...: the name is longer than {NAME_MAX} bytes, "
            "the most a file name may have; choose a shorter one."
        )
    target = dest.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if source == target or target in source.parents:
            raise SurgeonError(f"{dest}: the output would overwrite the input {source}; choose another output path.")
        if source.is_dir() and source in target.parents:
            raise SurgeonError(
                f"{dest}: the output would be written inside the input {source}, changing it; choose a path outside it."
            )


def _foreign(directory: Path, prefix: str = "") -> Iterator[str]:
    """Entries of ``directory`` (depth first) that surgeon does not write: hidden ones, links,
    and files whose names are not in :data:`SURGEON_WRITES`."""
    for entry in sorted(directory.iterdir()):
        name = prefix + entry.name
        if entry.name.startswith(".") or entry.is_symlink():
            yield name
        elif entry.is_dir():
            yield from _foreign(entry, name + "/")
        elif not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in SURGEON_WRITES):
            yield name


def _surgeon_file(path: Path) -> bool:
    """Whether ``path`` is a file of a kind surgeon writes: by its name, or, for an adapter file
    named without a suffix, by its GGUF or ONNX Runtime magic."""
    from surgeon.formats.layouts import is_gguf, is_ort

    return any(fnmatch.fnmatchcase(path.name, pattern) for pattern in SURGEON_FILES) or is_gguf(path) or is_ort(path)


def _check_replaceable(dest: Path, directory: bool) -> None:
    """What --force may replace: by a file, a file of a kind surgeon writes; by a directory, one of surgeon's own."""
    if not directory:
        if not dest.is_file() or not _surgeon_file(dest):
            raise SurgeonError(
                f"{dest}: is not a file of a kind surgeon writes, and --force replaces only surgeon's "
                "own outputs; remove it or choose another output path."
            )
        return
    if not dest.is_dir():
        raise SurgeonError(
            f"{dest}: is a file, and --force replaces only a directory surgeon wrote; choose another output path."
        )
    found = list(islice(_foreign(dest), 4))
    if found:
        names = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise SurgeonError(
            f"{dest}: holds files surgeon does not write ({names}), and --force replaces only "
            "surgeon's own outputs; remove them or choose another output path."
        )


def check_destination(dest: str | Path, inputs: Iterable[Path], force: bool, directory: bool = True) -> None:
    """Refuse ``dest`` when it is, holds or lies in an input; when it exists, unless ``force``; and,
    with ``force``, when it is not something surgeon may replace (see :func:`_check_replaceable`)."""
    dest = _absolute(dest)
    _check_path(dest, inputs)
    if os.path.lexists(dest):
        if not force:
            raise SurgeonError(f"{dest}: already exists; pass --force to replace it, or choose another output path.")
        _check_replaceable(dest, directory)


def _note(message: str) -> None:
    print(f"surgeon: {message}", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _clear_stale(dest: Path) -> None:
    """Remove the staging that dead processes left beside ``dest``; put back an output that a
    killed ``--force`` run had moved aside and not yet replaced."""
    pattern = re.compile(rf"\.{re.escape(_short(dest.name))}\.surgeon-(\d+)-(old-)?[a-z0-9_]{{8}}")
    for entry in sorted(dest.parent.iterdir()):
        found = pattern.fullmatch(entry.name)
        if not found or int(found[1]) in (0, os.getpid()) or _alive(int(found[1])):
            continue
        if found[2] and not os.path.lexists(dest):
            os.replace(entry, dest)
            _note(f"put back {dest}, which process {found[1]} had moved aside to {entry.name} when it was killed.")
        else:
            _remove(entry)
            _note(f"removed {entry.name} beside {dest}, left by process {found[1]}, which was killed while writing it.")


def _acquire(dest: Path, lock: Path) -> int:
    """Lock ``lock`` (created if missing) for this process, or refuse naming the holder. A lock
    file whose flock nobody holds was left by a dead process and is taken over."""
    import fcntl

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SurgeonError(
                f"{dest}: another surgeon run (process {holder}) is writing it; wait for it to end, "
                "or choose another output path."
            ) from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:  # not unlinked by its last holder meanwhile
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    previous = os.read(fd, 32).decode(errors="replace").strip()
    if previous:
        _note(f"took over the lock on {dest} left by process {previous}, which is no longer running.")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextmanager
def _locked(dest: Path) -> Iterator[None]:
    lock = _sibling(dest, "lock")
    if lock in _HELD:
        yield
        return
    try:
        fd = _acquire(dest, lock)
    except OSError as error:
        raise SurgeonError(
            f"{dest.parent}: cannot write the output there ({error.strerror}); choose another output path."
        ) from None
    _HELD.add(lock)
    try:
        yield
    finally:
        _HELD.discard(lock)
        with suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


@contextmanager
def claimed(
    dest: str | Path, *, inputs: Iterable[Path] = (), force: bool = False, directory: bool = True
) -> Iterator[Path]:
    """Hold ``dest`` for this run: checked against the inputs and ``force``, locked against a
    concurrent run, and cleared of what killed runs left beside it. Yields the absolute path."""
    dest = _absolute(dest)
    _check_path(dest, inputs)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocking = next((p for p in dest.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise SurgeonError(
                f"{dest.parent}: cannot create the output's folder: {blocking} is a file, not a folder; "
                "choose another output path."
            ) from None
        raise SurgeonError(f"{dest.parent}: cannot create the output's folder ({error.strerror}).") from None
    with _locked(dest):
        _clear_stale(dest)
        check_destination(dest, (), force, directory)
        yield dest


def _new_staging(dest: Path, directory: bool) -> Path:
    """A private sibling of ``dest``, named with this process's PID so a later run can tell when it is stale."""
    prefix = f".{_short(dest.name)}.surgeon-{os.getpid()}-"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    handle, name = tempfile.mkstemp(prefix=prefix, dir=dest.parent)
    os.close(handle)
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while cleaning up, so that a second one cannot stop it halfway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def _discard(path: Path) -> None:
    with _signals_held():
        _remove(path)


@contextmanager
def scratch_beside(dest: str | Path) -> Iterator[Path]:
    """A directory beside ``dest`` for work that is not the output itself (export-onnx's merged
    copy), removed at the end, and named like staging so a later run clears it if this one is killed."""
    dest = _absolute(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    path = _new_staging(dest, directory=True)
    try:
        yield path
    finally:
        _discard(path)


def _usual_modes(root: Path) -> None:
    """Give staged files the modes any new file gets under the umask (0644 and 0755 under the usual
    022): tempfile makes staging private, and safetensors' writer makes its files 0600."""
    files, folders = 0o666 & ~_UMASK, 0o777 & ~_UMASK
    if not root.is_dir():
        os.chmod(root, files)
        return
    os.chmod(root, folders)
    for folder, subfolders, names in os.walk(root):
        for name in subfolders + names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, folders if name in subfolders else files)


def publish(staging: Path, dest: Path) -> None:
    """Rename ``staging`` to ``dest``. An existing directory is moved aside first (with Ctrl-C and
    SIGTERM held off) and put back if the second rename fails, so that a failed swap loses nothing."""
    _usual_modes(staging)
    if not (staging.is_dir() and os.path.lexists(dest)):
        os.replace(staging, dest)  # a file replaces a file in one step
        return
    old = _sibling(dest, f"{os.getpid()}-old-{secrets.token_hex(4)}")
    with _signals_held():
        os.replace(dest, old)
        try:
            os.replace(staging, dest)
        except OSError:
            os.replace(old, dest)
            raise
        _remove(old)


@contextmanager
def atomic_output(
    dest: str | Path, *, inputs: Iterable[Path] = (), force: bool = False, directory: bool = True
) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` (a directory, or a file's path) to fill; rename it
    to ``dest`` when the block ends cleanly, and delete it when it does not. ``dest`` is checked
    and locked first (:func:`claimed`)."""
    with claimed(dest, inputs=inputs, force=force, directory=directory) as target:
        staging = _new_staging(target, directory)
        try:
            yield staging
            publish(staging, target)
        except BaseException as error:
            _discard(staging)
            reason = _write_failure(error, staging)
            if reason is None:
                raise
            raise SurgeonError(f"{target}: writing the output failed ({reason}); nothing was written there.") from None


def _write_failure(error: BaseException, staging: Path) -> str | None:
    """Why writing the staged output failed, where ``error`` says that it did: an OSError on a staged
    path, or with no path and a write's errno (disk full, file too large), or safetensors' I/O error;
    else None. Named after the output, not after its hidden staging path."""
    if isinstance(error, OSError):
        staged = error.filename is not None and str(error.filename).startswith(str(staging))
        return error.strerror if staged or (error.filename is None and error.errno in _WRITE_ERRNOS) else None
    marker = "I/O error: "
    if type(error).__name__ == "SafetensorError" and marker in str(error):
        return str(error).split(marker, 1)[1]
    return None
