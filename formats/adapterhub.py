"""AdapterHub adapters (the ``adapters`` library, formerly adapter-transformers): ``adapter_config.json``
as its ``build_full_config`` writes it (``{"config": {...}, "model_name", "model_class", "hidden_size",
"name", "version"}``) beside ``adapter.safetensors`` or ``pytorch_adapter.bin`` (its ``utils.py`` names).

The inner config's ``architecture`` picks the method (adapters ``configuration/adapter_config.py``):
none for a bottleneck adapter — Houlsby (``mh_adapter`` and ``output_adapter``), Pfeiffer
(``output_adapter`` only), parallel (``is_parallel``, He et al.), Compacter (``phm_layer``) — or
``prefix_tuning``, ``prompt_tuning``, ``lora`` (``composition_mode`` "scale" is (IA)³), ``reft``,
or ``union`` (several at once, in ``configs``).

Its LoRA and (IA)³ are read as weight deltas (:func:`read_lora`); every other method is read to be
described (family, layers, sizes, config) and refused: a bottleneck adapter adds a non-linear module
inside the layers and prefix tuning adds keys and values to the attention, which no change to the
weights can express, so export-onnx bakes them into the graph instead (:mod:`surgeon.adapterhub_run`;
:func:`bottleneck_weights` and :func:`prefix_weights` hand it their tensors); its prompt tuning is
prepended to the output of the embedding layer (after position embeddings and layer norm), where no
vocabulary row can reproduce it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from surgeon.checkpoint import load_pickle_weights, read_safetensors
from surgeon.checkpoint_files import read_json
from surgeon.errors import NotWeightDeltas, SurgeonError
from surgeon.formats.adapterhub_lora import read_lora
from surgeon.formats.layouts import ADAPTERHUB_CONFIG as CONFIG_FILE
from surgeon.formats.layouts import ADAPTERHUB_WEIGHTS as WEIGHT_FILES

NAME = "adapterhub"
#: Why each run-time method cannot become weight deltas, as a clause.
_RUN_TIME = {
    "bottleneck": "adds a bottleneck module (down-projection, non-linearity, up-projection) inside the layers at "
    "run time",
    "prefix_tuning": "adds learned keys and values to the attention of every layer at run time",
    "reft": "edits the hidden representations of chosen positions at run time",
    "prompt_tuning": "prepends its prompt to the output of the embedding layer at run time, after the position "
    "embeddings and layer norm (PEFT's goes before them, as vocabulary rows can)",
}
_NOT_YET = (
    ", which surgeon does not read as weight deltas yet",
    "run or merge it with the adapters library (model.load_adapter, model.merge_adapter)",
)
_RUN_TIME_ADVICE = "run it with the adapters library (model.load_adapter), or train a PEFT LoRA instead"
_BAKED_ADVICE = "export-onnx --adapter bakes it into an ONNX graph of the model, or run it with the adapters library"
_FIELDS = (
    "reduction_factor",
    "non_linearity",
    "mh_adapter",
    "output_adapter",
    "is_parallel",
    "scaling",
    "phm_layer",
    "inv_adapter",
    "prefix_length",
    "bottleneck_size",
    "r",
    "alpha",
    "selfattn_lora",
    "intermediate_lora",
    "output_lora",
    "leave_out",
)
_LAYER = re.compile(r"\.(\d+)\.")


def _bottleneck_family(config: dict) -> str:
    if config.get("phm_layer"):
        name = "Compacter" if config.get("mh_adapter") else "Compacter++"
    elif config.get("is_parallel"):
        name = "parallel bottleneck adapter (He et al.)"
    elif config.get("mh_adapter") and config.get("output_adapter"):
        name = "Houlsby bottleneck adapter (after attention and feed-forward)"
    elif config.get("output_adapter"):
        name = "Pfeiffer bottleneck adapter (after the feed-forward block)"
    else:
        name = "bottleneck adapter"
    return name + (f" with a {config['inv_adapter']} invertible adapter" if config.get("inv_adapter") else "")


def _method(config: dict) -> str:
    architecture = config.get("architecture") or "bottleneck"
    if architecture == "lora" and config.get("composition_mode") == "scale":
        return "ia3"
    return architecture


def family(config: dict) -> str:
    """The method an AdapterHub config describes, in words."""
    method = _method(config)
    if method == "union":
        parts = " + ".join(family(c) for c in config.get("configs") or [] if isinstance(c, dict))
        return f"union adapter ({parts})"
    names = {
        "bottleneck": _bottleneck_family(config),
        "prefix_tuning": "prefix tuning adapter",
        "lora": "LoRA adapter",
        "ia3": "(IA)³ adapter",
        "prompt_tuning": "prompt tuning adapter",
        "reft": "ReFT adapter",
    }
    return names.get(method, f"{method} adapter")


def _reason(config: dict) -> tuple[str, str]:
    """Why the adapter is not merged (a clause after its name) and what to do instead: the first
    of its parts that cannot be, for a union."""
    if _method(config) == "union":
        parts = [c for c in config.get("configs") or [] if isinstance(c, dict)]
        return next((_reason(c) for c in parts if _method(c) in _RUN_TIME), _reason(parts[0]) if parts else _NOT_YET)
    if _method(config) in _RUN_TIME:
        from surgeon.adapterhub_run import runs

        advice = _BAKED_ADVICE if runs(config) else _RUN_TIME_ADVICE
        return f" {_RUN_TIME[_method(config)]}, which no change to the weights can express", advice
    return _NOT_YET


def _check_method(config: dict, file: Path) -> None:
    """The fields that pick the method, of the config and of each part of a union, are what the library writes."""
    architecture, parts = config.get("architecture"), config.get("configs")
    if architecture is not None and not isinstance(architecture, str):
        raise SurgeonError(f'{file}: "architecture" is {architecture!r}, not a method name; restore the file saved.')
    if parts is not None and not (isinstance(parts, list) and all(isinstance(p, dict) for p in parts)):
        raise SurgeonError(f'{file}: "configs" is {parts!r}, not a list of adapter configs; restore the file saved.')
    for part in parts or []:
        _check_method(part, file)


def _load(path: Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    full = read_json(path / CONFIG_FILE)
    if not isinstance(full.get("config"), dict):
        raise SurgeonError(
            f'{path / CONFIG_FILE}: has no "config" object, which the adapters library writes; '
            "restore the file it saved."
        )
    _check_method(full["config"], path / CONFIG_FILE)
    file = next(path / name for name in WEIGHT_FILES if (path / name).is_file())
    tensors = read_safetensors(file)[0] if file.suffix == ".safetensors" else load_pickle_weights(file)
    return full, tensors, file


def _modules(tensors: dict[str, torch.Tensor]) -> list[dict]:
    """The tensors grouped over layers (``layer.*``), each group's shape and how many layers hold it."""
    groups: dict[tuple[str, str], int] = {}
    for key, tensor in tensors.items():
        group = (_LAYER.sub(".*.", key, count=1), "x".join(map(str, tensor.shape)))
        groups[group] = groups.get(group, 0) + 1
    return [{"target": target, "delta": shape, "count": n} for (target, shape), n in groups.items()]


