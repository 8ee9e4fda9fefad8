"""PEFT LoRA on bare parameters (``target_parameters``), read as PEFT's ``ParamWrapper`` defines it
(peft ``tuners/lora/layer.py``).

PEFT 0.21 on transformers 5 turns ``all-linear`` on Mixtral, Qwen3-MoE or OLMoE into LoRA on the
stacked expert tensors (``experts.gate_up_proj``, ``experts.down_proj``, experts × d1 × d2) and on the
router's ``gate.weight``. For ``num_experts`` E, ``lora_A`` is (r·E)×in and ``lora_B`` out×(r·E);
expert e's factors are ``A.reshape(E, r, in)[e]`` and ``B.reshape(out, r, E)[:, :, e]``, and
ΔW[e] = scale · B_e @ A_e in the parameter's (experts × out × in) layout, transposed where the
parameter is stored experts × in × out (``is_transposed``). A 2-D parameter is a plain linear LoRA.

A saved module path does not say which parameter it adapts: several parameters of one module are
wrapped one inside the other (``experts.base_layer`` is the inner wrapper), in an order that only
the model class decides. So the wrappers are asked of PEFT itself, injected into the base's model
built on the meta device, and reading such an adapter needs the base.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from surgeon.delta import Adapter, LowRank
from surgeon.errors import SurgeonError
from surgeon.experts import ExpertLowRank
from surgeon.model_names import fresh_meta_model


@dataclass(frozen=True)
class Wrapped:
    """What PEFT's ParamWrapper at one saved module path adapts, and how."""

    parameter: str  # the model's name for the adapted parameter
    experts: int
    transposed: bool  # the parameter is experts × in × out
    rank: int
    scale: float


def wrappers(path: Path, base, where: str) -> dict[str, Wrapped]:
    """Saved module path → :class:`Wrapped`, as PEFT injects the adapter's config into the base's model."""
    if base is None or getattr(base, "directory", None) is None:
        raise SurgeonError(
            f"{where}: the adapter puts LoRA on bare parameters (target_parameters), which only the base model's "
            "class lays out; pass the base checkpoint (--base)."
        )
    import peft
    from peft.tuners.lora.layer import ParamWrapper

    model = fresh_meta_model(base, where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on patterns are about training, not about reading
        try:
            peft.inject_adapter_in_model(peft.LoraConfig.from_pretrained(str(path)), model, low_cpu_mem_usage=True)
        except (ValueError, TypeError, KeyError) as error:
            raise SurgeonError(f"{where}: PEFT cannot apply this adapter to the base: {error}") from None
    return {
        name: Wrapped(
            parameter=f"{name.replace('.base_layer', '')}.{module.parameter_name}",
            experts=module.num_experts,
            transposed=module.num_experts > 1 and not module._did_swap_in_out_features,
            rank=module.r["default"],
            scale=module.scaling["default"],
        )
        for name, module in model.named_modules()
        if isinstance(module, ParamWrapper)
    }


def read_wrapped(adapter: Adapter, module: str, parts: dict, wrapped: Wrapped, file: Path) -> None:
    """One ParamWrapper's factors as the delta on the parameter it adapts."""
    a, b = parts.get("lora_A"), parts.get("lora_B")
    if a is None or b is None or set(parts) - {"lora_A", "lora_B"}:
        raise SurgeonError(
            f"{file}: {module!r} wraps the parameter {wrapped.parameter!r} and needs exactly lora_A and lora_B; "
            f"it has {', '.join(sorted(parts))}."
        )
    rank, experts = wrapped.rank, wrapped.experts
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank * experts or b.shape[1] != rank * experts:
        raise SurgeonError(
            f"{file}: {module!r} has factors of shapes {tuple(a.shape)} and {tuple(b.shape)}, but PEFT gives "
            f"{wrapped.parameter!r} rank {rank} on {experts} experts; the adapter does not belong to this base."
        )
    if experts == 1:
        adapter.add(wrapped.parameter, LowRank(a.contiguous(), b.contiguous(), wrapped.scale), "other")
        return
    down = a.reshape(experts, rank, a.shape[1])  # expert e: r × in
    up = b.reshape(b.shape[0], rank, experts).permute(2, 0, 1)  # expert e: out × r
    if wrapped.transposed:
        down, up = up.transpose(1, 2), down.transpose(1, 2)
    adapter.add(wrapped.parameter, ExpertLowRank(down.contiguous(), up.contiguous(), wrapped.scale), "other")
