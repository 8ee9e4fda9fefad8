"""What ``surgeon inspect`` reports: a plain dict per adapter or checkpoint, shared by the table
and the ``--json`` output so the two never disagree.

A safetensors checkpoint, and a PEFT LoRA adapter stored as safetensors, are summarised from
their headers alone: names, shapes and dtypes are all a summary needs, and reading them takes
milliseconds where importing torch takes seconds. Everything else is read in full.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from surgeon.checkpoint_files import model_config, weight_files
from surgeon.errors import NotWeightDeltas, SurgeonError
from surgeon.header import read_header, read_tensor_bytes
from surgeon.quantized import describe_quantization, find_quantized, stored_parts

if TYPE_CHECKING:
    from surgeon.delta import Adapter

_LAYER_NUMBER = re.compile(r"\.\d+\.")
#: The names torch gives safetensors' dtypes, as the summary shows them.
_TORCH_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_ITEM_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _group_name(key: str) -> str:
    return _LAYER_NUMBER.sub(".*.", key)


def _low_rank_label(rank: int, scale: float, dora: bool) -> str:
    """What the header-only summary calls a low-rank delta: :attr:`surgeon.delta.LowRank.label`'s
    words, without importing torch."""
    return f"{'DoRA' if dora else 'LoRA'} r={rank} scale={scale:g}"


def _describe(values) -> object:
    found = sorted(set(values))
    if not found:
        return None
    return found[0] if len(found) == 1 else {"min": found[0], "max": found[-1], "distinct": len(found)}


def adapter_summary(adapter: "Adapter", path: Path, format_description: str) -> dict:
    low_ranks = adapter.low_ranks()
    alphas = (
        [adapter.config.get("lora_alpha")]
        if adapter.source_format == "peft" and adapter.config.get("lora_alpha") is not None
        else []
    )
    groups: Counter = Counter()
    for key, deltas in adapter.items():
        for delta in deltas:
            groups[(_group_name(key), delta.label)] += 1
    return {
        "path": str(path),
        "kind": "adapter",
        "format": adapter.source_format,
        "format_description": format_description,
        "base_model": adapter.base_model,
        "targets": len(adapter),
        "deltas": adapter.kinds(),
        "rank": _describe(d.rank for d in low_ranks.values()),
        "alpha": alphas[0] if alphas else None,
        "scale": _describe(round(d.scale, 6) for d in low_ranks.values()),
        "params": adapter.num_params(),
        "bytes": adapter.num_bytes(),
        "modules": [{"target": name, "delta": label, "count": n} for (name, label), n in groups.items()],
    }


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _peft_lora_parts(path: Path) -> tuple[dict, dict]:
    """(config, header entries) of a PEFT LoRA adapter stored as safetensors, checked as the reader
    checks them; a SurgeonError where anything is off, and the full reader says what."""
    from surgeon.formats import adapter_config
    from surgeon.formats.layouts import PEFT_CONFIG, PEFT_WEIGHTS
    from surgeon.formats.peft_rules import BY_MODEL, PREFIX, UNSUPPORTED

    config = adapter_config.load(path / PEFT_CONFIG)
    adapter_config.check_peft(config, path / PEFT_CONFIG)
    entries = read_header(path / PEFT_WEIGHTS[0]).entries
    plain = (
        str(config.get("peft_type", "")).upper() == "LORA"
        and entries
        and not any(config.get(option) not in (None, False, [], {}) for option in {**UNSUPPORTED, **BY_MODEL})
        and all(k.startswith(PREFIX) for k in entries)
    )
    if not plain:
        raise SurgeonError("not a plain PEFT LoRA")
    return config, entries


def _peft_lora_modules(entries: dict) -> tuple[dict[str, dict], dict[str, list[tuple[str, str]]]]:
    """LoRA parts by module, and whole-tensor replacements by key, as the PEFT reader groups them."""
    from surgeon.formats.peft_rules import LORA_KEY, PREFIX

    modules: dict[str, dict] = {}
    deltas: dict[str, list[tuple[str, str]]] = {}
    for name, entry in entries.items():
        key = name[len(PREFIX) :]
        match = LORA_KEY.match(key)
        if match:
            part = match["part"] + (match["rest"] if match["rest"] == ".bias" else "")
            least = 1 if part in ("lora_magnitude_vector", "lora_B.bias") else 2
            if entry.dtype not in _FLOAT_DTYPES or len(entry.shape) < least:
                raise SurgeonError(f"{name}: not a LoRA part the reader takes")
            modules.setdefault(match["module"], {})[part] = entry
        elif ".lora_" in key:
            raise SurgeonError(f"{name}: a LoRA part surgeon does not know")
        else:
            deltas.setdefault(key.replace(".base_layer.", ".").replace(".modules_to_save.", "."), []).append(
                ("replacement", "replacement")
            )
    return modules, deltas


def _peft_lora_deltas(
    config: dict, entries: dict, where: Path
) -> tuple[dict[str, list[tuple[str, str]]], list[tuple[int, float]]]:
    """key → [(kind, label)] in the order the PEFT reader adds them, and each module's (rank, scale)."""
    from surgeon.formats.peft_rules import check_modules_match, factor_rank, module_rank_alpha, scale_of

    modules, deltas = _peft_lora_modules(entries)
    check_modules_match(config, modules, where)
    low = []
    for module, parts in modules.items():
        a, b = parts.get("lora_embedding_A", parts.get("lora_A")), parts.get("lora_embedding_B", parts.get("lora_B"))
        rank, alpha = module_rank_alpha(config, module)
        magnitude = parts.get("lora_magnitude_vector")
        shapes = None if a is None or b is None else (a.shape, b.shape, None if magnitude is None else magnitude.shape)
        if shapes is None or rank != factor_rank(where, module, *shapes):
            raise SurgeonError(f"{module}: factors the reader refuses")
        scale = scale_of(alpha, rank, bool(config.get("use_rslora", False)))
        dora = magnitude is not None
        low.append((rank, scale))
        deltas.setdefault(module + ".weight", []).append(
            ("DoRA" if dora else "LoRA", _low_rank_label(rank, scale, dora))
        )
        if "lora_B.bias" in parts:
            deltas.setdefault(module + ".bias", []).append(("dense", "dense"))
    return deltas, low


