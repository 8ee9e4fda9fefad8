"""The maths of the LyCORIS family — LoHa, LoKr, (IA)³, DoRA magnitudes and the kohya/LyCORIS
alpha rule — shared by every reader that meets them (LyCORIS files, PEFT's LoHa/LoKr/IA3 tuners),
as PEFT keeps its own in ``tuners/lycoris_utils.py``. Formats only map their names and layouts
onto these functions; the formulas, and the producers' sources they follow, live here:

- LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · scale, with optional Tucker cores; low-rank (rank r²) as
  the Khatri–Rao product of its factors when that is smaller than the dense ΔW.
- LoKr: ΔW = kron(w1, w2) · scale, each half stored whole, as two factors, or as a Tucker rebuild.
- (IA)³: W' = W ⊙ s, so ΔW = W ⊙ (s − 1), computed from the base weight when used.
- DoRA on a delta that is not low-rank: a LowRank with an identity factor on the smaller side.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch

from surgeon.delta import Dense, LowRank
from surgeon.errors import SurgeonError

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def scale_of(alpha: torch.Tensor | None, rank: int) -> float:
    """alpha/rank, where a missing or zero alpha means alpha = rank (sd-scripts, LyCORIS)."""
    if rank < 1:
        raise SurgeonError("a module has a LoRA factor of rank 0, which holds no update; the file is damaged.")
    if alpha is not None and alpha.numel() != 1:
        raise SurgeonError(
            f"a module's alpha has shape {tuple(alpha.shape)} instead of one number; the file is damaged."
        )
    value = float(alpha) if alpha is not None else 0.0
    return (value if value != 0 else rank) / rank


def dora_magnitude(scale: torch.Tensor, shape: tuple[int, ...], where: str) -> tuple[torch.Tensor, int]:
    """A LyCORIS ``dora_scale`` as (magnitude, axis): [out, 1, …] norms each output row (LyCORIS ≥ 3.2's
    default), [1, in, …] each input column (older files)."""
    if scale.shape[0] == shape[0] and scale.numel() == shape[0]:
        return scale.reshape(-1).float(), 0
    if len(shape) > 1 and scale.numel() == shape[1]:
        return scale.reshape(-1).float(), 1
    raise SurgeonError(
        f"{where}: dora_scale has shape {tuple(scale.shape)}, which fits neither the rows nor the columns of the "
        f"{shape} weight."
    )


def khatri_rao(
    a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down = (a1 @ b1) ⊙ (a2 @ b2): column (i, j) of up is a1[:, i]·a2[:, j],
    row (i, j) of down is b1[i]·b2[j]; rank r1·r2."""
    up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
    down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
    return up, down


