"""Applying deltas to one weight tensor, and taking them back off: the arithmetic of merge and
unmerge, free of files and formats. Each delta applies itself (:meth:`Delta.apply_`); this module
only keeps the order and the DoRA reference weight."""

from __future__ import annotations

import torch

from surgeon.delta import Delta


def apply_deltas(
    weight: torch.Tensor, deltas: list[tuple[Delta, float]], reference: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight`` with each (delta, weight) applied in order, computed in ``weight``'s dtype.

    ``reference`` is the unmerged base weight that DoRA norms are taken against (PEFT's rule when
    several adapters are merged in turn); it defaults to ``weight``. ``weight`` is modified in place.
    """
    if reference is None and not all(d.additive or d.replaces for d, _ in deltas):
        reference = weight.clone()
    current = weight
    for delta, factor in deltas:
        current = delta.apply_(current, factor, reference)
        if delta.replaces and reference is not None:
            reference = current.clone()
    return current


def unmerge_refusal(key: str, deltas: list[Delta]) -> str | None:
    """Why the deltas on ``key`` cannot be taken back off a merged weight, or None if they can. A
    replacement followed by additive deltas can: undoing those restores the replaced value."""
    for delta in deltas:
        reason = delta.unmerge_refusal(key)
        if reason and (not delta.replaces or delta is deltas[-1]):
            return reason
    return None


def remove_deltas(weight: torch.Tensor, deltas: list[tuple[Delta, float]]) -> torch.Tensor:
    """The inverse of :func:`apply_deltas` for additive deltas, undoing them in reverse order.

    A replacement followed by additive deltas (PEFT saves a targeted embedding's base layer so)
    restores the replaced value, which is the weight the additive deltas were applied to.
    """
    current = weight
    for delta, factor in reversed(deltas):
        current = delta.remove_(current, factor)
        if delta.replaces:
            return current
    return current