def peft_header_summary(path: Path, format_description: str) -> dict | None:
    """:func:`adapter_summary` of a PEFT LoRA adapter from its header and config alone, or None
    where only the full reader can tell (a .bin, another PEFT type, anything it would refuse)."""
    try:
        config, entries = _peft_lora_parts(path)
        deltas, low = _peft_lora_deltas(config, entries, path)
    except (SurgeonError, OSError, TypeError, ValueError, KeyError, re.error):
        return None
    groups = Counter((_group_name(key), label) for key, found in deltas.items() for _, label in found)
    return {
        "path": str(path),
        "kind": "adapter",
        "format": "peft",
        "format_description": format_description,
        "base_model": config.get("base_model_name_or_path"),
        "targets": len(deltas),
        "deltas": dict(Counter(kind for found in deltas.values() for kind, _ in found)),
        "rank": _describe(rank for rank, _ in low),
        "alpha": config.get("lora_alpha"),
        "scale": _describe(round(scale, 6) for _, scale in low),
        "params": sum(e.numel for e in entries.values()),
        "bytes": sum(e.num_bytes for e in entries.values()),
        "modules": [{"target": name, "delta": label, "count": n} for (name, label), n in groups.items()],
    }


#: name → (dtype, elements, bytes) of each tensor a checkpoint stands for.
Table = dict[str, tuple[str, int, int]]


def _header_table(files: list[Path], config: dict) -> tuple[Table, dict[str, str], dict | None]:
    """name → (dtype, elements, bytes) of the logical tensors, the header metadata and the
    quantization, from the headers alone: a bitsandbytes weight counts as the float tensor it
    stands for, its quantized parts not at all."""
    headers = {file: read_header(file) for file in files}
    entries = {name: (e.dtype, e.shape) for header in headers.values() for name, e in header.entries.items()}
    holder = {name: file for file, header in headers.items() for name in header.entries}

    def read_bytes(names: list[str]) -> dict[str, bytes]:
        return {name: read_tensor_bytes(holder[name], [name])[name] for name in names}

    found = find_quantized(entries, read_bytes, lambda: config, files[0].parent if len(files) > 1 else files[0])
    parts = stored_parts(found)
    table = {
        name: (_TORCH_DTYPE_NAMES[e.dtype], e.numel, e.num_bytes)
        for header in headers.values()
        for name, e in header.entries.items()
        if name not in parts
    }
    for name, weight in found.items():
        table[name] = (weight.dtype, weight.numel, weight.numel * _ITEM_SIZES[weight.dtype])
    metadata = {k: v for header in headers.values() for k, v in header.metadata.items()}
    quantization = describe_quantization(found, config)
    if quantization is not None:  # the table counts the float weights each stands for; the files hold less
        quantization["stored_bytes"] = sum(e.num_bytes for h in headers.values() for e in h.entries.values())
    return table, metadata, quantization


