"""PEFT's other weight tuners, read from the same ``adapter_config.json`` + ``adapter_model``
layout as LoRA (``peft_type`` LOHA, LOKR, IA3 or VERA), each ΔW as PEFT's ``get_delta_weight``
or ``merge`` computes it (peft ``tuners/<method>/layer.py``):

- LoHa: (w1a @ w1b) ⊙ (w2a @ w2b) · alpha/r, Tucker cores ``hada_t1/t2`` on effective convs;
- LoKr: kron(w1, w2) · alpha/r, always (unlike LyCORIS, no scale-1 rule for two whole halves);
- IA3: W' = W ⊙ l (l per output row, or per input column for ``feedforward_modules``), and the
  bias of a non-feedforward module scaled by l too: ΔW = W ⊙ (l − 1), so reading needs the base;
- VeRA: ΔW = (λ_b ⊙ B[:out]) @ (λ_d ⊙ A[:, :in]) with the shared ``vera_A``/``vera_B`` saved in
  the file, or regenerated from ``projection_prng_key`` as PEFT does when they are not.

r and alpha come from the config (``r``, ``alpha``, ``rank_pattern``, ``alpha_pattern``), as PEFT
builds each layer. Shapes come from the base when it is given: a non-effective convolution's
factors are flat and only the base says its kernel.
"""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path

import torch

from surgeon.delta import Adapter, LowRank, Replace
from surgeon.errors import SurgeonError
from surgeon.formats.peft import CONFIG_FILE, load_tensors
from surgeon.formats.peft_rules import PREFIX, module_rank_alpha
from surgeon.keys import base_key_of
from surgeon.lycoris_math import LOHA_PARTS, LOKR_PARTS, ia3_delta, loha_delta, loha_factors, lokr_delta, lokr_weight

PARTS = {
    "LOHA": LOHA_PARTS,
    "LOKR": LOKR_PARTS,
    "IA3": ("ia3_l",),
    "VERA": ("vera_lambda_b", "vera_lambda_d"),
}
_SHARED = ("base_model.vera_A", "base_model.vera_B")
_TUNER_PART = re.compile(r"\.(hada_|lokr_|ia3_|vera_)")


def _loha(parts, config, module, shape, where):
    rank, alpha = module_rank_alpha(config, module, "alpha")
    if parts["hada_w1_b"].shape[0] != rank:
        raise SurgeonError(
            f"{where}: has rank {parts['hada_w1_b'].shape[0]} in its tensors but {rank} in {CONFIG_FILE}."
        )
    factors = loha_factors(*(parts.get(p) for p in LOHA_PARTS))
    natural = (factors[0][0].shape[0], factors[0][1].shape[1])
    if "hada_t1" in parts:
        natural = (factors[0][0].shape[0], parts["hada_w1_b"].shape[1], *parts["hada_t1"].shape[2:])
    return loha_delta(factors, alpha / rank, tuple(shape or natural), False)


def _kron_unlifted(parts, whole_w2):
    w1 = parts["lokr_w1"].float() if "lokr_w1" in parts else parts["lokr_w1_a"].float() @ parts["lokr_w1_b"].float()
    return torch.kron(w1, whole_w2.float())


def _lokr(parts, config, module, shape, where):
    rank, alpha = module_rank_alpha(config, module, "alpha")
    whole_w2 = parts.get("lokr_w2")
    combine = None
    if whole_w2 is not None and whole_w2.dim() == 3:
        # PEFT's make_kron lifts w1 only for a 4-D w2; torch.kron then lifts it at the front.
        combine = partial(_kron_unlifted, parts, whole_w2)
    if shape is None:  # the product's own shape, worked out on the meta device without computing it
        meta = {k: v.to("meta") for k, v in parts.items()}
        shape = tuple(torch.kron(*lokr_weight(meta)).shape)
    return lokr_delta(parts, alpha / rank, shape, where, combine)


