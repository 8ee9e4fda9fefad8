"""PEFT LoRA adapters: ``adapter_config.json`` beside ``adapter_model.safetensors`` (or ``.bin``).

Keys are ``base_model.model.<module>.lora_A.weight`` (r×in) and ``.lora_B.weight`` (out×r),
ΔW = alpha/r · B@A (alpha/√r with ``use_rslora``), with per-module r and alpha from
``rank_pattern``/``alpha_pattern``. Embeddings use ``lora_embedding_A/B`` and ΔW = s·(B@A)ᵀ;
GPT-2's ``Conv1D`` stores W as in×out (``fan_in_fan_out``); convolutions have a k×k A and a 1×1 B.
Everything else PEFT saves is a whole tensor: ``modules_to_save``, trained biases, and the base
layer of a targeted embedding. Config options that change the math and are not handled here are
refused by name, never dropped.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from surgeon.checkpoint import load_pickle_weights, read_safetensors
from surgeon.delta import FACTOR_DTYPES, MODULE_TYPES, Adapter, Dense, LowRank, Replace
from surgeon.errors import SurgeonError
from surgeon.formats import adapter_config, peft_params
from surgeon.formats.layouts import DIFFUSERS_COMPONENTS as COMPONENTS
from surgeon.formats.layouts import PEFT_CONFIG as CONFIG_FILE
from surgeon.formats.layouts import PEFT_WEIGHTS as WEIGHT_FILES
from surgeon.formats.lora_only import Picked, pick_targets, refusal
from surgeon.formats.peft_rules import LORA_KEY as _LORA_KEY
from surgeon.formats.peft_rules import PREFIX, check_modules_match, factor_rank, module_rank_alpha, scale_of, targeted
from surgeon.formats.peft_rules import UNSUPPORTED as _UNSUPPORTED
from surgeon.model_names import check_modules, named_for_peft

NAME = "peft"


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    for name in WEIGHT_FILES:
        file = path / name
        if file.is_file():
            if name.endswith(".safetensors"):
                return (*read_safetensors(file), file)
            return load_pickle_weights(file), {}, file
    raise SurgeonError(f"{path}: has {CONFIG_FILE} but no {' or '.join(WEIGHT_FILES)}.")


def read(path: Path, base=None) -> Adapter:
    """A PEFT LoRA/DoRA adapter as canonical deltas keyed by the base model's parameter names."""
    path = Path(path)
    config = adapter_config.load(path / CONFIG_FILE)
    if "peft_type" not in config:
        raise SurgeonError(
            f"{path / CONFIG_FILE}: has no peft_type, so it is not a PEFT adapter config; restore the file PEFT saved."
        )
    adapter_config.check_peft(config, path / CONFIG_FILE)
    peft_type = config["peft_type"].upper()
    if peft_type != "LORA":
        from surgeon.formats import peft_prompts, peft_tuners

        if peft_type in peft_tuners.PARTS:
            return peft_tuners.read(path, config, base)
        if peft_type in peft_prompts.TYPES:
            return peft_prompts.read(path, config, base)
        raise SurgeonError(
            f"{path / CONFIG_FILE}: peft_type {peft_type!r} is not supported yet; surgeon reads PEFT "
            "LoRA, DoRA, LoHa, LoKr, IA3, VeRA, prompt tuning and P-tuning."
        )
    for option, label in _UNSUPPORTED.items():
        if config.get(option) not in (None, False, [], {}):
            raise SurgeonError(f"{path / CONFIG_FILE}: uses {label} ({option}), which surgeon does not support yet.")
    tensors, metadata, file = load_tensors(path)
    rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

    modules: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise SurgeonError(
                f"{file}: tensor {key!r} lacks the {PREFIX!r} prefix PEFT writes; the file is not a PEFT LoRA adapter."
            )
        key = key[len(PREFIX) :]
        match = _LORA_KEY.match(key)
        if match:
            check_part(
                file,
                PREFIX + key,
                tensor,
                1 if match["part"] == "lora_magnitude_vector" or match["rest"] == ".bias" else 2,
            )
            modules.setdefault(match["module"], {})[
                match["part"] + (match["rest"] if match["rest"] == ".bias" else "")
            ] = tensor
        elif re.search(r"\.lora_[A-Za-z_]+", key):
            raise SurgeonError(
                f"{file}: tensor {key!r} is a LoRA part surgeon does not know; refusing rather than dropping it."
            )
        else:
            whole[key.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = tensor

    check_modules_match(config, modules, path / CONFIG_FILE)
    adapter = Adapter(
        source_format=NAME, base_model=config.get("base_model_name_or_path"), config=config, metadata=metadata
    )
    for key, tensor in whole.items():  # replacements first: LoRA applies on top of them
        adapter.add(key, Replace(tensor), "other")
    wrapped = {}
    if config.get("target_parameters"):
        layout = base or peft_params.recorded_base(config.get("base_model_name_or_path"))
        wrapped = peft_params.saved_wrappers(path, layout, str(path / CONFIG_FILE))
    for module, parts in modules.items():
        if module in wrapped:
            peft_params.read_wrapped(adapter, module, parts, wrapped[module], file)
        else:
            read_module(adapter, module, parts, config, rslora, fan_in_fan_out, file)
    return adapter


def check_part(file: Path, key: str, tensor: torch.Tensor, least_dims: int) -> None:
    """A LoRA part must be a float tensor of at least ``least_dims`` dimensions (factors are matrices
    or convolution kernels, magnitudes and biases vectors)."""
    if tensor.dtype not in FACTOR_DTYPES:
        raise SurgeonError(
            f"{file}: tensor {key!r} is {tensor.dtype}; LoRA parts must be fp16, bf16, fp32 or fp64, "
            "and a quantized adapter must be dequantized first."
        )
    if tensor.dim() < least_dims:
        raise SurgeonError(
            f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, but this LoRA part has at least "
            f"{least_dims} dimensions; the file is damaged."
        )


def read_module(
    adapter: Adapter, module: str, parts: dict, config: dict, rslora: bool, fan_in_fan_out: bool, file: Path
) -> None:
    key = module + ".weight"
    embedding = "lora_embedding_A" in parts
    a = parts.get("lora_embedding_A" if embedding else "lora_A")
    b = parts.get("lora_embedding_B" if embedding else "lora_B")
    if a is None or b is None:
        raise SurgeonError(f"{file}: module {module!r} has only one of its LoRA factors; the file is incomplete.")
    magnitude = parts.get("lora_magnitude_vector")
    rank = factor_rank(file, module, a.shape, b.shape, None if magnitude is None else magnitude.shape)
    configured_rank, alpha = module_rank_alpha(config, module)
    if configured_rank != rank:
        raise SurgeonError(
            f"{file}: {module!r} has rank {rank} in its tensors but {configured_rank} in {CONFIG_FILE}; the config "
            "does "
            "not belong to these weights."
        )
    scale = scale_of(alpha, rank, rslora)
    if embedding:
        module_type, up, down, shape, axis = "embedding", a.T, b.T, (a.shape[1], b.shape[0]), 1
    elif a.dim() > 2:
        module_type, axis = "conv", 0
        up, down, shape = b.reshape(b.shape[0], rank), a.reshape(rank, -1), (b.shape[0], *a.shape[1:])
    elif fan_in_fan_out:
        module_type, up, down, shape, axis = "conv1d", a.T, b.T, (a.shape[1], b.shape[0]), 1
    else:
        module_type, up, down, shape, axis = "linear", b, a, (b.shape[0], a.shape[1]), 0
    adapter.add(
        key,
        LowRank(
            down=down.contiguous(),
            up=up.contiguous(),
            scale=scale,
            shape=shape,
            magnitude=None if magnitude is None else magnitude.reshape(-1),
            magnitude_axis=axis,
        ),
        module_type,
    )
    adapter.module_types[key] = module_type
    if "lora_B.bias" in parts:
        adapter.add(module + ".bias", Dense(parts["lora_B.bias"] * scale), module_type)


def _module_of(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def peft_factors(key: str, delta: LowRank, module_type: str) -> dict[str, torch.Tensor]:
    """PEFT's tensors for one low-rank delta, from the canonical orientation."""
    if module_type == "embedding":
        return {"lora_embedding_A": delta.up.T, "lora_embedding_B": delta.down.T}
    if module_type == "conv1d":
        return {"lora_A.weight": delta.up.T, "lora_B.weight": delta.down.T}
    if module_type == "conv" or len(delta.shape) > 2:
        rank = delta.rank
        return {
            "lora_A.weight": delta.down.reshape(rank, *delta.shape[1:]),
            "lora_B.weight": delta.up.reshape(delta.shape[0], rank, *([1] * (len(delta.shape) - 2))),
        }
    return {"lora_A.weight": delta.down, "lora_B.weight": delta.up}


def _config_reproduces(config: dict, ranks: dict[str, int], scales: dict[str, float]) -> bool:
    rslora = bool(config.get("use_rslora", False))
    for module, rank in ranks.items():
        configured_rank, alpha = module_rank_alpha(config, module)
        if configured_rank != rank or not math.isclose(scale_of(alpha, rank, rslora), scales[module], rel_tol=1e-6):
            return False
    return True


def _mode(values):
    return Counter(values).most_common(1)[0][0]


def rank_alpha_config(ranks: dict[str, int], scales: dict[str, float], rslora: bool) -> dict:
    alphas = {m: scales[m] * (math.sqrt(r) if rslora else r) for m, r in ranks.items()}
    alphas = {m: round(a) if math.isclose(a, round(a), rel_tol=1e-9) else a for m, a in alphas.items()}
    r, alpha = _mode(ranks.values()), _mode(alphas.values())
    return {
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
    }


def _one_model(adapter: Adapter) -> tuple[Adapter, list[str]]:
    """A diffusers adapter's keys start with the pipeline component they patch (``unet.``), which
    is no module of the model PEFT loads the adapter into: the prefix is dropped, and an adapter
    for several components, which no single model holds, is refused. Keys already named by a
    base checkpoint's own are kept."""
    heads = sorted({key.partition(".")[0] for key in adapter.deltas})
    if adapter.source_format != "diffusers" or not heads or not set(heads) <= set(COMPONENTS):
        return adapter, []
    if len(heads) > 1:
        raise SurgeonError(
            f"cannot write PEFT LoRA: the adapter patches several pipeline components "
            f"({', '.join(heads)}) and a PEFT adapter loads into one model; convert it to diffusers or "
            "kohya instead."
        )
    cut = len(heads[0]) + 1
    stripped = adapter.renamed(lambda key: key[cut:])
    note = f"the pipeline component prefix '{heads[0]}.' was dropped: PEFT loads the adapter into that model itself."
    return stripped, [note]


def write(adapter: Adapter, staging: Path, base=None) -> list[str]:
    """Write ``adapter`` as a PEFT LoRA adapter directory that ``PeftModel.from_pretrained`` loads.
    With the ``base`` checkpoint, keys are written as its model class names its modules (transformers
    renames some on load), and each must be one of them."""
    source = adapter.config if adapter.source_format == NAME else {}
    adapter, notes = _one_model(adapter)
    adapter, names = named_for_peft(adapter, base, "cannot write PEFT LoRA")
    params, adapter = peft_params.take_parameters(adapter, base, names)
    picked = (
        pick_targets(adapter, "PEFT LoRA", MODULE_TYPES, allow_dora=True, keeps=("replacement", "dense"))
        if adapter.deltas or not params
        else Picked([], [], [])
    )
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    scales: dict[str, float] = {}
    peft_params.write_parameters(params, base, tensors, ranks, scales)
    types: dict[str, str] = {}
    magnitudes: dict[str, bool] = {}
    for target in picked.targets:
        module, delta = target.module, target.delta
        for part, tensor in peft_factors(target.key, delta, target.module_type).items():
            tensors[f"{PREFIX}{module}.{part}"] = tensor.contiguous()
        if delta.magnitude is not None:
            tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = delta.magnitude.contiguous()
        ranks[module], scales[module], types[module] = delta.rank, delta.scale, target.module_type
        magnitudes[module] = delta.magnitude is not None
    if len(set(magnitudes.values())) > 1:
        raise SurgeonError(
            "cannot write PEFT LoRA: some modules are DoRA and some are not, and PEFT's use_dora is all or nothing."
        )
    if len({t == "conv1d" for t in types.values() if t != "embedding"}) > 1:
        raise SurgeonError(
            "cannot write PEFT LoRA: the adapter mixes Conv1D (in×out) and Linear targets, and PEFT's fan_in_fan_out "
            "is "
            "one flag."
        )

    modules_to_save = set(source.get("modules_to_save") or [])
    trains_bias = source.get("bias", "none") != "none"
    for key, delta in picked.kept:
        module, param = _module_of(key)
        if delta.replaces:
            weight = delta.materialize(dtype=delta.stored_dtype).contiguous()
            if module in ranks:
                tensors[f"{PREFIX}{module}.base_layer.{param}"] = weight
            else:
                tensors[f"{PREFIX}{key}"] = weight
                listed = any(module == m or module.endswith("." + m) for m in modules_to_save)
                if not listed and not (trains_bias and param == "bias"):
                    modules_to_save.add(module)
        elif param == "bias" and module in ranks:
            bias = delta.materialize(dtype=delta.stored_dtype) / scales[module]
            tensors[f"{PREFIX}{module}.lora_B.bias"] = bias.contiguous()
        else:
            raise refusal("PEFT LoRA", key, delta)

    config = (
        dict(source)
        if source
        else {"peft_type": "LORA", "task_type": None, "bias": "none", "lora_dropout": 0.0, "inference_mode": True}
    )
    rslora = bool(config.get("use_rslora", False))
    if params or not (source and _config_reproduces(source, ranks, scales) and _targets_cover(source, ranks)):
        config.update(rank_alpha_config(ranks, scales, rslora))
        config["target_modules"] = sorted(set(ranks) - set(params)) or None
        config["target_parameters"] = sorted(params) or None
    if params:
        config["lora_dropout"] = 0.0  # PEFT's ParamWrapper refuses any; it only ever applies in training
    config["peft_type"] = "LORA"
    config["base_model_name_or_path"] = adapter.base_model or config.get("base_model_name_or_path")
    config["fan_in_fan_out"] = any(t == "conv1d" for t in types.values())
    config["use_dora"] = any(magnitudes.values())
    config["lora_bias"] = any(k.endswith(".lora_B.bias") for k in tensors)
    modules_to_save = {m for m in modules_to_save if not any(f".{o}." in f".{m}." for o in modules_to_save - {m})}
    config["modules_to_save"] = sorted(modules_to_save) or None  # a module inside another goes with it
    written = [*(m for m in ranks if m not in params), *(_module_of(k)[0] for k in [*params, *dict(picked.kept)])]
    check_modules(names, written, "cannot write PEFT LoRA")
    _check_not_inside(modules_to_save, ranks)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(
        tensors,
        staging / WEIGHT_FILES[0],
        metadata={"format": "pt", **{k: v for k, v in adapter.metadata.items() if k != "format"}},
    )
    return picked.notes + notes


def _check_not_inside(modules_to_save, targets) -> None:
    """PEFT copies a modules_to_save module whole and does not wrap what lies inside it, so a LoRA
    target inside one would be ignored without a word; such an adapter is refused instead."""
    for target in targets:
        owner = next((m for m in modules_to_save if f".{m}." in f".{target}"), None)
        if owner is not None:
            raise SurgeonError(
                f"cannot write PEFT LoRA: the target {target!r} lies inside {owner!r}, which PEFT "
                "copies whole (modules_to_save) and would then ignore its LoRA; merge the adapter "
                "instead (surgeon merge), or leave out what changed in the enclosing module itself."
            )


def _targets_cover(config: dict, ranks: dict[str, int]) -> bool:
    """Whether PEFT, given the config's target_modules, wraps exactly the modules we hold factors for
    (as far as names alone tell); otherwise the writer lists the modules explicitly."""
    return all(targeted(config.get("target_modules") or [], m) for m in ranks)
