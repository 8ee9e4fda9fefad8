"""LyCORIS adapters: one ``.safetensors`` with kohya-style names (``lora_unet_…``, or
``lycoris_…`` from its standalone wrapper) and, per module, the parts of its algorithm.

Each module's ΔW is what LyCORIS 3.x/4.x computes in its forward pass (``modules/*.py``), with
the scale applied once, as ComfyUI, A1111 and diffusers do; LyCORIS's own merge path
(``merge_to``, ``utils.merge``) applies alpha/dim a second time for LoHa and LoKr, and is not
taken as the file's meaning:

- LoRA/LoCon (``lora_down``/``lora_up``, optional Tucker ``lora_mid``): see :mod:`.kohya`.
- LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha/r, r = hada_w1_b's rows; with Tucker cores
  ``hada_t1/t2`` each factor is einsum("i j …, j r, i p -> p r …", t, w_b, w_a).
- LoKr: ΔW = kron(w1, w2) · alpha/r, w1 = lokr_w1 or w1_a @ w1_b, w2 = lokr_w2, w2_a @ w2_b or
  the Tucker rebuild with ``lokr_t2``; r = the rows of w2_b (else w1_b), and scale 1 when both
  halves are stored whole (LyCORIS then sets alpha = dim).
- (IA)³ (``weight``, ``on_input``): W' = W ⊙ (1 + weight) along the output rows, or the input
  columns when on_input is 1: ΔW = W ⊙ weight, so reading it needs the base weights.
- full (``diff``, ``diff_b``) and norm (``w_norm``, ``b_norm``): ΔW stored as is.
- ``dora_scale`` (LoCon, LoHa, LoKr): the DoRA magnitude, its axis told by its shape.

Low-rank where exact: LoRA/LoCon always, LoHa as the Khatri–Rao product of its factors (rank r²)
when that is smaller than the dense ΔW (always under DoRA, which surgeon applies to low-rank
deltas). LoKr, larger LoHa and (IA)³ are dense ΔWs computed from the factors only when a target
is used (:meth:`Dense.lazy`), so reading one holds no more than the file. GLoRA, OFT/BOFT, T-LoRA
and sparse-bias residuals are refused by name.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from surgeon.delta import Adapter, Dense, LowRank
from surgeon.errors import SurgeonError
from surgeon.formats import kohya
from surgeon.formats.kohya import dora_magnitude, header_keys, kohya_style, lora_delta, module_type, read_modules, scale_of

NAME = "lycoris"
DESCRIPTION = "LyCORIS LoHa / LoKr / (IA)³ / full / LoCon (one .safetensors, kohya-style names)"
LOOKS_FOR = "a .safetensors file with kohya-style names and hada_w1_a, lokr_w1(_a), diff, w_norm or on_input parts (or lycoris_ names)"

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
OTHER_PARTS = ("weight", "on_input", "diff", "diff_b", "w_norm", "b_norm")
PARTS = kohya.LORA_PARTS + LOHA_PARTS + LOKR_PARTS + OTHER_PARTS
_DETECTING = ("hada_w1_a", "lokr_w1", "lokr_w1_a", "on_input", "diff", "w_norm")
_REFUSED = {
    "a1.weight": "GLoRA, whose update multiplies the base weight by learned factors",
    "oft_blocks": "OFT/BOFT, which rotates the base weight rather than adding to it",
    "lambda_layer": "T-LoRA, whose rank depends on the diffusion timestep",
    "bias_indices": "a sparse residual from lycoris extract_diff, which no LyCORIS loader applies",
}


def sniff(path: Path) -> bool:
    keys = header_keys(path)
    if not keys or not kohya_style(keys):
        return False
    parts = {k.partition(".")[2] for k in keys}
    return bool(parts & set(_DETECTING) or parts & set(_REFUSED)) or any(k.startswith("lycoris_") for k in keys)


def khatri_rao(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down = (a1 @ b1) ⊙ (a2 @ b2): column (i, j) of up is a1[:, i]·a2[:, j],
    row (i, j) of down is b1[i]·b2[j]; rank r1·r2."""
    up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
    down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
    return up, down


def loha_factors(w1a, w1b, w2a, w2b, t1=None, t2=None) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
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
        raise SurgeonError(f"LoHa factors give {rows}×{cols} values, which cannot fill the base weight of shape {shape}.")
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


