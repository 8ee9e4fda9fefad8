"""AdapterHub's LoRA and (IA)³ (``LoRAConfig``, ``IA3Config``) as weight deltas, as the ``adapters``
library (1.3, ``methods/lora.py``) computes them.

Keys are ``<module>.loras.<adapter name>.lora_A`` (r×in) and ``.lora_B`` (out×r), the module named by
its path in the model class that saved it (``encoder.layer.0.attention.self.query`` in a BertModel,
``model.layers.0.self_attn.q_proj`` in a LlamaForCausalLM); the base's keys are matched as for any
adapter (a leading component added or removed, transformers 5's renames).

- ``composition_mode`` "add" (LoRA): ΔW = alpha/r · B@A, as ``LoRALinear.merge_adapter``;
- "scale" ((IA)³, r = 1, only ``lora_B``): the layer's output is multiplied by alpha · lora_B, one factor
  per output feature, whatever the module (unlike PEFT, no feed-forward input side): W' = W ⊙ alpha·l
  row by row, and the bias likewise. The library's own ``merge_adapter`` scales the weight and leaves
  the bias, so that its merged model does not give its adapter's outputs on a layer with a bias; surgeon
  follows the forward pass.

Dropout and ``init_weights`` do not change a trained adapter. Gating (``use_gating``, which the library
cannot merge either), DoRA (``use_dora``: its norm is of W + B@A without alpha/r), VeRA (``vera_d``,
``vera_b``) and the grouped factors of a fused attention projection (GPT-2's ``c_attn``) are refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from surgeon.delta import Adapter, LowRank
from surgeon.errors import SurgeonError
from surgeon.formats.adapter_config import check_name, check_number, check_rank
from surgeon.formats.layouts import ADAPTERHUB_CONFIG, ADAPTERHUB_HEAD
from surgeon.keys import base_key_of
from surgeon.lycoris_math import ia3_delta

_KEY = re.compile(r"^(?P<module>.+)\.loras\.[^.]+\.(?P<part>lora_A|lora_B)$")
#: Config options whose update no weight delta holds, with the reason.
_REFUSED = {
    "use_gating": "gating (use_gating), whose gate depends on each input, so that the library cannot merge it either",
    "use_dora": "DoRA (use_dora), which the library normalises by the norm of W + B@A without its alpha/r",
    "vera_d": "VeRA (vera_d), whose shared random projections are not in the file",
    "vera_b": "VeRA (vera_b), whose shared random projections are not in the file",
}
_ADVICE = "merge it with the adapters library (model.merge_adapter) instead"


def _check_config(config: dict, file: Path) -> None:
    check_rank(config.get("r", 8), file.parent / ADAPTERHUB_CONFIG, "config.r")
    check_number(config.get("alpha", 8), file.parent / ADAPTERHUB_CONFIG, "config.alpha")
    for option, label in _REFUSED.items():
        if config.get(option) not in (None, False):
            raise SurgeonError(f"{file}: an AdapterHub LoRA with {label}; surgeon cannot merge it, {_ADVICE}.")
    if config.get("composition_mode", "add") not in ("add", "scale"):
        raise SurgeonError(
            f"{file}: composition_mode {config['composition_mode']!r} is neither 'add' (LoRA) nor 'scale' ((IA)³), "
            "the two the adapters library knows; restore the file it saved."
        )


def _modules(tensors: dict[str, torch.Tensor], file: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors per adapted module: ``{module: {"lora_A": …, "lora_B": …}}``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise SurgeonError(
                f"{file}: tensor {key!r} is no LoRA factor (<module>.loras.<name>.lora_A or lora_B); surgeon refuses "
                f"rather than drop it, {_ADVICE}."
            )
        modules.setdefault(match["module"], {})[match["part"]] = tensor
    return modules


def _base_shape(base, key: str) -> tuple[int, ...] | None:
    found = base_key_of(base, key)
    return tuple(base.info(found).shape) if found is not None else None


def _lora(parts: dict[str, torch.Tensor], config: dict, base, module: str, file: Path) -> LowRank:
    rank = config.get("r", 8)
    down, up = parts.get("lora_A"), parts.get("lora_B")
    if down is None or up is None or down.dim() != 2 or up.dim() != 2 or down.shape[0] != rank:
        shapes = {name: tuple(t.shape) for name, t in parts.items()}
        raise SurgeonError(
            f"{file}: {module} has LoRA factors {shapes} for r={rank}; the library adapts a fused attention "
            f"projection (GPT-2's c_attn) with grouped factors, which surgeon does not read, {_ADVICE}."
        )
    delta = LowRank(down=down, up=up, scale=float(config.get("alpha", 8)) / rank)
    shape = _base_shape(base, module + ".weight")
    if shape is not None and shape != delta.shape:
        raise SurgeonError(
            f"{file}: {module}'s LoRA is {delta.shape[0]}×{delta.shape[1]} but the base weight is {shape}; the "
            f"library transposes GPT-2's Conv1D layers, which surgeon does not read from AdapterHub yet, {_ADVICE}."
        )
    return delta


def _ia3(parts: dict[str, torch.Tensor], config: dict, base, module: str, file: Path, adapter: Adapter) -> None:
    """W' = W ⊙ alpha·l per output row, and b' = b ⊙ alpha·l, both read from the base when applied."""
    vector = parts.get("lora_B")
    weight_key = base_key_of(base, module + ".weight")
    if vector is None or "lora_A" in parts or weight_key is None:
        raise SurgeonError(
            f"{file}: {module} has {sorted(parts)} for the base's {weight_key or 'nothing'}; an (IA)³ module holds "
            "one lora_B vector per output feature of a base weight."
        )
    out_features = base.info(weight_key).shape[0]
    if vector.numel() != out_features:
        raise SurgeonError(
            f"{file}: {module}'s (IA)³ vector has {vector.numel()} entries but the base weight {weight_key!r} has "
            f"{out_features} outputs; the library adapts GPT-2's fused and Conv1D layers otherwise, {_ADVICE}."
        )
    scaling = vector.float().reshape(-1) * float(config.get("alpha", 1))
    adapter.add(module + ".weight", ia3_delta(base, weight_key, scaling[:, None]))
    bias_key = base_key_of(base, module + ".bias")
    if bias_key is not None:
        adapter.add(module + ".bias", ia3_delta(base, bias_key, scaling), "other")


def _head_note(folder: Path) -> list[str]:
    heads = [name for name in ADAPTERHUB_HEAD if (folder / name).is_file()]
    if not heads:
        return []
    return [
        f"{folder}: the prediction head saved beside the adapter ({', '.join(heads)}) is no weight delta and was "
        "left out; load it with the adapters library (model.load_head) where the model needs a trained head."
    ]


def read_lora(full: dict, tensors: dict[str, torch.Tensor], file: Path, base=None) -> Adapter:
    """The LoRA or (IA)³ adapter of an AdapterHub ``adapter_config.json`` (``full``) and its ``tensors``;
    a prediction head saved beside it is left out, with a note. (IA)³ needs ``base``: it scales its weights."""
    config = full["config"]
    _check_config(config, file)
    scale_mode = config.get("composition_mode") == "scale"
    adapter = Adapter(
        source_format="adapterhub-ia3" if scale_mode else "adapterhub",
        base_model=check_name(full.get("model_name"), file.parent / ADAPTERHUB_CONFIG, "model_name"),
        config=dict(full),
        notes=_head_note(file.parent),
    )
    for module, parts in _modules(tensors, file).items():
        if scale_mode:
            _ia3(parts, config, base, module, file, adapter)
        else:
            adapter.add(module + ".weight", _lora(parts, config, base, module, file))
    return adapter