def describe(full: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """What ``inspect`` shows of an AdapterHub adapter: family, layers, sizes and config."""
    config = full["config"]
    layers = sorted({int(m.group(1)) for k in tensors for m in [_LAYER.search(k)] if m})
    bottleneck = sorted(
        {int(t.shape[0]) for k, t in tensors.items() if re.search(r"adapter_down\.\d+\.weight$", k) and t.dim() == 2}
    )
    facts = {
        "family": f"AdapterHub {family(config)}",
        "adapter_name": full.get("name"),
        "base_model": full.get("model_name"),
        "model_class": full.get("model_class"),
        "hidden_size": full.get("hidden_size"),
        "layers": layers,
        "bottleneck_size": bottleneck,
        **{name: config[name] for name in _FIELDS if config.get(name) not in (None, [], {}, False)},
        "params": sum(t.numel() for t in tensors.values()),
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "config": config,
        "modules": _modules(tensors),
    }
    return {name: value for name, value in facts.items() if value not in (None, [])}


def read(path: Path, base=None):
    """An AdapterHub LoRA or (IA)³ as canonical deltas; any other method described and refused."""
    path = Path(path)
    full, tensors, file = _load(path)
    if _method(full["config"]) == "ia3" and base is None:
        raise NotWeightDeltas(
            f"{file}: an AdapterHub (IA)³ adapter scales the base weights (W' = W ⊙ alpha·l); pass --base so that "
            "its ΔW can be computed.",
            describe(full, tensors),
        )
    if _method(full["config"]) in ("lora", "ia3"):
        return read_lora(full, tensors, file, base)
    clause, advice = _reason(full["config"])
    what = f"an AdapterHub {family(full['config'])}{clause}"
    raise NotWeightDeltas(f"{file}: {what}, so surgeon cannot merge or convert it; {advice}.", describe(full, tensors))


# Where the adapters library's BERT (BertSelfOutput/BertOutput are its BottleneckLayers) and Llama
# (attention_adapters/output_adapters of each decoder layer) put a bottleneck adapter, by key.
_BOTTLENECK_KEY = re.compile(
    r"(?:^|\.)(\d+)\.(attention\.output|output|attention_adapters|output_adapters)\.adapters\.[^.]+\.(.+)$"
)


def bottleneck_weights(path: Path) -> tuple[dict, dict[tuple[int, str], dict[str, torch.Tensor]]]:
    """A bottleneck adapter's config (``build_full_config``'s, with ``model_type`` and ``hidden_size``
    beside the inner ``config``) and its tensors per (layer, place), the place "attention"
    (after the attention block) or "feed-forward" (after the feed-forward block), each named as in the
    library's ``Adapter`` module (``adapter_down.0.weight``, ...): what export-onnx runs in the model."""
    full, tensors, file = _load(Path(path))
    places: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _BOTTLENECK_KEY.search(key)
        if match is None:
            raise SurgeonError(
                f"{file}: tensor {key} is not after a layer's attention or feed-forward block, where the adapters "
                "library puts a BERT or Llama bottleneck adapter; give an adapter saved for one of them."
            )
        layer, where, name = match.groups()
        place = "attention" if where.startswith("attention") else "feed-forward"
        places.setdefault((int(layer), place), {})[name] = tensor
    return full, places


# The prefix pool the adapters library saves once at the model's top (``prefix_tuning.prefix_tunings``),
# beside a copy per layer (``...prefix_tuning.pool.prefix_tunings``): its self-attention prefix.
_PREFIX_KEY = re.compile(r"(?:^|\.)prefix_tuning\.prefix_tunings\.[^.]+\.self_prefix\.(.+)$")


def prefix_weights(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A prefix-tuning adapter's config (as :func:`bottleneck_weights`) and its self-attention prefix
    module's tensors, named as in the library's ``PrefixTuning`` (``wte.weight``, ``control_trans.0.weight``,
    ...): what export-onnx runs in the model."""
    full, tensors, file = _load(Path(path))
    found = {match.group(1): t for key, t in tensors.items() for match in [_PREFIX_KEY.search(key)] if match}
    if not found:
        raise SurgeonError(
            f"{file}: has no self-attention prefix (prefix_tuning.prefix_tunings.*.self_prefix.*), which the adapters "
            "library saves for BERT and Llama; give an adapter saved for one of them."
        )
    return full, found