def _ia3(parts: dict[str, torch.Tensor], base, key: str, where: str) -> Dense:
    shape = base.info(key).shape
    vector = parts["weight"].reshape(-1)
    on_input = bool(int(parts["on_input"])) if "on_input" in parts else False
    axis = 1 if on_input else 0
    if vector.numel() != shape[axis]:
        raise SurgeonError(f"{where}: the (IA)³ vector has {vector.numel()} entries but the base weight has {shape[axis]} {'input' if on_input else 'output'} channels.")
    broadcast = [1] * len(shape)
    broadcast[axis] = -1
    return ia3_delta(base, key, 1 + vector.float().reshape(broadcast))


def _half_size(parts: dict[str, torch.Tensor], half: int) -> int:
    """How many values one Kronecker half has, from its stored tensors' shapes."""
    whole = parts.get(f"lokr_w{half}")
    if whole is not None:
        return whole.numel()
    a, b, core = parts[f"lokr_w{half}_a"], parts[f"lokr_w{half}_b"], parts.get(f"lokr_t{half}")
    if core is not None:  # Tucker: a is r×rows, b is r×cols
        return a.shape[1] * b.shape[1] * math.prod(core.shape[2:])
    return a.shape[0] * math.prod(b.shape[1:])


def lokr_delta(parts: dict[str, torch.Tensor], scale: float, shape: tuple[int, ...], where: str,
               combine: Callable[[], torch.Tensor] | None = None) -> Dense:
    """kron(w1, w2)·scale as a lazy Dense on a weight of ``shape``; ``combine`` replaces the
    Kronecker product of :func:`lokr_weight` where a producer forms it differently."""
    count = _half_size(parts, 1) * _half_size(parts, 2)
    if count != math.prod(shape):
        raise SurgeonError(f"{where}: the LoKr factors give {count} values, which cannot fill the base weight of shape {shape}.")
    combine = combine or (lambda: torch.kron(*lokr_weight(parts)))
    return Dense.lazy(lambda: combine().mul_(scale), shape, [t for k, t in parts.items() if k.startswith("lokr_")])


def _weight_delta(parts: dict[str, torch.Tensor], shape: tuple[int, ...], base, key: str, where: str):
    """The delta on the module's weight, or None for a bias/norm-only module."""
    if "hada_w1_a" in parts:
        factors = loha_factors(*(parts.get(p) for p in LOHA_PARTS))
        delta = loha_delta(factors, scale_of(parts.get("alpha"), int(parts["hada_w1_b"].shape[0])), shape, "dora_scale" in parts)
    elif "lokr_w1" in parts or "lokr_w1_a" in parts:
        delta = lokr_delta(parts, lokr_scale(parts), shape, where)
    elif "lora_down.weight" in parts:
        return lora_delta(parts, shape, where)
    elif "on_input" in parts or "weight" in parts:
        return _ia3(parts, base, key, where)
    elif "diff" in parts:
        return Dense(parts["diff"].reshape(shape))
    elif "w_norm" in parts:
        return Dense(parts["w_norm"].reshape(shape))
    else:
        return None
    if "dora_scale" in parts:
        delta = with_magnitude(delta, *dora_magnitude(parts["dora_scale"], shape, where))
    return delta


def read(path: Path, base=None) -> Adapter:
    """A LyCORIS file as canonical deltas keyed by the base checkpoint's parameter names."""
    path = Path(path)
    tensors_parts = {k.partition(".")[2] for k in (header_keys(path) or [])}
    for part, label in _REFUSED.items():
        if part in tensors_parts:
            raise SurgeonError(f"{path}: holds {label} ({part}); surgeon does not read that algorithm.")
    modules, adapter = read_modules(path, base, PARTS, NAME)
    for stem, module, parts in modules:
        where = f"{path}: {stem}"
        key = module + ".weight"
        shape = tuple(base.info(key).shape)
        delta = _weight_delta(parts, shape, base, key, where)
        if delta is not None:
            adapter.add(key, delta, module_type(shape))
        bias = parts.get("diff_b", parts.get("b_norm"))
        if bias is not None:
            if module + ".bias" not in base:
                raise SurgeonError(f"{where}: has a bias update but the base has no {module}.bias.")
            adapter.add(module + ".bias", Dense(bias.reshape(base.info(module + ".bias").shape)), "other")
    return adapter