def loha_factors(
    w1a, w1b, w2a, w2b, t1=None, t2=None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Each Hadamard factor of a LoHa as (up m×r, down r×k), in fp32. With Tucker cores (w_a r×out,
    w_b r×in, t r×r×k…) a factor is w_aᵀ @ einsum(t, w_b): still rank r."""

    def one(a, b, t):
        a, b = a.float(), b.float()
        if t is None:
            return a, b.reshape(b.shape[0], -1)
        down = torch.einsum("i j ..., j r -> i r ...", t.float(), b)
        return a.T, down.reshape(down.shape[0], -1)

    return one(w1a, w1b, t1), one(w2a, w2b, t2)


def _hadamard(factors, scale: float) -> torch.Tensor:
    (u1, d1), (u2, d2) = factors
    return ((u1 @ d1) * (u2 @ d2)).mul_(scale)


def loha_delta(factors, scale: float, shape: tuple[int, ...], low_rank: bool):
    """A LoHa's ΔW: the Khatri–Rao LowRank when ``low_rank`` (or cheaper), else a lazy Dense."""
    (u1, d1), (u2, d2) = factors
    rows, cols = u1.shape[0], d1.shape[1]
    if rows * cols != math.prod(shape):
        raise SurgeonError(
            f"LoHa factors give {rows}×{cols} values, which cannot fill the base weight of shape {shape}."
        )
    if low_rank or u1.shape[1] * u2.shape[1] * (rows + cols) < rows * cols:
        up, down = khatri_rao(u1, d1, u2, d2)
        return LowRank(down=down, up=up, scale=scale, shape=shape)
    return Dense.lazy(partial(_hadamard, factors, scale), shape, [u1, d1, u2, d2])


def lokr_weight(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1, w2) of a LoKr module in fp32, w2 flattened to 2-D so that kron gives the weight's own
    row-major layout (LyCORIS's 4-D kron is the same values)."""
    p = {k: v.float() for k, v in parts.items()}
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = torch.einsum("i j ..., i p, j r -> p r ...", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"].reshape(p["lokr_w2_b"].shape[0], -1)
    return w1, w2.reshape(w2.shape[0], -1)


def lokr_scale(parts: dict[str, torch.Tensor]) -> float:
    """LyCORIS's rule: alpha/dim with dim the rank of the decomposed half; both halves whole → 1."""
    if "lokr_w1" in parts and "lokr_w2" in parts:
        return 1.0
    rank = parts["lokr_w2_b"].shape[0] if "lokr_w2_b" in parts else parts["lokr_w1_b"].shape[0]
    return scale_of(parts.get("alpha"), int(rank))


def with_magnitude(delta, magnitude: torch.Tensor, axis: int):
    """A DoRA update on a delta that is not low-rank: written as a LowRank with an identity factor
    on the smaller side, the only delta surgeon applies DoRA's renormalisation to."""
    low = delta.factored()
    if low is not None:
        return LowRank(low.down, low.up, low.scale, low.shape, magnitude, axis)
    rows = delta.shape[0]
    flat = delta.delta.reshape(rows, -1)
    if rows <= flat.shape[1]:
        return LowRank(down=flat, up=torch.eye(rows), shape=delta.shape, magnitude=magnitude, magnitude_axis=axis)
    return LowRank(down=torch.eye(flat.shape[1]), up=flat, shape=delta.shape, magnitude=magnitude, magnitude_axis=axis)


def ia3_delta(base, key: str, scaling: torch.Tensor) -> Dense:
    """ΔW = W ⊙ (s − 1) for W' = W ⊙ s, read from the base when used; ``scaling`` broadcasts
    against the weight."""

    def compute() -> torch.Tensor:
        weight = base.get(key).float()
        return weight * scaling.float() - weight

    return Dense.lazy(compute, base.info(key).shape, [scaling], reads_base=True)


def _half_size(parts: dict[str, torch.Tensor], half: int) -> int:
    """How many values one Kronecker half has, from its stored tensors' shapes."""
    whole = parts.get(f"lokr_w{half}")
    if whole is not None:
        return whole.numel()
    a, b, core = parts[f"lokr_w{half}_a"], parts[f"lokr_w{half}_b"], parts.get(f"lokr_t{half}")
    if core is not None:  # Tucker: a is r×rows, b is r×cols
        return a.shape[1] * b.shape[1] * math.prod(core.shape[2:])
    return a.shape[0] * math.prod(b.shape[1:])


def lokr_delta(
    parts: dict[str, torch.Tensor],
    scale: float,
    shape: tuple[int, ...],
    where: str,
    combine: Callable[[], torch.Tensor] | None = None,
) -> Dense:
    """kron(w1, w2)·scale as a lazy Dense on a weight of ``shape``; ``combine`` replaces the
    Kronecker product of :func:`lokr_weight` where a producer forms it differently."""
    count = _half_size(parts, 1) * _half_size(parts, 2)
    if count != math.prod(shape):
        raise SurgeonError(
            f"{where}: the LoKr factors give {count} values, which cannot fill the base weight of shape {shape}."
        )
    combine = combine or (lambda: torch.kron(*lokr_weight(parts)))
    return Dense.lazy(lambda: combine().mul_(scale), shape, [t for k, t in parts.items() if k.startswith("lokr_")])
