"""What the writers share: one way to pick targets (:func:`pick_targets`) — one pair of factors
per module weight, several low-rank deltas on a weight stacked into one, and everything else the
format cannot hold refused by name, with the reason, before a byte is written — and the helpers
for fitting factors into a format (folding scales, padding ranks, the metadata-dropped note).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from surgeon.delta import Adapter, Delta, LowRank
from surgeon.errors import SurgeonError

_KIND_NAMES = {
    "replacement": "a whole-weight replacement (PEFT modules_to_save or a trained bias)",
    "dense": "a dense ΔW (LoKr, (IA)³, a large LoHa or a full diff)",
    "sparse": "a sparse ΔW",
}
_ADVICE = {
    "replacement": "merge it into the base instead (surgeon merge)",
    "dense": "factor it into LoRA first (surgeon resize) or merge it into the base (surgeon merge)",
    "sparse": "write it as surgeon's sparse diff or merge it into the base (surgeon merge)",
}


@dataclass(frozen=True)
class Target:
    key: str
    module: str
    delta: LowRank
    module_type: str


@dataclass
class Picked:
    """What a writer writes: one low-rank delta per target weight, the other deltas the format
    keeps beside them (``keeps``), and the notes on what was changed to fit."""

    targets: list[Target]
    kept: list[tuple[str, Delta]]
    notes: list[str]


def refusal(format_name: str, key: str, delta: Delta) -> SurgeonError:
    """The one-sentence error for a delta ``format_name`` cannot hold, with what to do instead."""
    kind = _KIND_NAMES.get(delta.kind, delta.kind)
    return SurgeonError(
        f"cannot write {format_name}: {key!r} has {kind}, which {format_name} cannot hold; "
        f"{_ADVICE.get(delta.kind, 'merge it into the base instead (surgeon merge)')}."
    )


def _target(
    key: str, lows: list[LowRank], module_type: str, format_name: str, module_types, allow_dora: bool
) -> Target:
    if module_type not in module_types:
        raise SurgeonError(
            f"cannot write {format_name}: {key!r} belongs to a module of kind {module_type!r}, and "
            f"surgeon writes {format_name} only for {' and '.join(module_types)} modules."
        )
    if not key.endswith(".weight"):
        raise SurgeonError(f"cannot write {format_name}: the low-rank delta on {key!r} is not on a module weight.")
    delta = LowRank.stack(key, lows)
    if delta.is_dora and not allow_dora:
        raise SurgeonError(
            f"cannot write {format_name}: {key!r} is a DoRA update, whose magnitude rescaling "
            f"{format_name} cannot express; merge it into the base (surgeon merge) or convert to peft or mlx."
        )
    return Target(key, key[: -len(".weight")], delta, module_type)


def pick_targets(
    adapter: Adapter,
    format_name: str,
    module_types: tuple[str, ...],
    allow_dora: bool = False,
    keeps: tuple[str, ...] = (),
) -> Picked:
    """How every writer picks what to write: per target weight, its low-rank deltas stacked into
    one (exact, noted); deltas of the kinds in ``keeps`` passed on; anything else refused with
    the first key the format cannot hold."""
    targets, kept, stacked = [], [], 0
    for key, deltas in adapter.items():
        lows = [d.factored() for d in deltas if d.factored() is not None]
        for delta in deltas:
            if delta.factored() is None and delta.kind not in keeps:
                raise refusal(format_name, key, delta)
            if delta.factored() is None:
                kept.append((key, delta))
        if lows:
            module_type = adapter.module_types.get(key, "linear")
            targets.append(_target(key, lows, module_type, format_name, module_types, allow_dora))
            stacked += len(lows) > 1
    if not targets and not kept:
        raise SurgeonError(f"cannot write {format_name}: the adapter has no targets.")
    notes = [f"{stacked} targets had several LoRA updates, stacked into one of their summed rank."] if stacked else []
    return Picked(targets, kept, notes)


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


def metadata_note(adapter: Adapter, format_name: str, kept=()) -> list[str]:
    """The one note for metadata entries of the source that ``format_name`` does not carry
    (``kept``: the entries it does)."""
    dropped = sorted(k for k in adapter.metadata if k != "format" and k not in kept)
    if not dropped:
        return []
    shown = ", ".join(dropped[:5]) + (", ..." if len(dropped) > 5 else "")
    return [
        f"{len(dropped)} metadata entries of the source ({shown}) were dropped: {format_name} has no place for them."
    ]


def trailing_zero_rank(down: torch.Tensor, up: torch.Tensor) -> int:
    """The rank left after removing trailing components that are zero in both factors, which is
    how formats with one rank per adapter pad smaller ones (down r×k, up m×r)."""
    rank = down.shape[0]
    while rank > 1 and not bool(down[rank - 1].any()) and not bool(up[:, rank - 1].any()):
        rank -= 1
    return rank
