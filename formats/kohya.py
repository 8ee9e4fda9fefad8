"""kohya / sd-scripts LoRA: one ``.safetensors`` whose keys are ``<name>.lora_down.weight``
(r×in, a convolution's r×in×kh×kw), ``<name>.lora_up.weight`` (out×r, a convolution's
out×r×1×1) and a scalar ``<name>.alpha``; ΔW = alpha/r · up @ down with r = lora_down's first
dimension, and a missing or zero alpha meaning alpha = r (sd-scripts ``networks/lora.py``).

Names are the module path with ``.`` turned into ``_`` behind ``lora_unet_``, ``lora_te_``,
``lora_te1_``/``lora_te2_`` (SDXL) or ``lora_te3_`` (T5): they are matched against the base
checkpoint's keys (:mod:`surgeon.formats.kohya_names`), so reading needs the base. LyCORIS's
LoCon extensions read here too: a Tucker ``lora_mid`` core, and a ``dora_scale`` whose norm axis
is told by its shape ([out, 1] normalises rows, [1, in] columns, as ComfyUI decides). Header
metadata (``ss_*`` training fields, ``modelspec.*``) is kept and written back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from surgeon.checkpoint import read_safetensors
from surgeon.delta import Adapter, LowRank
from surgeon.errors import SurgeonError
from surgeon.formats.kohya_names import PREFIXES, kohya_names, recorded, resolve, split_prefix
from surgeon.formats.layouts import KOHYA_PARTS as LORA_PARTS
from surgeon.formats.lora_only import metadata_note, pick_targets
from surgeon.lycoris_math import dora_magnitude, scale_of

NAME = "kohya"

_KEPT_METADATA = ("ss_", "modelspec.")
# Fields that describe the exact bytes of the file they were computed from.
_STALE_METADATA = ("modelspec.hash_sha256",)


def group(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{name: {part: tensor}} for keys ``name.part``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, part = key.partition(".")
        modules.setdefault(stem, {})[part] = tensor
    return modules


def lora_delta(parts: dict[str, torch.Tensor], shape: tuple[int, ...], where: str) -> LowRank:
    """One LoRA/LoCon module as a low-rank delta on a weight of ``shape``. A Tucker core folds into
    the down factor exactly: ΔW[o, i, k] = Σ up[o, a]·mid[a, b, k]·down[b, i]."""
    down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
    if down is None or up is None:
        raise SurgeonError(f"{where}: has only one of lora_down/lora_up; the file is incomplete.")
    rank = int(down.shape[0])
    mid = parts.get("lora_mid.weight")
    if mid is not None:
        down = torch.einsum("a b ..., b i -> a i ...", mid.float(), down.float().reshape(rank, -1))
    down, up = down.reshape(rank, -1), up.reshape(up.shape[0], -1)
    if up.shape[1] != rank or up.shape[0] * down.shape[1] != math.prod(shape):
        raise SurgeonError(
            f"{where}: lora_up {tuple(parts['lora_up.weight'].shape)} and lora_down "
            f"{tuple(parts['lora_down.weight'].shape)} "
            f"do not make a ΔW for the base weight of shape {shape}; the adapter was made for another model."
        )
    magnitude, axis = (None, 0) if "dora_scale" not in parts else dora_magnitude(parts["dora_scale"], shape, where)
    return LowRank(
        down=down,
        up=up,
        scale=scale_of(parts.get("alpha"), rank),
        shape=shape,
        magnitude=magnitude,
        magnitude_axis=axis,
    )


def module_type(shape: tuple[int, ...]) -> str:
    return "conv" if len(shape) > 2 else "linear" if len(shape) == 2 else "other"


def read_modules(path: Path, base, known_parts: tuple[str, ...], format_name: str):
    """The file's modules grouped by name, each with its base module path, and a fresh adapter
    that records the names (for writing them back). Parts outside ``known_parts`` are refused."""
    tensors, metadata = read_safetensors(path)
    modules = group(tensors)
    for stem, parts in modules.items():
        unknown = sorted(set(parts) - set(known_parts))
        if unknown:
            raise SurgeonError(
                f"{path}: module {stem!r} has parts {', '.join(unknown)} that a {format_name} file does not hold"
                + ("; read it with --from lycoris." if format_name == NAME else "; surgeon does not read them.")
            )
    resolved = resolve(modules, base, str(path))
    adapter = Adapter(source_format=format_name, base_model=metadata.get("ss_sd_model_name"), metadata=metadata)
    adapter.config = {
        "kohya_names": {module: stem for stem, (_, module) in resolved.items()},
        "components": {
            module: [PREFIXES[split_prefix(stem)[0]], module[len(prefix) :]]
            for stem, (prefix, module) in resolved.items()
        },
    }
    return [(stem, resolved[stem][1], parts) for stem, parts in modules.items()], adapter


def read(path: Path, base=None) -> Adapter:
    """A kohya LoRA as low-rank deltas keyed by the base checkpoint's parameter names."""
    path = Path(path)
    modules, adapter = read_modules(path, base, LORA_PARTS, NAME)
    for stem, module, parts in modules:
        key = module + ".weight"
        shape = tuple(base.info(key).shape)
        adapter.add(key, lora_delta(parts, shape, f"{path}: {stem}"), module_type(shape))
    return adapter


