"""Converting an adapter from one format to another, through the canonical model. The written file
is read back and compared with the source before it is put in place, so a conversion either
reproduces every ΔW or leaves nothing behind.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from surgeon.checkpoint import Checkpoint
from surgeon.delta import Adapter
from surgeon.errors import SurgeonError
from surgeon.keys import bind_to_base, check_shapes
from surgeon.ops.merge import refuse_nonfinite
from surgeon.output import atomic_output

# Round-off allowed between the source's ΔW and the written one's, relative to the largest |ΔW|,
# in units of the stored dtype's epsilon: folding a scale into a factor rounds once per product.
_ROUNDING_EPSILONS = 8
# ΔW is compared through its product with this many fixed random columns: a wrong orientation,
# permutation or scale shows there as surely as in the dense matrix, at the cost of the factors.
_PROBE_COLUMNS = 4


def _probe(delta) -> torch.Tensor:
    """ΔW, viewed as rows × the rest, times fixed random columns (the same for both sides)."""
    columns = math.prod(delta.shape[1:])
    probe = torch.randn(columns, _PROBE_COLUMNS, generator=torch.Generator().manual_seed(columns))
    low = delta.factored()
    if low is not None and low.up.shape[0] == delta.shape[0]:
        return low.scale * (low.up.float() @ (low.down.float() @ probe))
    return delta.materialize().reshape(delta.shape[0], -1) @ probe


def _effective(deltas: list) -> dict[str, torch.Tensor]:
    """What a list of deltas does to one parameter, in a form two formats can be compared in:
    the summed additive ΔW (probed), a replacement weight, and a DoRA magnitude."""
    parts: dict[str, torch.Tensor] = {}
    for delta in deltas:
        if delta.replaces:
            parts["replace"] = delta.materialize()
            continue
        product = _probe(delta)
        parts["delta"] = parts["delta"] + product if "delta" in parts else product
        if not delta.additive:
            parts["magnitude"] = delta.factored().magnitude.float()
    return parts


def _tolerance(deltas: list) -> float:
    eps = min((torch.finfo(t.dtype).eps for d in deltas for t in d.tensors() if t.is_floating_point()), default=0.0)
    return max(eps, torch.finfo(torch.float32).eps) * _ROUNDING_EPSILONS


def verify_round_trip(source: Adapter, written: Adapter) -> dict:
    """The largest difference, per target, between what ``source`` and ``written`` do to the
    base (ΔW on random probe columns); raises when a target is missing, extra, or off by more
    than round-off."""
    missing = sorted(set(source.deltas) - set(written.deltas))
    extra = sorted(set(written.deltas) - set(source.deltas))
    if missing or extra:
        raise SurgeonError(
            f"the written adapter does not hold the same targets as the source (missing {missing[:3]}, extra "
            f"{extra[:3]}); "
            "nothing was written. This is a bug in surgeon: please report it with the command."
        )
    worst = {"max_abs_error": 0.0, "max_relative_error": 0.0, "key": None}
    for key, deltas in source.items():
        expected, got = _effective(deltas), _effective(written.deltas[key])
        if expected.keys() != got.keys():
            raise SurgeonError(
                f"the written adapter changes the kind of update on {key!r} ({sorted(expected)} became {sorted(got)}); "
                "nothing was written."
            )
        for part, tensor in expected.items():
            error = float((got[part] - tensor).abs().max()) if tensor.numel() else 0.0
            relative = error / max(float(tensor.abs().max()) if tensor.numel() else 0.0, 1e-30)
            if relative > _tolerance(deltas) and error > 1e-30:
                raise SurgeonError(
                    f"the written adapter's {part} on {key!r} differs from the source by {relative:.3g} (relative); "
                    "nothing was written. This is a bug in surgeon: please report it with the command."
                )
            if relative >= worst["max_relative_error"]:
                worst = {"max_abs_error": error, "max_relative_error": relative, "key": key}
    return worst


def drop_base_copies(adapter: Adapter, base: Checkpoint) -> list[str]:
    """Remove whole-weight replacements equal to the base's own weight, which change nothing:
    PEFT saves a targeted embedding's base layer whole beside its LoRA factors (llama.cpp's
    converter skips it too), and LoRA-only formats could not hold it."""
    dropped = 0
    for key, deltas in list(adapter.items()):
        kept = [d for d in deltas if not (d.replaces and _equals_base(d.materialize(dtype=d.stored_dtype), base, key))]
        dropped += len(deltas) - len(kept)
        if kept:
            adapter.deltas[key] = kept
        else:
            del adapter.deltas[key]
            adapter.module_types.pop(key, None)
    if not dropped:
        return []
    return [
        f"{dropped} whole-weight copies equal to the base's (PEFT saves targeted embeddings whole) were dropped: they "
        "change nothing."
    ]


def _equals_base(weight: torch.Tensor, base: Checkpoint, key: str) -> bool:
    original = base.get(key)
    return original.dtype == weight.dtype and torch.equal(original, weight)


def _read_back(target, staging: Path, base: Checkpoint | None, source: Adapter) -> tuple[dict | None, str | None]:
    """The round-trip check; skipped (with a note) only where the format cannot be read without the
    base. Any other failure to read the output back is an error: nothing unchecked is published."""
    if base is None and target.needs_base_to_read:
        return None, (
            "not read back for checking: this format names parameters in a way only the base model "
            "resolves; pass --base to have the output checked"
        )
    written = target.read(staging, base=base)
    # A writer may add a prefix the source had not (diffusers' component): match keys the way merge does.
    written = bind_to_base(
        written, base.keys() if base is not None else source.deltas.keys(), "the written adapter", checkpoint=base
    )
    return verify_round_trip(source, written), None


def convert_adapter(
    source: Path,
    target_format: str,
    output: Path,
    format_name: str | None = None,
    base_path: Path | None = None,
    force: bool = False,
) -> dict:
    """Convert the adapter at ``source`` to ``target_format`` at ``output``; the report lists
    every note the writer made about what the target format could not hold as it was."""
    from surgeon import formats

    started = time.perf_counter()
    target = formats.get(target_format)
    target.check_output(output)
    base = Checkpoint(base_path) if base_path is not None else None
    adapter = formats.read_adapter(source, format_name, base=base)
    refuse_nonfinite(adapter, str(source))
    if base is not None:
        adapter = bind_to_base(adapter, base.keys(), str(source), checkpoint=base)
        check_shapes(adapter, lambda key: base.info(key).shape, str(source))
        notes = adapter.notes + drop_base_copies(adapter, base)
    else:
        notes = list(adapter.notes)
    inputs = [source] + ([base_path] if base_path is not None else [])
    with atomic_output(output, inputs=inputs, force=force, directory=not target.writes_file) as staging:
        notes += formats.write_adapter(adapter, staging, target_format, base=base)
        check, skipped = _read_back(target, staging, base, adapter)
    if skipped:
        notes.append(skipped)
    return {
        "source": str(source),
        "from": adapter.source_format,
        "to": target_format,
        "output": str(output),
        "targets": len(adapter),
        "deltas": adapter.kinds(),
        "notes": notes,
        "check": check,
        "seconds": round(time.perf_counter() - started, 3),
    }
