"""Saying what a path is when it is not what a command wanted: one short sentence first (what
PATH looks like, and the likely slip), and every format's detection rule only under --verbose.

Nothing here imports torch: these errors come before any work.
"""

from __future__ import annotations

import re
from pathlib import Path

from surgeon.checkpoint_files import WEIGHT_SUFFIXES
from surgeon.errors import SurgeonError
from surgeon.header import header_or_none

_CHECKPOINT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.safetensors",
)
_ADAPTER_PART = re.compile(r"lora|hada_|lokr_|\.diff$|on_input|dora_scale|sparse_")


def _looks_like_adapter_keys(keys) -> bool:
    return any(_ADAPTER_PART.search(k) for k in keys)


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` looks like full model weights rather than an adapter."""
    if path.is_dir():
        return any((path / name).is_file() for name in _CHECKPOINT_FILES)
    entries = header_or_none(path) if path.suffix == ".safetensors" else None
    return bool(entries) and not _looks_like_adapter_keys(entries)


def holds_weights(path: Path) -> bool:
    """Whether ``path`` is, or holds, model weights: a checkpoint's reader should get it, not an adapter's."""
    weights = path.suffix in WEIGHT_SUFFIXES if path.is_file() else any(path.glob("*.safetensors"))
    return weights or is_checkpoint(path)


def describe(path: Path) -> str:
    """What ``path`` looks like, as the middle of a sentence."""
    if is_checkpoint(path):
        return "a full model checkpoint"
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        if not names:
            return "an empty directory"
        if "adapter_config.json" in names:
            return "a directory with adapter_config.json but no adapter weights surgeon reads"
        return f"a directory of {len(names)} entries with no adapter or model weights ({', '.join(names[:3])}…)"
    if path.suffix == ".safetensors":
        return (
            "a safetensors file whose tensor names match no adapter format"
            if header_or_none(path) is not None
            else "a .safetensors file with a broken header"
        )
    return f"a {path.suffix or 'suffix-less'} file, which is no adapter format surgeon reads"


def looked_for() -> str:
    from surgeon.formats import looked_for as rules

    return f"What each format looks like: {rules()}."


def not_an_adapter(path: Path, hint: str = "") -> SurgeonError:
    """The error for an adapter argument that is none; ``hint`` is the likely slip, if any."""
    if not hint and is_checkpoint(path):
        hint = "an adapter was expected here"
    sentence = f"{path}: {describe(path)}, not an adapter{'; ' + hint if hint else ''}"
    return SurgeonError(sentence if sentence.endswith("?") else sentence + ".", details=looked_for())


def refuse_swapped(base: Path, adapters: list[Path], base_role: str = "BASE") -> None:
    """Catch the commonest slip before any work: the checkpoint and an adapter given the other way round."""
    from surgeon.formats import detect

    found = detect(base)
    if found is not None:
        raise SurgeonError(
            f"{base}: is a {found.name} adapter, not a checkpoint; did you swap {base_role} and ADAPTER?"
        )
    for path in adapters:
        if detect(path) is None and is_checkpoint(path):
            raise not_an_adapter(path, f"did you swap {base_role} and ADAPTER?")


def refuse_adapter_for_checkpoint(path: Path, role: str) -> None:
    """Refuse an adapter where a command takes only full checkpoints (extract's BASE and TUNED),
    pointing at the command that applies it."""
    from surgeon.formats import detect

    found = detect(path)
    if found is not None:
        raise SurgeonError(
            f"{path}: is a {found.name} adapter, but {role} is a full checkpoint; "
            f"to apply the adapter, run surgeon merge BASE {path} -o OUT."
        )
