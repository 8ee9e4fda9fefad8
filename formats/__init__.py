"""Adapter formats: each module reads its on-disk layout into a :class:`surgeon.delta.Adapter`
and, where it makes sense, writes one back. Nothing converts between two formats directly.

A format module exposes ``NAME``, ``DESCRIPTION``, ``LOOKS_FOR`` (what :func:`detect` checks,
for the error when nothing matches), ``sniff(path) -> bool``, ``read(path, base=None)`` and
optionally ``write(adapter, staging_path)``. ``base`` is the base model's
:class:`~surgeon.checkpoint.Checkpoint` when the user gave one; a reader that cannot work without
it says so.

Writers declare two things about themselves:

- ``WRITES_FILE = True`` when the format is a single file (``adapter.gguf``), so that the caller
  stages a file rather than a directory (the default, ``False``, is a directory);
- ``WRITE_USES_BASE = True`` when ``write`` takes the base (or None) as the keyword ``base=``
  (mlx-lm's ``num_layers`` counts from the model's last block), and ``WRITE_NEEDS_BASE = True``
  when it cannot work without it (GGUF takes tensor names and head counts from the base's config).

``write`` returns a list of notes, one sentence each, saying what the target format could not
hold as it was and what was done about it (scales folded into a factor, ranks zero-padded,
metadata dropped); ``None`` means nothing. Anything a format cannot represent at all (DoRA in
GGUF) is refused with a :class:`SurgeonError`, never dropped.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from surgeon.delta import Adapter
from surgeon.errors import SurgeonError
from surgeon.formats import diffusers, gguf, kohya, lycoris, mlx, ort, peft, sparse

FORMATS: dict[str, ModuleType] = {module.NAME: module for module in (peft, mlx, gguf, ort, diffusers, lycoris, kohya, sparse)}


def get(name: str) -> ModuleType:
    if name not in FORMATS:
        raise SurgeonError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}.")
    return FORMATS[name]


def detect(path: str | Path) -> ModuleType | None:
    """The format whose layout ``path`` has, or None."""
    path = Path(path)
    for module in FORMATS.values():
        if module.sniff(path):
            return module
    return None


def looked_for() -> str:
    return "; ".join(f"{m.NAME}: {m.LOOKS_FOR}" for m in FORMATS.values())


def read_adapter(path: str | Path, format_name: str | None = None, base=None) -> Adapter:
    """Read an adapter in ``format_name``, or in the format detected from its layout."""
    path = Path(path)
    if not path.exists():
        raise SurgeonError(f"{path}: no such file or directory.")
    module = get(format_name) if format_name else detect(path)
    if module is None:
        raise SurgeonError(f"{path}: not an adapter surgeon recognises; looked for {looked_for()}.")
    if format_name and not module.sniff(path):
        raise SurgeonError(f"{path}: not a {module.NAME} adapter; that format is {module.LOOKS_FOR}.")
    adapter = module.read(path, base=base)
    if not len(adapter):
        raise SurgeonError(f"{path}: the adapter holds no tensors, so there is nothing to apply (PEFT refuses it too).")
    return adapter


def writers() -> list[str]:
    return [name for name, module in FORMATS.items() if hasattr(module, "write")]


def write_adapter(adapter: Adapter, staging: Path, format_name: str, base=None) -> list[str]:
    """Write ``adapter`` in ``format_name`` to ``staging``; returns the writer's notes."""
    module = get(format_name)
    if not hasattr(module, "write"):
        raise SurgeonError(f"surgeon reads {format_name} but does not write it; it writes {', '.join(writers())}.")
    needs = getattr(module, "WRITE_NEEDS_BASE", False)
    if needs and base is None:
        raise SurgeonError(f"writing {format_name} needs the base model; pass --base with the base model's checkpoint directory (config.json beside the weights).")
    if needs or getattr(module, "WRITE_USES_BASE", False):
        return list(module.write(adapter, staging, base=base) or [])
    return list(module.write(adapter, staging) or [])
