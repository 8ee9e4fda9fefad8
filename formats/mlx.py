"""mlx-lm LoRA / DoRA adapters: ``adapters.safetensors`` beside ``adapter_config.json``.

Keys are the module paths of mlx-lm's model for the base (``model.layers.N.self_attn.q_proj``; its
own names where they differ from the checkpoint's, as GPT-NeoX's ``model.h.N…``, read from mlx-lm's
definitions by :mod:`surgeon.formats.mlx_names`) plus ``.lora_a`` and ``.lora_b`` (and ``.m`` for
DoRA). A Linear's ``lora_a`` is in×r and ``lora_b`` r×out, the transposes of PEFT's:
y += scale·(x @ lora_a) @ lora_b. An Embedding's ``lora_a`` is num_embeddings×r and ``lora_b``
r×dims: ΔW = scale·lora_a @ lora_b. The config holds one ``rank`` and one ``scale`` (PEFT's
alpha/r) for the whole adapter, ``num_layers`` (the last N blocks are wrapped; -1 all) and ``keys``
(block-relative paths, or full paths for modules outside the blocks). Source: mlx-lm
``tuner/lora.py``, ``tuner/dora.py``, ``tuner/utils.py``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from surgeon.checkpoint import read_safetensors
from surgeon.checkpoint_files import read_json
from surgeon.delta import FACTOR_DTYPES, Adapter, LowRank
from surgeon.errors import SurgeonError
from surgeon.formats.adapter_config import check_mlx
from surgeon.formats.layouts import MLX_CONFIG as CONFIG_FILE
from surgeon.formats.layouts import MLX_WEIGHTS as WEIGHT_FILE
from surgeon.formats.lora_only import Picked, differs, fold, most_common, pick_targets, trailing_zero_rank
from surgeon.formats.mlx_experts import read_switch, switch_tensors, take_switches
from surgeon.formats.mlx_names import MlxNames, check_loads, mlx_names
from surgeon.keys import embedding_name

NAME = "mlx"

_BLOCK = re.compile(r"^(?P<blocks>.+\.layers)\.(?P<index>\d+)\.(?P<relative>.+)$")
_PARTS = ("lora_a", "lora_b", "m")
MLX_TYPES = ("linear", "embedding", "conv1d")


@dataclass(frozen=True)
class Place:
    """Where a checkpoint weight's delta goes in mlx-lm: its module there, whether that module is an
    embedding, and whether mlx-lm holds the weight transposed (GPT-2's Conv1D as a Linear)."""

    key: str
    module: str
    embedding: bool
    transposed: bool

    @property
    def factors_as_stored(self) -> bool:
        """Whether ``lora_a``/``lora_b`` are the canonical up/down factors as they are (an embedding,
        or a transposed Linear) rather than down/up transposed (a Linear)."""
        return self.embedding != self.transposed

    @property
    def module_type(self) -> str:
        return "embedding" if self.embedding else "conv1d" if self.transposed else "linear"


def _is_embedding(module: str, a: torch.Tensor, b: torch.Tensor, base) -> bool:
    """Linear and Embedding factors have the same layout, so the base's parameter shape decides;
    without a base, the module's name does."""
    if base is not None and f"{module}.weight" in base:
        shape = tuple(base.info(f"{module}.weight").shape)
        linear, embedding = (b.shape[1], a.shape[0]), (a.shape[0], b.shape[1])
        if (shape == linear) != (shape == embedding):
            return shape == embedding
    return embedding_name(module)


def _read_place(module: str, a: torch.Tensor, b: torch.Tensor, base, names: MlxNames | None, file: Path) -> Place:
    """Where the mlx-lm module ``module`` is in the base checkpoint: by mlx-lm's own model for the
    base where there is one, else by the name (and the base's shape, for an embedding)."""
    if names is None:
        return Place(f"{module}.weight", module, _is_embedding(module, a, b, base), False)
    key = names.checkpoint_key(module, str(file))
    return Place(key, module, module in names.embeddings, key in names.transposed)


def read(path: Path, base=None) -> Adapter:
    """An mlx-lm adapter as canonical deltas keyed by the base checkpoint's keys (mlx-lm's module
    names where no base, or no mlx-lm, translates them); zero-padded ranks are trimmed back."""
    path = Path(path)
    names = mlx_names(base)
    config = read_json(path / CONFIG_FILE)
    scale = float(check_mlx(config, path / CONFIG_FILE)["scale"])
    fine_tune_type = config.get("fine_tune_type", "lora")
    if fine_tune_type not in ("lora", "dora"):
        raise SurgeonError(
            f"{path / CONFIG_FILE}: fine_tune_type {fine_tune_type!r} is not a LoRA adapter; surgeon reads mlx-lm lora "
            "and dora adapters."
        )
    tensors, metadata = read_safetensors(path / WEIGHT_FILE)
    metadata = {k: v for k, v in metadata.items() if k != "format"}

    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, part = key.rpartition(".")
        if part not in _PARTS:
            raise SurgeonError(
                f"{path / WEIGHT_FILE}: tensor {key!r} is not an mlx-lm LoRA part ({', '.join(_PARTS)}); refusing "
                "rather than dropping it."
            )
        modules.setdefault(module, {})[part] = tensor

    adapter = Adapter(source_format=NAME, base_model=config.get("model"), config=config, metadata=metadata)
    for module, parts in modules.items():
        if "lora_a" not in parts or "lora_b" not in parts:
            raise SurgeonError(
                f"{path / WEIGHT_FILE}: module {module!r} has only one of lora_a and lora_b; the file is incomplete."
            )
        a, b, magnitude = parts["lora_a"], parts["lora_b"], parts.get("m")
        if any(t.dtype not in FACTOR_DTYPES for t in parts.values()):
            raise SurgeonError(
                f"{path / WEIGHT_FILE}: {module!r} has a {' or '.join(sorted({str(t.dtype) for t in parts.values()}))} "
                "factor; LoRA factors must be fp16, bf16, fp32 or fp64."
            )
        if a.dim() < 2 or b.dim() < 2:
            raise SurgeonError(
                f"{path / WEIGHT_FILE}: {module!r} has factors of shapes {tuple(a.shape)} and {tuple(b.shape)}, "
                "not matrices; the file is damaged."
            )
        if a.dim() == 3 and b.dim() == 3:  # a LoRASwitchLinear: stacked MoE experts
            read_switch(adapter, module, a, b, scale, base)
            continue
        if a.dim() != 2 or b.dim() != 2:
            raise SurgeonError(
                f"{path / WEIGHT_FILE}: {module!r} has a {a.dim()}-D lora_a and a {b.dim()}-D lora_b, which no mlx-lm "
                "LoRA layer holds; the file is damaged."
            )
        place = _read_place(module, a, b, base, names, path / WEIGHT_FILE)
        if place.embedding and magnitude is not None:
            raise SurgeonError(
                f"{path / WEIGHT_FILE}: {module!r} is a DoRA embedding, whose per-token norm surgeon does not model."
            )
        if place.factors_as_stored:
            up, down, shape = a, b, (a.shape[0], b.shape[1])
        else:
            up, down, shape = b.T, a.T, (b.shape[1], a.shape[0])
        rank = trailing_zero_rank(down, up)
        adapter.add(
            place.key,
            LowRank(
                down=down[:rank].contiguous(),
                up=up[:, :rank].contiguous(),
                scale=scale,
                shape=shape,
                magnitude=magnitude,
                magnitude_axis=int(place.transposed),
            ),
            place.module_type,
        )
    return adapter


def _in_block(module: str, names: MlxNames | None) -> tuple[str, int, str] | None:
    """(blocks path, block index, path inside the block) of an mlx-lm module inside a block: the
    blocks mlx-lm's model wraps, or, without it, a ``….layers.N.…`` path."""
    if names is None:
        match = _BLOCK.match(module)
        return (match["blocks"], int(match["index"]), match["relative"]) if match else None
    if names.blocks is None or not module.startswith(names.blocks + "."):
        return None
    index, _, relative = module[len(names.blocks) + 1 :].partition(".")
    return (names.blocks, int(index), relative) if index.isdigit() and relative else None


def _keys_and_layers(
    modules: list[str], base, names: MlxNames | None, source_layers: int | None
) -> tuple[list[str], int, list[str]]:
    """mlx-lm's ``keys`` and ``num_layers`` for these module paths; without a base, an mlx
    source's own ``num_layers`` is kept, since its producer knew the block count."""
    keys, indices, blocks = set(), [], set()
    for module in modules:
        found = _in_block(module, names)
        if found:
            blocks.add(found[0])
            indices.append(found[1])
            keys.add(found[2])
        else:
            keys.add(module)
    if len(blocks) > 1:
        raise SurgeonError(
            f"cannot write mlx: the adapter targets blocks of several stacks ({', '.join(sorted(blocks))}); mlx-lm "
            "wraps one."
        )
    if not indices:
        return sorted(keys), 0, []
    layers = (
        names.num_blocks if names is not None else (base.config() if base is not None else {}).get("num_hidden_layers")
    )
    if layers is not None:
        return sorted(keys), int(layers) - min(indices), []
    if source_layers is not None:
        return sorted(keys), int(source_layers), []
    if min(indices) == 0:
        return sorted(keys), -1, []
    return (
        sorted(keys),
        -1,
        [
            f"num_layers is -1 (all blocks): without --base the model's block count is unknown, so blocks below "
            f"{min(indices)} get LoRA branches too, with zero factors that change nothing."
        ],
    )


def _write_place(target, names: MlxNames | None) -> Place:
    """Where a target goes in mlx-lm's model for the base; without it, the checkpoint's own name."""
    if names is not None:
        module = names.mlx_module(target.key, "cannot write mlx")
        return Place(target.key, module, module in names.embeddings, target.key in names.transposed)
    if target.module_type == "conv1d":
        raise SurgeonError(
            f"cannot write mlx: {target.key!r} is a Conv1D weight (in×out), which mlx-lm may hold transposed; pass the "
            "base model (with mlx-lm installed) so that its model definition says how."
        )
    return Place(target.key, target.module, target.module_type == "embedding", False)


def _unchecked(base) -> list[str]:
    """The note for names written as the checkpoint's, unchecked against mlx-lm's model."""
    why = "no base was given" if base is None else "mlx-lm is not installed or the base has no config.json"
    return [
        f"module names were written as the checkpoint's, not checked against mlx-lm's model ({why}); mlx-lm names "
        "some models' modules its own way (GPT-NeoX, GPT-J, Qwen2-VL), so pass the base, with mlx-lm installed, "
        "to have them translated and loaded by mlx-lm before writing."
    ]


def _layer_tensors(targets, places: dict[str, Place], rank: int, scale: float) -> tuple[dict, int, int]:
    """Each LoRA/DoRA layer's ``lora_a``, ``lora_b`` (and ``m``), zero-padded to the adapter's one ``rank``
    and scaled to its one ``scale``; and how many layers were padded and how many had a scale folded in."""
    tensors: dict[str, torch.Tensor] = {}
    padded, folded = 0, 0
    for t in targets:
        delta, pad = t.delta, rank - t.delta.rank
        factor = delta.scale / scale if differs(delta.scale, scale) else 1.0
        padded, folded = padded + (pad > 0), folded + (factor != 1.0)
        module = places[t.key].module
        if places[t.key].factors_as_stored:
            a, b = delta.up, fold(delta.down, factor)
        else:
            a, b = delta.down.T, fold(delta.up, factor).T
        tensors[f"{module}.lora_a"] = torch.nn.functional.pad(a, (0, pad)).contiguous()
        tensors[f"{module}.lora_b"] = torch.nn.functional.pad(b, (0, 0, 0, pad)).contiguous()
        if delta.magnitude is not None:
            tensors[f"{module}.m"] = delta.magnitude.contiguous()
    return tensors, padded, folded


def write(adapter: Adapter, staging: Path, base=None) -> list[str]:
    """Write an mlx-lm adapter directory that ``mlx_lm.tuner.utils.load_adapters`` loads; with a base
    (and mlx-lm), named as mlx-lm's model for it names modules, and loaded by mlx-lm before it is kept."""
    names = mlx_names(base)
    switches, adapter = take_switches(adapter, base)
    picked = Picked([], [], []) if switches and not adapter.deltas else pick_targets(adapter, NAME, MLX_TYPES, True)
    targets = picked.targets
    places = {t.key: _write_place(t, names) for t in targets}
    dora = {t.delta.is_dora for t in targets}
    if len(dora) > 1:
        raise SurgeonError(
            "cannot write mlx: some modules are DoRA and some are not, and mlx-lm's fine_tune_type is one for the "
            "adapter."
        )
    for t in targets:
        place = places[t.key]
        if t.delta.is_dora and (place.embedding or t.delta.magnitude_axis != int(place.transposed)):
            raise SurgeonError(
                f"cannot write mlx: {t.key!r} is a DoRA {t.module_type} update, and mlx-lm normalises DoRA only per "
                "output row of a Linear."
            )
    rank = max([t.delta.rank for t in targets] + [s.rank for s in switches.values()])
    scale = most_common([*(t.delta.scale for t in targets), *(s.scale for s in switches.values())])
    tensors, padded, folded = _layer_tensors(targets, places, rank, scale)
    tensors.update(switch_tensors(switches, rank, scale))
    config = dict(adapter.config) if adapter.source_format == NAME else {}
    modules = [p.module for p in places.values()]
    keys, num_layers, notes = _keys_and_layers([*modules, *switches], base, names, config.get("num_layers"))
    if adapter.base_model:
        config.setdefault("model", adapter.base_model)
    config["fine_tune_type"] = "dora" if dora == {True} else "lora"
    config["num_layers"] = num_layers
    config["lora_parameters"] = {**config.get("lora_parameters", {}), "rank": rank, "scale": scale, "keys": keys}
    config["lora_parameters"].setdefault("dropout", 0.0)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, staging / WEIGHT_FILE, metadata={**adapter.metadata, "format": "mlx"})
    if names is not None:
        check_loads(staging, base, "cannot write mlx")

    notes = picked.notes + notes + ([] if names is not None else _unchecked(base))
    if padded:
        notes.append(f"{padded} of {len(targets)} modules zero-padded to rank {rank}: mlx-lm has one rank per adapter.")
    if folded:
        notes.append(
            f"{folded} of {len(targets)} modules had their own scale, folded into lora_b: mlx-lm has one scale "
            f"per adapter ({scale:g})."
        )
    return notes
