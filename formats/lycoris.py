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

from pathlib import Path

import torch

from surgeon.delta import Adapter, Dense
from surgeon.errors import SurgeonError
from surgeon.formats import kohya
from surgeon.formats.kohya import lora_delta, module_type, read_modules
from surgeon.formats.layouts import LYCORIS_REFUSED as _REFUSED
from surgeon.formats.layouts import header_keys
from surgeon.lycoris_math import (
    LOHA_PARTS,
    LOKR_PARTS,
    dora_magnitude,
    ia3_delta,
    loha_delta,
    loha_factors,
    lokr_delta,
    lokr_scale,
    scale_of,
    with_magnitude,
)

NAME = "lycoris"

OTHER_PARTS = ("weight", "on_input", "diff", "diff_b", "w_norm", "b_norm")
PARTS = kohya.LORA_PARTS + LOHA_PARTS + LOKR_PARTS + OTHER_PARTS


def _ia3(parts: dict[str, torch.Tensor], base, key: str, where: str) -> Dense:
    shape = base.info(key).shape
    vector = parts["weight"].reshape(-1)
    on_input = bool(int(parts["on_input"])) if "on_input" in parts else False
    axis = 1 if on_input else 0
    if vector.numel() != shape[axis]:
        raise SurgeonError(
            f"{where}: the (IA)³ vector has {vector.numel()} entries but the base weight has {shape[axis]} "
            f"{'input' if on_input else 'output'} channels."
        )
    broadcast = [1] * len(shape)
    broadcast[axis] = -1
    return ia3_delta(base, key, 1 + vector.float().reshape(broadcast))


def _weight_delta(parts: dict[str, torch.Tensor], shape: tuple[int, ...], base, key: str, where: str):
    """The delta on the module's weight, or None for a bias/norm-only module."""
    if "hada_w1_a" in parts:
        factors = loha_factors(*(parts.get(p) for p in LOHA_PARTS))
        delta = loha_delta(
            factors, scale_of(parts.get("alpha"), int(parts["hada_w1_b"].shape[0])), shape, "dora_scale" in parts
        )
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
