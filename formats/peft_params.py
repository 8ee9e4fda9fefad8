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
built on the meta device, and reading such an adapter needs the base (its config.json is enough: the
recorded base's, where it is a local folder or in the Hub cache).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from surgeon.checkpoint_files import model_config
from surgeon.delta import Adapter, LowRank
from surgeon.errors import SurgeonError
from surgeon.experts import ExpertLowRank
from surgeon.formats.peft_rules import PREFIX
from surgeon.model_names import fresh_meta_model, meta_model


@dataclass(frozen=True)
class Wrapped:
    """What PEFT's ParamWrapper at one saved module path adapts, and how."""

    parameter: str  # the model's name for the adapted parameter
    experts: int
    transposed: bool  # the parameter is experts × in × out
    rank: int
    scale: float


@dataclass(frozen=True)
class RecordedBase:
    """The base an adapter recorded, known by its config.json alone: enough to build its model on the
    meta device, which is all that laying out the adapter's parameters needs."""

    directory: Path

    def config(self) -> dict:
        return model_config(self.directory)


def recorded_base(origin: str | None) -> RecordedBase | None:
    """The recorded base (``base_model_name_or_path``) where its config.json is at hand: a local
    folder or the Hub cache (:func:`surgeon.hub.recorded_config`)."""
    from surgeon.hub import recorded_config

    found = recorded_config(origin)
    return RecordedBase(found.parent) if found else None


def saved_wrappers(path: Path, base, where: str) -> dict[str, Wrapped]:
    """Saved module path → :class:`Wrapped` for the adapter saved at ``path``."""
    import peft

    return wrappers(lambda: peft.LoraConfig.from_pretrained(str(path)), base, where)


def wrappers(lora_config, base, where: str) -> dict[str, Wrapped]:
    """Saved module path → :class:`Wrapped`, as PEFT injects ``lora_config()`` into the base's model."""
    if base is None or getattr(base, "directory", None) is None:
        raise SurgeonError(
            f"{where}: the adapter puts LoRA on bare parameters (target_parameters), which only the base model's "
            "class lays out, and the base it records is neither a local folder nor in the Hub cache; pass the base "
            "checkpoint (--base)."
        )
    import peft
    from peft.tuners.lora.layer import ParamWrapper

    model = fresh_meta_model(base, where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on patterns are about training, not about reading
        try:
            peft.inject_adapter_in_model(lora_config(), model, low_cpu_mem_usage=True)
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
        adapter.add(wrapped.parameter, LowRank(a.contiguous(), b.contiguous(), wrapped.scale), "linear")
        return
    down = a.reshape(experts, rank, a.shape[1])  # expert e: r × in
    up = b.reshape(b.shape[0], rank, experts).permute(2, 0, 1)  # expert e: out × r
    if wrapped.transposed:
        down, up = up.transpose(1, 2), down.transpose(1, 2)
    adapter.add(wrapped.parameter, ExpertLowRank(down.contiguous(), up.contiguous(), wrapped.scale), "MoE expert")


def _wrappable(module) -> bool:
    """Whether surgeon writes LoRA on ``module`` as a module of its own (PEFT's Linear, Embedding, Conv)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.modules.conv._ConvNd, Conv1D))


def take_parameters(adapter: Adapter, base, names) -> tuple[dict[str, list], Adapter]:
    """(parameter → its deltas) that PEFT holds only as LoRA on a bare parameter (``target_parameters``):
    a stacked expert parameter, or the low-rank delta on the weight of a module PEFT cannot wrap (a MoE
    router); and ``adapter`` without them. ``adapter`` is keyed by the model's names (``names``)."""
    if names is None:
        return {}, adapter
    modules = dict(meta_model(base.directory, names.model_class).named_modules())

    def bare(key: str) -> bool:
        module = modules.get(key.rpartition(".")[0])
        lows = all(d.factored() is not None or d.kind == ExpertLowRank.kind for d in adapter.deltas[key])
        return key in names.stacked_parts or (module is not None and lows and not _wrappable(module))

    taken = {key: deltas for key, deltas in adapter.deltas.items() if bare(key)}
    rest = {key: deltas for key, deltas in adapter.deltas.items() if key not in taken}
    return taken, replace(adapter, deltas=rest, module_types={k: adapter.module_types.get(k, "linear") for k in rest})


def write_parameters(params: dict[str, list], base, tensors: dict, ranks: dict, scales: dict) -> None:
    """PEFT's ParamWrapper tensors for ``params`` into ``tensors``, their ranks and scales by parameter name."""
    if not params:
        return
    import peft

    where = "cannot write PEFT LoRA"
    wrapped = wrappers(lambda: peft.LoraConfig(target_parameters=sorted(params)), base, where)
    missing = sorted(set(params) - {w.parameter for w in wrapped.values()})
    if missing:
        raise SurgeonError(f"{where}: PEFT puts no LoRA on the parameter {missing[0]!r}; merge it instead.")
    for path, w in wrapped.items():
        a, b, rank, scale = _factors(params[w.parameter], w, where)
        tensors[f"{PREFIX}{path}.lora_A.weight"], tensors[f"{PREFIX}{path}.lora_B.weight"] = a, b
        ranks[w.parameter], scales[w.parameter] = rank, scale


def _factors(deltas: list, w: Wrapped, where: str) -> tuple:
    """(lora_A, lora_B, rank, scale) of PEFT's ParamWrapper for the deltas on one parameter."""
    if w.experts == 1:
        low = LowRank.stack(w.parameter, [d.factored() for d in deltas])
        if low.is_dora:
            raise SurgeonError(f"{where}: {w.parameter!r} has a DoRA update, which PEFT allows on modules only.")
        return low.down.contiguous(), low.up.contiguous(), low.rank, low.scale
    if len(deltas) != 1 or deltas[0].kind != ExpertLowRank.kind:
        raise SurgeonError(
            f"{where}: {w.parameter!r} is a stacked MoE parameter with {deltas[0].label}, and PEFT holds one LoRA per "
            "expert there; merge it into the base instead (surgeon merge)."
        )
    delta = deltas[0]
    down, up = (delta.up.transpose(1, 2), delta.down.transpose(1, 2)) if w.transposed else (delta.down, delta.up)
    experts, rank = down.shape[0], down.shape[1]
    a = down.reshape(experts * rank, down.shape[2])
    b = up.permute(1, 2, 0).reshape(up.shape[1], rank * experts)
    return a.contiguous(), b.contiguous(), rank, delta.scale