def _ia3(parts, config, module, base, where, key):
    """W' = W ⊙ l as PEFT merges it, l broadcast per output row, per input column for
    feedforward modules (expanded per group for a grouped convolution), transposed for Conv1D."""
    if base is None:
        raise SurgeonError(
            f"{where}: an IA3 adapter scales the base weights (W' = W ⊙ l); pass --base so that its ΔW can be computed."
        )
    shape = base.info(key).shape
    scaling = parts["ia3_l"].float()
    feedforward = config.get("feedforward_modules") or []
    if isinstance(feedforward, str):
        is_feedforward = bool(re.fullmatch(feedforward, module))
    else:
        is_feedforward = any(module.endswith(m) for m in feedforward)
    if len(shape) > 2:
        if not is_feedforward:
            scaling = scaling.transpose(0, 1)
        elif scaling.shape[1] != shape[1]:  # grouped convolution: PEFT's expansion per group
            rest, per_group = scaling.shape[2:], shape[1]
            groups = scaling.shape[1] // per_group
            scaling = scaling.reshape(groups, 1, per_group, *rest).expand(groups, shape[0] // groups, per_group, *rest)
            scaling = scaling.reshape(shape[0], per_group, *rest)
    elif config.get("fan_in_fan_out", False):
        scaling = scaling.T
    return ia3_delta(base, key, scaling), is_feedforward


def _vera_projections(config, shared, modules, base, where):
    if "base_model.vera_A" in shared:
        return shared["base_model.vera_A"].float(), shared["base_model.vera_B"].float()
    if base is None:
        raise SurgeonError(
            f"{where}: the VeRA adapter was saved without its projections (save_projection false); pass --base so that "
            "they can be regenerated from projection_prng_key."
        )
    largest = (0, 0)
    for module in modules:
        shape = base.info(base_key_of(base, module + ".weight")).shape
        out_in = (shape[1], shape[0]) if config.get("fan_in_fan_out", False) else (shape[0], shape[1])
        largest = tuple(max(a, b) for a, b in zip(largest, out_in))
    generator = torch.Generator(device="cpu").manual_seed(config.get("projection_prng_key", 0))

    def kaiming(shape):
        bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)

    rank = config.get("r", 256)
    vera_a = kaiming((rank, largest[1]))
    return vera_a, kaiming((largest[0], rank))


def _vera(parts, shape, projections, fan_in_fan_out, where):
    if shape is None:
        raise SurgeonError(f"{where}: a VeRA module's input size is not in the file; pass --base to read it.")
    vera_a, vera_b = projections
    lambda_b, lambda_d = parts["vera_lambda_b"].float(), parts["vera_lambda_d"].float()
    in_features = shape[0] if fan_in_fan_out else shape[1]
    up = lambda_b[:, None] * vera_b[: lambda_b.numel(), :]
    down = lambda_d[:, None] * vera_a[:, :in_features]
    if fan_in_fan_out:
        return LowRank(down=up.T.contiguous(), up=down.T.contiguous(), shape=shape)
    return LowRank(down=down, up=up, shape=shape)


def read(path: Path, config: dict, base=None) -> Adapter:
    """A PEFT LoHa, LoKr, IA3 or VeRA adapter as canonical deltas."""
    peft_type = str(config["peft_type"]).upper()
    parts_of = PARTS[peft_type]
    tensors, metadata, file = load_tensors(path)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key in _SHARED:
            shared[key] = tensor
            continue
        if not key.startswith(PREFIX):
            raise SurgeonError(
                f"{file}: tensor {key!r} lacks the {PREFIX!r} prefix PEFT writes; the file is not a PEFT adapter."
            )
        key = key[len(PREFIX) :]
        module, _, part = key.rpartition(".")
        if part in parts_of:
            modules.setdefault(module, {})[part] = tensor
        elif _TUNER_PART.search(key):
            raise SurgeonError(
                f"{file}: tensor {key!r} is a {peft_type} part surgeon does not know; refusing rather than dropping it."
            )
        else:
            whole[key.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = tensor

    adapter = Adapter(
        source_format=f"peft-{peft_type.lower()}",
        base_model=config.get("base_model_name_or_path"),
        config=dict(config),
        metadata=metadata,
    )
    for key, tensor in whole.items():
        adapter.add(key, Replace(tensor), "other")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    projections = _vera_projections(config, shared, modules, base, str(file)) if peft_type == "VERA" else None
    for module, parts in modules.items():
        where = f"{file}: {module}"
        key = module + ".weight"
        base_key = base_key_of(base, key)
        if base is not None and base_key is None:
            raise SurgeonError(
                f"{where}: the base checkpoint has no weight for this module; pass the base the adapter was trained on."
            )
        shape = tuple(base.info(base_key).shape) if base_key else None
        module_type = "conv1d" if fan_in_fan_out else ("conv" if shape and len(shape) > 2 else "linear")
        if peft_type == "LOHA":
            delta = _loha(parts, config, module, shape, where)
        elif peft_type == "LOKR":
            delta = _lokr(parts, config, module, shape, where)
        elif peft_type == "VERA":
            delta = _vera(parts, shape, projections, fan_in_fan_out, where)
        else:
            delta, is_feedforward = _ia3(parts, config, module, base, where, base_key)
            bias_key = base_key_of(base, module + ".bias")
            if not is_feedforward and bias_key is not None:
                scaling = parts["ia3_l"].float().reshape(base.info(bias_key).shape)
                adapter.add(module + ".bias", ia3_delta(base, bias_key, scaling), "other")
        adapter.add(key, delta, module_type)
    return adapter