def _factors(delta: LowRank) -> tuple[torch.Tensor, torch.Tensor]:
    rank, shape = delta.rank, delta.shape
    if len(shape) > 2:
        return delta.down.reshape(rank, *shape[1:]), delta.up.reshape(shape[0], rank, *([1] * (len(shape) - 2)))
    return delta.down, delta.up


def _dora_scale(delta: LowRank) -> torch.Tensor:
    shape = [1] * len(delta.shape)
    shape[delta.magnitude_axis] = -1
    return delta.magnitude.reshape(shape).contiguous()


def _summary(values: list[float]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "Dynamic"


def _metadata(
    adapter: Adapter, ranks: dict[bool, list[int]], alphas: dict[bool, list[float]]
) -> tuple[dict[str, str], list[str]]:
    """Kept ``ss_*``/``modelspec.*`` fields with the network fields set to what is written.
    ``ss_network_dim``/``_alpha`` describe the linear (and 1×1) modules, k×k convolutions go in
    ``ss_network_args`` as sd-scripts does; "Dynamic" where modules differ, as its resize tool writes."""
    kept = {k: v for k, v in adapter.metadata.items() if k.startswith(_KEPT_METADATA) and k not in _STALE_METADATA}
    linear = ranks[False] or ranks[True]
    kept["ss_network_module"] = adapter.metadata.get("ss_network_module", "networks.lora")
    kept["ss_network_dim"] = _summary([int(r) for r in linear])
    kept["ss_network_alpha"] = _summary([float(a) for a in (alphas[False] or alphas[True])])
    if ranks[True] and "ss_network_args" not in kept:
        kept["ss_network_args"] = json.dumps({"conv_dim": _summary(ranks[True]), "conv_alpha": _summary(alphas[True])})
    return kept, metadata_note(adapter, "a kohya file", set(kept))


def _unchecked_names(adapter: Adapter, base) -> list[str]:
    """The note for names built from an adapter's own module names without a base to take the
    checkpoint's keys from (kohya and LyCORIS sources keep the names they were read with)."""
    if base is not None or recorded(adapter)[0]:
        return []
    return [
        "kohya names were built from the adapter's own module names: kohya tools name modules by the checkpoint's "
        "keys, which transformers 5 renames for some models (ViT, CLIP's text encoder, Qwen2-VL), so pass --base to "
        "build them from the checkpoint's keys."
    ]


def write(adapter: Adapter, staging: Path, base=None) -> list[str]:
    """Write ``adapter`` as one kohya LoRA file, named by the base checkpoint's keys (what kohya
    tools match against) where the adapter was bound to a base. Each module's scale becomes its
    own alpha (alpha = scale·r, float32), so per-module ranks, alphas and rsLoRA scales survive."""
    picked = pick_targets(adapter, NAME, ("linear", "conv"), allow_dora=True)
    targets = picked.targets
    names = kohya_names(adapter, [t.module for t in targets])
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[bool, list[int]] = {False: [], True: []}
    alphas: dict[bool, list[float]] = {False: [], True: []}
    notes = picked.notes + _unchecked_names(adapter, base)
    for target in targets:
        delta, stem = target.delta, names[target.module]
        down, up = _factors(delta)
        alpha = delta.scale * delta.rank
        if alpha == 0:  # alpha 0 reads as alpha = rank: a zero scale must live in the factor instead
            up, alpha = torch.zeros_like(up), float(delta.rank)
        tensors[f"{stem}.lora_down.weight"] = down.contiguous()
        tensors[f"{stem}.lora_up.weight"] = up.contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if delta.magnitude is not None:
            tensors[f"{stem}.dora_scale"] = _dora_scale(delta)
        kernel = math.prod(delta.shape[2:]) > 1
        ranks[kernel].append(delta.rank)
        alphas[kernel].append(alpha)
    if any(t.delta.magnitude is not None for t in targets):
        notes.append(
            "DoRA magnitudes were written as LyCORIS dora_scale tensors, which ComfyUI and LyCORIS apply; sd-scripts "
            "itself ignores them."
        )
    metadata, dropped = _metadata(adapter, ranks, alphas)
    save_file(tensors, staging, metadata=metadata)
    return notes + dropped
