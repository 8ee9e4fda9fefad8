"""What the LoRA-only deployment formats (mlx-lm, GGUF for llama.cpp, ONNX Runtime adapters) share:
they hold one pair of factors per module weight and nothing else, so everything else an adapter
can carry is refused here by name, with the reason, before a byte is written.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from surgeon.delta import Adapter, LowRank
from surgeon.errors import SurgeonError

_KIND_NAMES = {
    "replacement": "a whole-weight replacement (PEFT modules_to_save or a trained bias)",
    "dense": "a dense ΔW",
    "sparse": "a sparse ΔW",
}


@dataclass(frozen=True)
class Target:
    key: str
    module: str
    delta: LowRank
    module_type: str


def lora_targets(adapter: Adapter, format_name: str, module_types: tuple[str, ...], allow_dora: bool = False) -> list[Target]:
    """One low-rank delta per target, or an error naming the first target ``format_name`` cannot hold."""
    targets = []
    for key, deltas in adapter.items():
        other = next((d for d in deltas if d.factored() is None), None)
        if other is not None:
            kind = _KIND_NAMES.get(other.kind, other.kind)
            raise SurgeonError(f"cannot write {format_name}: {key!r} has {kind}, and {format_name} holds only LoRA factors; "
                               "merge it into the base instead (surgeon merge).")
        module_type = adapter.module_types.get(key, "linear")
        if module_type not in module_types:
            raise SurgeonError(f"cannot write {format_name}: {key!r} belongs to a module of kind {module_type!r}, and surgeon writes "
                               f"{format_name} only for {' and '.join(module_types)} modules.")
        if not key.endswith(".weight"):
            raise SurgeonError(f"cannot write {format_name}: the low-rank delta on {key!r} is not on a module weight.")
        delta = LowRank.stack(key, [d.factored() for d in deltas])
        if delta.is_dora and not allow_dora:
            raise SurgeonError(f"cannot write {format_name}: {key!r} is a DoRA update, whose magnitude rescaling {format_name} "
                               "cannot express; merge it into the base (surgeon merge) or convert to peft or mlx.")
        targets.append(Target(key, key[: -len(".weight")], delta, module_type))
    if not targets:
        raise SurgeonError(f"cannot write {format_name}: the adapter has no targets.")
    return targets


def combined_note(adapter: Adapter) -> list[str]:
    stacked = sum(1 for deltas in adapter.deltas.values() if len(deltas) > 1)
    return [f"{stacked} targets had several LoRA updates, stacked into one of their summed rank."] if stacked else []


def fold(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor`` times ``factor``, computed in fp32 and stored in the tensor's own dtype."""
    if factor == 1.0:
        return tensor
    return (tensor.float() * factor).to(tensor.dtype)


def most_common(values) -> float:
    """The most frequent of some computed floats, compared at 9 significant digits so that
    alpha/r·r for different r counts as one value."""
    return Counter(float(f"{v:.9g}") for v in values).most_common(1)[0][0]


def differs(a: float, b: float) -> bool:
    """Whether two scales differ by more than the float32 round-off of a stored alpha."""
    return not math.isclose(a, b, rel_tol=1e-6)


def metadata_note(adapter: Adapter, format_name: str) -> list[str]:
    dropped = sorted(k for k in adapter.metadata if k != "format")
    if not dropped:
        return []
    shown = ", ".join(dropped[:5]) + (", ..." if len(dropped) > 5 else "")
    return [f"{len(dropped)} metadata entries of the source ({shown}) were dropped: {format_name} has no place for them."]


def trailing_zero_rank(down: torch.Tensor, up: torch.Tensor) -> int:
    """The rank left after removing trailing components that are zero in both factors, which is
    how formats with one rank per adapter pad smaller ones (down r×k, up m×r)."""
    rank = down.shape[0]
    while rank > 1 and not bool(down[rank - 1].any()) and not bool(up[:, rank - 1].any()):
        rank -= 1
    return rank