def _tensor_table(files: list[Path], config: dict) -> tuple[Table, dict[str, str], dict | None]:
    """As :func:`_header_table`; pickles have no header, so they are loaded."""
    if all(f.suffix == ".safetensors" for f in files):
        return _header_table(files, config)
    from surgeon.checkpoint import Checkpoint

    checkpoint = Checkpoint(files[0].parent if len(files) > 1 else files[0])
    infos = {k: checkpoint.info(k) for k in checkpoint.keys()}
    table = {k: (str(i.dtype).removeprefix("torch."), math.prod(i.shape), i.num_bytes) for k, i in infos.items()}
    return table, checkpoint.metadata, describe_quantization(checkpoint.quantized, config)


def checkpoint_summary(path: Path) -> dict:
    files = weight_files(path)
    config = model_config(path if path.is_dir() else None)
    table, metadata, quantization = _tensor_table(files, config)
    return {
        "path": str(path),
        "kind": "checkpoint",
        "format": "safetensors" if all(f.suffix == ".safetensors" for f in files) else "pytorch pickle",
        "architecture": (config.get("architectures") or [config.get("model_type")])[0] if config else None,
        "files": [f.name for f in files],
        "quantization": quantization,
        "tensors": len(table),
        "params": sum(n for _, n, _ in table.values()),
        "bytes": sum(b for _, _, b in table.values()),
        "dtypes": dict(Counter(d for d, _, _ in table.values())),
        "largest_tensor_bytes": max((b for _, _, b in table.values()), default=0),
        "metadata": {k: v for k, v in metadata.items() if k != "format"},
    }


def _adapter_summary(path: Path, found, base: Path | None) -> dict:
    if found.name == "peft" and base is None:
        summary = peft_header_summary(path, found.description)
        if summary is not None:
            return summary
    from surgeon.checkpoint import Checkpoint
    from surgeon.formats import read_adapter

    try:
        adapter = read_adapter(path, found.name, base=Checkpoint(base) if base else None)
    except NotWeightDeltas as refusal:  # described, though it cannot be merged
        return {
            "path": str(path),
            "kind": "adapter",
            "format": found.name,
            "format_description": found.description,
            **refusal.facts,
            "merge": str(refusal).partition(": ")[2],
        }
    return adapter_summary(adapter, path, found.description)


def summarise(path: Path, format_name: str | None = None, base: Path | None = None) -> dict:
    """The summary of an adapter or a checkpoint; one sentence when PATH is neither."""
    from surgeon import formats
    from surgeon.recognise import describe, holds_weights, looked_for

    found = formats.get(format_name) if format_name else formats.detect(path)
    if found is not None:
        return _adapter_summary(path, found, base)
    if not holds_weights(path):
        raise SurgeonError(f"{path}: {describe(path)}; neither an adapter nor a checkpoint.", details=looked_for())
    return checkpoint_summary(path)


def human_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return str(count)


def render(summary: dict) -> str:
    """The summary as aligned text lines for a terminal."""
    skip = {"modules", "format_description", "metadata", "config"}  # a config is shown in --json only
    rows = []
    for name, value in summary.items():
        if name in skip or value in (None, {}, []):
            continue
        if name in ("bytes", "largest_tensor_bytes"):
            value = human_bytes(value)
        elif name == "params":
            value = f"{value:,}"
        elif name == "format" and summary.get("format_description"):
            value = summary["format_description"]
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) if len(value) <= 4 else f"{value[0]} … {value[-1]} ({len(value)})"
        rows.append((name.replace("_", " "), str(value)))
    width = max(len(n) for n, _ in rows)
    lines = [f"{n:<{width}}  {v}" for n, v in rows]
    modules = summary.get("modules") or []
    if modules:
        target_width = max(len(m["target"]) for m in modules)
        lines.append("")
        lines.append(f"{'target':<{target_width}}  {'count':>5}  delta")
        lines += [f"{m['target']:<{target_width}}  {m['count']:>5}  {m['delta']}" for m in modules]
    return "\n".join(lines)
