"""AdapterHub bottleneck adapters run inside a transformers 5 model, for export-onnx to trace them into the graph.

The ``adapters`` library (1.3) subclasses transformers 4's layers to run them; surgeon wraps the
transformers 5 modules instead, with the library's arithmetic (``methods/modeling.py``, ``Adapter`` and
``ParallelAdapter``: ``pre_forward``, ``forward``, ``post_forward``; eval mode, one active adapter), at
the places its BERT and Llama models run them (``models/bert``, ``models/llama``):

* BERT (post-norm): ``BertSelfOutput`` and ``BertOutput`` compute ``h = dropout(dense(input))`` and hand
  ``h``, the sublayer's input ``x`` and their ``LayerNorm`` to the adapter, which replaces ``LayerNorm(h + x)``.
* Llama (pre-norm): the adapter replaces the decoder layer's ``x + h`` after attention and after the
  MLP, with no layer norm; ``x`` is what the norm before the sublayer was given.

A sequential adapter (Houlsby, Pfeiffer) with input ``a`` computes ``up(act(down(a))) * scaling`` plus a
residual; its options say whether ``x`` is added (and the model's norm applied) before it
(``original_ln_before``) or after it (``original_ln_after``), which residual it adds
(``residual_before_ln``: ``h``, ``h + x`` or the normed sum), and its own norms (``ln_before``,
``ln_after``, ``adapter_residual_before_ln``). A parallel adapter (He et al.) reads ``x`` and its
output is added to ``h``. Compacter's PHM layers, invertible adapters and gating are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from surgeon.errors import SurgeonError

# model_type -> how its layers run an adapter; the two the adapters library's outputs were checked on
_POST_NORM = ("bert",)
_PRE_NORM = ("llama",)
# BnConfig's defaults (adapters configuration/adapter_config.py), for configs saved before an option existed
_DEFAULTS = {
    "original_ln_before": False,
    "original_ln_after": True,
    "residual_before_ln": True,
    "adapter_residual_before_ln": False,
    "ln_before": False,
    "ln_after": False,
    "is_parallel": False,
    "scaling": 1.0,
}
# options of the library's BnConfig that surgeon does not implement, with what they are
_REFUSED = (
    ("phm_layer", "Compacter's parameterized hypercomplex (PHM) layers"),
    ("inv_adapter", "an invertible adapter on the embeddings"),
    # the gate averages over every position, padding included, and what a model computes at padded
    # positions differs between runtimes (left padding: onnxruntime and torch differed by 1e-3)
    ("use_gating", "a gate averaged over every position, padding included, whose value no runtime fixes"),
)


def activation(name: str | None) -> nn.Module:
    """The adapters library's ``Activation_Function_Class``: transformers' table, plus leaky ReLU."""
    from transformers.activations import get_activation

    if name is None:
        return nn.Identity()
    if name.lower() == "leakyrelu":
        return nn.LeakyReLU()
    return get_activation(name.lower())


class Bottleneck(nn.Module):
    """One adapter at one place: the library's module layout (so its saved tensors load as they are)
    and its forward pass, in eval mode."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        down = tensors["adapter_down.1.weight" if config["ln_before"] else "adapter_down.0.weight"]
        size, hidden = down.shape
        layers = [nn.Linear(hidden, size), activation(config["non_linearity"])]
        if config["ln_before"]:
            self.adapter_norm_before = nn.LayerNorm(hidden)
            layers.insert(0, self.adapter_norm_before)
        self.adapter_down = nn.Sequential(*layers)
        self.adapter_up = nn.Linear(size, hidden)
        if config["ln_after"]:
            self.adapter_norm_after = nn.LayerNorm(hidden)
        if isinstance(config["scaling"], str):  # "learned" (one value) or "channel" (one per channel)
            self.scaling = nn.Parameter(tensors["scaling"].clone())
        else:
            self.scaling = float(config["scaling"])
        self.load_state_dict(tensors)

    def _added(self, a: torch.Tensor) -> torch.Tensor:
        """What the adapter adds, before its residual: ``Adapter.forward`` up to the residual."""
        return self.adapter_up(self.adapter_down(a)) * self.scaling

    def forward(self, h: torch.Tensor, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        """``h`` the sublayer's output, ``x`` its input (the residual stream), ``norm`` the model's norm
        after the sublayer (None for pre-norm models)."""
        config = self.config
        if config["is_parallel"]:
            added = self._added(x)
            h = h + (self.adapter_norm_after(added) if config["ln_after"] else added)
        else:
            h = self._sequential(h, x, norm)
        if config["original_ln_after"]:
            h = norm(h + x) if norm is not None else h + x
        return h

    def _sequential(self, h: torch.Tensor, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        """``Adapter.pre_forward`` then ``Adapter.forward``."""
        where = self.config["residual_before_ln"]
        residual = h
        if self.config["original_ln_before"]:
            h = h + x
            if norm is not None:
                residual = h if where == "post_add" else residual
                h = norm(h)
        residual = residual if where else h
        output = self._added(h)
        if self.config["ln_after"] and self.config["adapter_residual_before_ln"]:
            return self.adapter_norm_after(output + residual)
        return (self.adapter_norm_after(output) if self.config["ln_after"] else output) + residual


class _PostNormOutput(nn.Module):
    """BERT's ``BertSelfOutput``/``BertOutput`` with the adapter in place of ``LayerNorm(h + x)``,
    as the library's ``BertSelfOutputWithAdapters`` runs it."""

    def __init__(self, output: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.output, self.adapter = output, adapter

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        h = self.output.dropout(self.output.dense(hidden_states))
        return self.adapter(h, input_tensor, self.output.LayerNorm)


class _Stream:
    """The residual stream a pre-norm sublayer reads, handed from its norm to its wrapped output."""

    value: torch.Tensor | None = None


class _Remember(nn.Module):
    """The norm before a sublayer, keeping its input: the ``x`` the decoder layer adds back."""

    def __init__(self, norm: nn.Module, stream: _Stream):
        super().__init__()
        self.norm, self.stream = norm, stream

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.stream.value = hidden_states
        return self.norm(hidden_states)


class _PreNormSublayer(nn.Module):
    """Llama's attention or MLP returning ``adapter(h, x) - x``, so that the decoder layer's own
    ``x + ...`` gives the adapter's output where the library's layer computes it."""

    def __init__(self, sublayer: nn.Module, adapter: Bottleneck, stream: _Stream):
        super().__init__()
        self.sublayer, self.adapter, self.stream = sublayer, adapter, stream

    def forward(self, *args, **kwargs):
        out = self.sublayer(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        x = self.stream.value
        h = self.adapter(h, x, None) - x
        return (h, *out[1:]) if isinstance(out, tuple) else h


def _wrap_post_norm(layer: nn.Module, place: str, adapter: Bottleneck) -> None:
    owner, name = (layer.attention, "output") if place == "attention" else (layer, "output")
    setattr(owner, name, _PostNormOutput(getattr(owner, name), adapter))


def _wrap_pre_norm(layer: nn.Module, place: str, adapter: Bottleneck) -> None:
    norm, sublayer = ("input_layernorm", "self_attn") if place == "attention" else ("post_attention_layernorm", "mlp")
    stream = _Stream()
    setattr(layer, norm, _Remember(getattr(layer, norm), stream))
    setattr(layer, sublayer, _PreNormSublayer(getattr(layer, sublayer), adapter, stream))


def refused_option(config: dict) -> str | None:
    """What of an adapter's config surgeon does not run, in words; None when it runs all of it."""
    return next((what for option, what in _REFUSED if config.get(option)), None)


def _refuse_options(path: Path, config: dict, model_type: str) -> None:
    refused = refused_option(config)
    if config.get("residual_before_ln") == "post_add" and (model_type in _PRE_NORM or not config["original_ln_before"]):
        refused = 'residual_before_ln "post_add" without the model\'s norm before the adapter (the library fails)'
    if refused:
        raise SurgeonError(
            f"{path}: the bottleneck adapter has {refused}, which export-onnx does not run; give a Houlsby, Pfeiffer "
            "or parallel adapter without it."
        )


def _refuse_model(path: Path, full: dict, model: nn.Module) -> None:
    """One sentence where the adapter cannot run in ``model``: another architecture or width."""
    model_type, hidden = model.config.model_type, model.config.hidden_size
    saved_for = full.get("model_type") or model_type
    if model_type not in _POST_NORM + _PRE_NORM or saved_for != model_type or full.get("hidden_size", hidden) != hidden:
        raise SurgeonError(
            f"{path}: the bottleneck adapter was saved for a {saved_for} model of width {full.get('hidden_size')}, "
            f"and this is a {model_type} model of width {hidden}; export-onnx runs AdapterHub bottleneck adapters in "
            f"the {' and '.join(_POST_NORM + _PRE_NORM)} models they were trained on."
        )


def attach(model: nn.Module, path: Path) -> nn.Module:
    """``model`` with the AdapterHub bottleneck adapter at ``path`` wrapped into its layers, in place."""
    from surgeon.formats import adapterhub

    full, places = adapterhub.bottleneck_weights(path)
    config, model_type = {**_DEFAULTS, **full["config"]}, model.config.model_type
    _refuse_model(path, full, model)
    _refuse_options(path, config, model_type)
    base = model.base_model
    layers = base.encoder.layer if model_type in _POST_NORM else base.layers
    wrap = _wrap_post_norm if model_type in _POST_NORM else _wrap_pre_norm
    for (index, place), tensors in sorted(places.items()):
        if index >= len(layers):
            raise SurgeonError(
                f"{path}: the adapter has layer {index}, but the model has {len(layers)} layers; give the model it "
                "was trained on."
            )
        wrap(layers[index], place, _built(path, config, tensors, index, place))
    return model


def _built(path: Path, config: dict, tensors: dict[str, torch.Tensor], index: int, place: str) -> Bottleneck:
    try:
        return Bottleneck(config, tensors).eval()
    except (KeyError, RuntimeError) as error:  # a tensor missing, extra or of another shape than its config says
        raise SurgeonError(
            f"{path}: the {place} adapter of layer {index} does not match its adapter_config.json "
            f"({str(error).splitlines()[0]}); give the files the adapters library saved together."
        ) from None
