"""Applying deltas to one weight tensor, and taking them back off: the arithmetic of merge and
unmerge, free of files and formats."""

from __future__ import annotations

import torch

from surgeon.delta import Delta, LowRank, Replace
from surgeon.errors import SurgeonError


def _norm_except(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """The L2 norm over every axis but ``axis``, shaped to broadcast against ``weight``."""
    dims = tuple(d for d in range(weight.dim()) if d != axis)
    return torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


def _add_scaled(current: torch.Tensor, delta: Delta, factor: float) -> torch.Tensor:
    if isinstance(delta, LowRank):
        up = delta.up.to(current.device, current.dtype)
        down = delta.down.to(current.device, current.dtype)
        flat = current.view(up.shape[0], down.shape[1])
        flat.addmm_(up, down, alpha=factor * delta.scale)
        return current
    return current.add_(delta.materialize(current.device, current.dtype), alpha=factor)


def apply_deltas(weight: torch.Tensor, deltas: list[tuple[Delta, float]], reference: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` with each (delta, weight) applied in order, computed in ``weight``'s dtype.

    ``reference`` is the unmerged base weight that DoRA norms are taken against (PEFT's rule when
    several adapters are merged in turn); it defaults to ``weight``. ``weight`` is modified in place.
    """
    reference = weight.clone() if reference is None and any(_is_dora(d) for d, _ in deltas) else reference
    current = weight
    for delta, factor in deltas:
        if isinstance(delta, Replace):
            current = delta.materialize(current.device, current.dtype)
            reference = current.clone() if reference is not None else None
        elif isinstance(delta, LowRank) and delta.magnitude is not None:
            update = delta.materialize(current.device, current.dtype).mul_(factor)
            norm = _norm_except(reference + update, delta.magnitude_axis)
            shape = [1] * current.dim()
            shape[delta.magnitude_axis] = -1
            magnitude = delta.magnitude.to(current.device, current.dtype).reshape(shape)
            current = current.add_(update).mul_(magnitude / norm)
        else:
            current = _add_scaled(current, delta, factor)
    return current


def _is_dora(delta: Delta) -> bool:
    return isinstance(delta, LowRank) and delta.magnitude is not None


def unmerge_refusal(key: str, deltas: list[Delta]) -> str | None:
    """Why the deltas on ``key`` cannot be taken back off a merged weight, or None if they can."""
    if any(getattr(d, "reads_base", False) for d in deltas):
        return (
            f"{key!r} has an (IA)³ update, which scales the base weight; its ΔW would be computed from the merged "
            "weight instead of the original one, so it cannot be taken back off this way"
        )
    if any(_is_dora(d) for d in deltas):
        return (
            f"{key!r} has a DoRA update, which rescales each row by its magnitude over the norm of the unmerged "
            "weight; the merged file does not keep that norm, so the base cannot be recovered from it"
        )
    if isinstance(deltas[-1], Replace):
        return (
            f"{key!r} is replaced whole by the adapter (modules_to_save or a trained bias); the merged file does "
            "not keep the original value"
        )
    return None


def remove_deltas(weight: torch.Tensor, deltas: list[tuple[Delta, float]]) -> torch.Tensor:
    """The inverse of :func:`apply_deltas` for additive deltas, undoing them in reverse order.

    A replacement followed by additive deltas (PEFT saves a targeted embedding's base layer so)
    restores the replaced value, which is the weight the additive deltas were applied to.
    """
    current = weight
    for delta, factor in reversed(deltas):
        if isinstance(delta, Replace):
            return delta.materialize(current.device, current.dtype)
        if _is_dora(delta):
            raise SurgeonError("a DoRA update cannot be unmerged from a merged weight.")
        current = _add_scaled(current, delta, -factor)
    return current
