"""AdapterHub adapters that no weight delta expresses, run inside a transformers 5 model so that
export-onnx traces them into the graph: bottleneck adapters by :mod:`surgeon.bottleneck`, prefix
tuning here.

Prefix tuning, as the adapters library (1.3) runs it (``methods/prefix_tuning.py``, eval mode, one
adapter): its ``PrefixTuning`` module turns ``prefix_length`` learned embeddings into keys and values
for every layer, ``control_trans(wte)`` (linear, non-linearity, linear) viewed as
``[length, layers x 2, key-value heads, head size]``; each layer's attention puts its keys and values
before the tokens' own (after the rotary embedding, for Llama: the prefix has no position) and every
query attends to them. surgeon registers an attention function with transformers that does the same,
and the model's eager attention, with its eager masks, does the rest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from surgeon.errors import SurgeonError

ATTENTION = "surgeon_adapterhub_prefix"
_LAYERS = {
    "bert": lambda base: [layer.attention.self for layer in base.encoder.layer],
    "llama": lambda base: [layer.self_attn for layer in base.layers],
}


def attach(model: nn.Module, path: Path) -> nn.Module:
    """``model`` with the AdapterHub adapter at ``path`` running inside it (wrapped in place)."""
    from surgeon.checkpoint_files import read_json
    from surgeon.formats import adapterhub

    config = read_json(path / adapterhub.CONFIG_FILE)["config"]
    method = config.get("architecture") or "bottleneck"
    if method == "bottleneck":
        from surgeon.bottleneck import attach as attach_bottleneck

        return attach_bottleneck(model, path)
    if method == "prefix_tuning":
        return _attach_prefix(model, path)
    raise SurgeonError(
        f"{path}: an AdapterHub {adapterhub.family(config)} runs in the adapters library only; export-onnx bakes "
        "AdapterHub bottleneck adapters and prefix tuning into the graph, not this."
    )


def _prefixed_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The model's eager attention with the layer's prefix keys and values first, open to every query."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    keys = getattr(module, "adapterhub_prefix_keys", None)
    if keys is not None:
        batch, length = key.shape[0], keys.shape[-2]
        key = torch.cat([keys.expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([module.adapterhub_prefix_values.expand(batch, -1, -1, -1), value], dim=2)
        if attention_mask is not None:  # eager masks are additive: zero opens a position
            opened = attention_mask.new_zeros((*attention_mask.shape[:-1], length))
            attention_mask = torch.cat([opened, attention_mask], dim=-1)
    return eager(module, query, key, value, attention_mask, **kwargs)


def _prefix_states(path: Path, full: dict, tensors: dict[str, torch.Tensor], model: nn.Module, layers: int):
    """``PrefixTuning.forward`` for one row: [layers x 2, key-value heads, length, head size]."""
    from surgeon.bottleneck import activation

    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    size = config.hidden_size // config.num_attention_heads  # the library's head size
    wte = tensors["wte.weight"]
    hidden = activation(full["config"]["non_linearity"])(
        nn.functional.linear(wte, tensors["control_trans.0.weight"], tensors["control_trans.0.bias"])
    )
    states = nn.functional.linear(hidden, tensors["control_trans.2.weight"], tensors["control_trans.2.bias"])
    if states.shape[-1] != layers * 2 * heads * size:
        raise SurgeonError(
            f"{path}: the prefix holds {states.shape[-1]} values per position, but {layers} layers of {heads} key-value"
            f" heads of size {size} need {layers * 2 * heads * size}; give the model it was trained on."
        )
    return states.view(wte.shape[0], layers * 2, heads, size).permute(1, 2, 0, 3)


def _prefix_refused(config: dict) -> str | None:
    return "an ejected (flat) prefix" if config.get("flat") else "gating" if config.get("use_gating") else None


def runs(config: dict) -> bool:
    """Whether export-onnx runs an adapter of this AdapterHub config (its inner ``config``) in the graph."""
    from surgeon.bottleneck import refused_option

    method = config.get("architecture") or "bottleneck"
    if method == "bottleneck":
        return refused_option(config) is None
    return method == "prefix_tuning" and _prefix_refused(config) is None


def _refuse_prefix(path: Path, full: dict, model: nn.Module) -> None:
    model_type = model.config.model_type
    refused = _prefix_refused(full["config"])
    if refused:
        raise SurgeonError(f"{path}: the prefix-tuning adapter has {refused}, which export-onnx does not run.")
    if model_type not in _LAYERS or full.get("model_type", model_type) != model_type:
        raise SurgeonError(
            f"{path}: the prefix-tuning adapter was saved for a {full.get('model_type')} model and this is a "
            f"{model_type} model; export-onnx runs AdapterHub prefix tuning in the {' and '.join(_LAYERS)} models "
            "it was trained on."
        )


def _attach_prefix(model: nn.Module, path: Path) -> nn.Module:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    from surgeon.formats import adapterhub

    full, tensors = adapterhub.prefix_weights(path)
    _refuse_prefix(path, full, model)
    attentions = _LAYERS[model.config.model_type](model.base_model)
    kept = [a for i, a in enumerate(attentions) if i not in (full["config"].get("leave_out") or [])]
    with torch.no_grad():
        states = _prefix_states(path, full, tensors, model, len(kept))
    for index, attention in enumerate(kept):
        attention.register_buffer("adapterhub_prefix_keys", states[2 * index].clone())
        attention.register_buffer("adapterhub_prefix_values", states[2 * index + 1].clone())
    AttentionInterface.register(ATTENTION, _prefixed_attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)
    model.set_attn_implementation(ATTENTION)
    return model
