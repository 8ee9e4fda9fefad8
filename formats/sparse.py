"""surgeon's sparse diff: a directory with ``sparse_config.json`` and ``sparse_model.safetensors``.

No common format stores a sparse weight difference (diff pruning, the residual of a low-rank
extraction), so surgeon defines one, kept as plain safetensors so that any reader can use it.
For a base parameter ``K`` (its key in the base checkpoint) the file may hold:

``K.sparse_indices``  1-D int32, or int64 when the parameter has 2³¹ elements or more: flat
                      row-major positions in the parameter, ascending; a repeated position adds.
``K.sparse_values``   1-D float of the same length: ΔW at those positions.
``K.sparse_shape``    1-D int64: the parameter's shape.
``K.replace``         the parameter's new value, whole (a changed norm or bias kept in full).

Merging sets ``K`` to ``K.replace`` when present, then adds the values at the indices.
``sparse_config.json`` holds ``{"format": "surgeon-sparse", "version": 1, ...}`` (plus
``base_model_name_or_path`` and informational counts); the ``format`` entry is what detection
checks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from surgeon.checkpoint import read_safetensors
from surgeon.checkpoint_files import read_json
from surgeon.delta import Adapter, Replace, Sparse
from surgeon.errors import SurgeonError
from surgeon.formats.adapter_config import check_name
from surgeon.formats.layouts import SPARSE_CONFIG as CONFIG_FILE
from surgeon.formats.layouts import SPARSE_TAG as FORMAT_TAG
from surgeon.formats.layouts import SPARSE_WEIGHTS as WEIGHT_FILE
from surgeon.formats.lora_only import refusal

NAME = "sparse"
VERSION = 1
_PARTS = ("sparse_indices", "sparse_values", "sparse_shape", "replace")


def index_dtype(shape: tuple[int, ...]) -> torch.dtype:
    """int32 while every flat position fits in it, int64 beyond (half the index bytes for any
    parameter under 2³¹ elements, which is nearly all of them)."""
    return torch.int32 if math.prod(shape) <= torch.iinfo(torch.int32).max else torch.int64


def read(path: Path, base=None) -> Adapter:
    """A sparse diff as an adapter of :class:`Sparse` (and :class:`Replace`) deltas."""
    path = Path(path)
    config = read_json(path / CONFIG_FILE)
    version = config.get("version", 0)
    if config.get("format") != FORMAT_TAG or isinstance(version, bool) or not isinstance(version, int):
        raise SurgeonError(
            f"{path / CONFIG_FILE}: not a surgeon sparse diff config (format {config.get('format')!r}, "
            f"version {version!r}); restore the file surgeon wrote."
        )
    if version > VERSION:
        raise SurgeonError(
            f"{path / CONFIG_FILE}: sparse diff version {config['version']} is newer than this surgeon reads "
            f"({VERSION}); upgrade surgeon."
        )
    file = path / WEIGHT_FILE
    if not file.is_file():
        raise SurgeonError(f"{path}: has {CONFIG_FILE} but no {WEIGHT_FILE}.")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    tensors, metadata = read_safetensors(file)
    for name, tensor in tensors.items():
        key, _, part = name.rpartition(".")
        if part not in _PARTS or not key:
            raise SurgeonError(
                f"{file}: tensor {name!r} is not a part of a sparse diff (expected a key ending in "
                f"{', '.join('.' + p for p in _PARTS)})."
            )
        parts.setdefault(key, {})[part] = tensor
    name = check_name(config.get("base_model_name_or_path"), path / CONFIG_FILE, "base_model_name_or_path")
    adapter = Adapter(source_format=NAME, base_model=name, config=config, metadata=metadata)
    for key, found in parts.items():
        if "replace" in found:
            adapter.add(key, Replace(found["replace"]), "other")
        sparse = [p for p in ("sparse_indices", "sparse_values", "sparse_shape") if p in found]
        if sparse and len(sparse) != 3:
            raise SurgeonError(
                f"{file}: {key!r} has {', '.join(sparse)} but not all three of indices, values and shape; the file is "
                "incomplete."
            )
        if sparse:
            adapter.add(
                key,
                Sparse(found["sparse_indices"], found["sparse_values"], _shape_of(found["sparse_shape"], file, key)),
                "other",
            )
    return adapter


def _shape_of(stored: torch.Tensor, file: Path, key: str) -> tuple[int, ...]:
    """A parameter's shape as the file stores it: a 1-D tensor of non-negative integers."""
    if stored.dim() != 1 or stored.is_floating_point() or stored.dtype == torch.bool or bool((stored < 0).any()):
        raise SurgeonError(
            f"{file}: {key}.sparse_shape is {stored.dtype} {tuple(stored.shape)}, not a list of sizes; the file is "
            "damaged."
        )
    return tuple(stored.tolist())


def write(adapter: Adapter, staging: Path) -> list[str]:
    """Write the adapter's sparse and whole-tensor deltas; anything else is refused by name.
    Nothing is approximated, so there are no notes."""
    tensors: dict[str, torch.Tensor] = {}
    entries = 0
    for key, deltas in adapter.items():
        sparse = [Sparse.of(d) for d in deltas if d.additive and d.factored() is None]
        unheld = next((d for d in deltas if not d.replaces and not d.additive and d.factored() is None), None)
        if unheld is not None:  # appended rows: no ΔW of the parameter's shape
            raise refusal("a sparse diff", key, unheld)
        others = [d for d in deltas if not d.replaces and d.factored() is not None]
        if others:
            raise SurgeonError(
                f"cannot write a sparse diff: {key!r} has a {others[0].kind} delta; "
                "write low-rank deltas as PEFT, or sparsify them first."
            )
        replaces = [i for i, d in enumerate(deltas) if d.replaces]
        if replaces and replaces != [0]:
            raise SurgeonError(
                f"cannot write a sparse diff: {key!r} is replaced after other deltas, which the format cannot order; "
                "keep one replacement, first."
            )
        if replaces:
            tensors[f"{key}.replace"] = deltas[0].materialize(dtype=deltas[0].stored_dtype).contiguous()
        if sparse:
            shape = sparse[0].shape
            if any(d.shape != shape for d in sparse):
                raise SurgeonError(f"cannot write a sparse diff: the sparse deltas on {key!r} disagree on its shape.")
            indices = torch.cat([d.indices.to(torch.int64) for d in sparse])
            values = torch.cat([d.values for d in sparse])
            order = torch.argsort(indices, stable=True)
            tensors[f"{key}.sparse_indices"] = indices[order].to(index_dtype(shape)).contiguous()
            tensors[f"{key}.sparse_values"] = values[order].contiguous()
            tensors[f"{key}.sparse_shape"] = torch.tensor(shape, dtype=torch.int64)
            entries += int(indices.numel())
    config = {
        "format": FORMAT_TAG,
        "version": VERSION,
        "base_model_name_or_path": adapter.base_model,
        "num_parameters": len(adapter.deltas),
        "num_entries": entries,
    }
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(
        tensors,
        staging / WEIGHT_FILE,
        metadata={"format": "pt", **{k: v for k, v in adapter.metadata.items() if k != "format"}},
    )
    return []
