"""What ``surgeon inspect`` reports: a plain dict per adapter or checkpoint, shared by the table
and the ``--json`` output so the two never disagree."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from surgeon.checkpoint import Checkpoint
from surgeon.delta import Adapter

_LAYER_NUMBER = re.compile(r"\.\d+\.")


def _group_name(key: str) -> str:
    return _LAYER_NUMBER.sub(".*.", key)


def _describe(values) -> object:
    found = sorted(set(values))
    if not found:
        return None
    return found[0] if len(found) == 1 else {"min": found[0], "max": found[-1], "distinct": len(found)}


def adapter_summary(adapter: Adapter, path: Path, format_description: str) -> dict:
    low_ranks = adapter.low_ranks()
    alphas = [
        adapter.config.get("lora_alpha")
    ] if adapter.source_format == "peft" and adapter.config.get("lora_alpha") is not None else []
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


def checkpoint_summary(checkpoint: Checkpoint) -> dict:
    config = checkpoint.config()
    dtypes = Counter(str(checkpoint.info(k).dtype).removeprefix("torch.") for k in checkpoint.keys())
    return {
        "path": str(checkpoint.path),
        "kind": "checkpoint",
        "format": "safetensors" if all(f.suffix == ".safetensors" for f in checkpoint.files) else "pytorch pickle",
        "architecture": (config.get("architectures") or [config.get("model_type")])[0] if config else None,
        "files": [f.name for f in checkpoint.files],
        "tensors": len(checkpoint),
        "params": checkpoint.num_params(),
        "bytes": checkpoint.num_bytes(),
        "dtypes": dict(dtypes),
        "largest_tensor_bytes": checkpoint.largest_tensor_bytes(),
        "metadata": {k: v for k, v in checkpoint.metadata.items() if k != "format"},
    }


def human_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return str(count)


def render(summary: dict) -> str:
    """The summary as aligned text lines for a terminal."""
    skip = {"modules", "format_description", "metadata"}
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
