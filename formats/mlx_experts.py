"""mlx-lm's stacked MoE experts (``SwitchLinear``: ``switch_mlp.gate_proj`` …) ↔ the checkpoint's
per-expert tensors (``experts.N.w1.weight``).

mlx-lm stacks the experts in its model's ``sanitize`` when it loads a Hugging Face checkpoint; the
map is read by running that very function on the checkpoint's key names, each given as a one-element
array holding its own number, never copied. ``LoRASwitchLinear`` (mlx_lm ``tuner/lora.py``) holds
``lora_a`` experts×r×in and ``lora_b`` experts×out×r, ΔW[e] = scale · lora_b[e] @ lora_a[e] (PEFT's
orientation, unlike mlx-lm's Linear LoRA).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from surgeon.delta import Adapter
from surgeon.experts import ExpertLowRank, gather_experts
from surgeon.formats.lora_only import fold


def switch_map(base) -> dict[str, tuple[str, int]]:
    """checkpoint key → (mlx-lm switch module, expert) for the ``base`` checkpoint; empty without one,
    or where mlx-lm stacks nothing or does not know the model."""
    if base is None or getattr(base, "directory", None) is None:
        return {}
    return _switch_map(base.directory, tuple(sorted(base.keys())))


@functools.lru_cache(maxsize=4)
def _switch_map(directory: Path, keys: tuple[str, ...]) -> dict[str, tuple[str, int]]:
    try:
        import mlx.core as mx
        from mlx_lm.utils import _get_classes, load_config

        config = load_config(directory)
        model_class, args_class = _get_classes(config)
        sanitized = model_class(args_class.from_dict(config)).sanitize({k: mx.array([i]) for i, k in enumerate(keys)})
    except Exception:  # no mlx, or a model mlx-lm does not define: it stacks nothing surgeon could know of
        return {}
    found = {}
    for name, codes in sanitized.items():
        if name not in keys and name.endswith(".weight") and codes.ndim == 2:
            for expert, code in enumerate(codes[:, 0].tolist()):
                found[keys[code]] = (name.removesuffix(".weight"), expert)
    return found


def take_switches(adapter: Adapter, base) -> tuple[dict[str, ExpertLowRank], Adapter]:
    """(switch module → one expert LoRA) for the adapter's deltas on per-expert tensors mlx-lm stacks,
    and the adapter without them."""
    return gather_experts(adapter, switch_map(base), "cannot write mlx")


def switch_tensors(switches: dict[str, ExpertLowRank], rank: int, scale: float) -> dict[str, torch.Tensor]:
    """LoRASwitchLinear's tensors, zero-padded to the adapter's one ``rank`` and scaled to its one ``scale``."""
    tensors = {}
    for module, delta in switches.items():
        pad = rank - delta.rank
        tensors[f"{module}.lora_a"] = torch.nn.functional.pad(delta.down, (0, 0, 0, pad)).contiguous()
        tensors[f"{module}.lora_b"] = torch.nn.functional.pad(fold(delta.up, delta.scale / scale), (0, pad))
    return tensors


def read_switch(adapter: Adapter, module: str, a: torch.Tensor, b: torch.Tensor, scale: float, base) -> None:
    """A LoRASwitchLinear's factors: with the base, per checkpoint tensor of each expert; without, as one."""
    delta = ExpertLowRank(a.contiguous(), b.contiguous(), scale)
    keys = sorted((expert, key) for key, (name, expert) in switch_map(base).items() if name == module)
    if not keys:
        adapter.add(f"{module}.weight", delta, "MoE expert")
    for expert, key in keys:
        adapter.add(key, delta.expert_rows(expert, 0, delta.shape[1]), "MoE expert")
