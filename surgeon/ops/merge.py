"""merge and unmerge over whole checkpoints, one tensor at a time.

Everything that can be checked is checked before the first byte is written: every target exists
in the base with the right shape, no input holds NaN or Inf, and (for unmerge) every delta can be
taken back off. Peak memory is then the largest tensor a few times over, whatever the model size.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from surgeon.checkpoint import Checkpoint, StreamingWriter, TensorInfo
from surgeon.delta import FP32_MAX, Adapter, Delta, all_finite
from surgeon.errors import SurgeonError
from surgeon.keys import bind_to_base, check_shapes, embedding_name
from surgeon.model_names import tied_heads
from surgeon.ops.apply import apply_deltas, remove_deltas, unmerge_refusal
from surgeon.pairing import paired_keys, with_implied_heads
from surgeon.quantized import dequantized_dtype

if TYPE_CHECKING:
    from surgeon.ops.quantized_output import BnbEncoder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CONFIG_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class MergeReport:
    output: str
    tensors: int = 0
    changed: int = 0
    seconds: float = 0.0
    dtype: str = ""
    device: str = ""
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when present; asking for CUDA without it is a user error, not a crash."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SurgeonError("device cuda was asked for, but torch sees no CUDA device; use device cpu.")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # meta, mps, ...: tensors there cannot be written
        raise SurgeonError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N.")
    return device


def prepare(
    adapters: Sequence[tuple[Adapter, str]], base: Checkpoint, allow_nonfinite: bool, base_shapes: bool = True
) -> list[Adapter]:
    """Adapters bound to the base's keys, with values checked, and shapes against the base's where
    ``base_shapes`` (unmerge takes off appended rows before the deltas under them: its shapes are
    checked in order, when the output is planned)."""
    bound = []
    for adapter, where in adapters:
        adapter = bind_to_base(adapter, base.keys(), where, checkpoint=base)
        if base_shapes:
            check_shapes(adapter, lambda key: base.info(key).shape, where)
        if not allow_nonfinite:
            refuse_nonfinite(adapter, where, " or allow non-finite values")
        bound.append(adapter)
    return bound


def refuse_nonfinite(adapter: Adapter, where: str, otherwise: str = "") -> None:
    """Refuse an adapter whose stored tensors hold NaN or Inf: nothing computed from it is finite,
    and an SVD of it does not converge."""
    bad = adapter.nonfinite_keys()
    if bad:
        raise SurgeonError(
            f"{where}: the delta for {bad[0]!r} holds NaN or Inf ({len(bad)} such keys); fix the adapter{otherwise}."
        )


def deltas_by_key(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, list[tuple[Delta, float]]]:
    plan: dict[str, list[tuple[Delta, float]]] = {}
    for adapter, weight in zip(adapters, weights):
        for key, deltas in adapter.items():
            scale = next((d.scale for d in deltas if not abs(weight * getattr(d, "scale", 1.0)) <= FP32_MAX), None)
            if scale is not None:
                raise SurgeonError(
                    f"{key!r}: the weight {weight:g} times the delta's scale {scale:g} is beyond fp32's range, "
                    "in which merge computes; use a smaller weight."
                )
            plan.setdefault(key, []).extend((d, weight) for d in deltas)
    return plan


def _copy_extras(base: Checkpoint, out: Path, dtype: torch.dtype | None, config: dict, untie: bool) -> None:
    """The base's other files, beside the weights; ``config`` is the base's config, read (and so
    checked) before any tensor was written."""
    for path in base.extra_files():
        shutil.copy2(path, out / path.name)
    if (dtype is not None or untie) and config:  # dtype is set for a quantized base: it is written dequantized
        # The copy must describe the weights next to it: their dtype, no quantization once dequantized, untied heads.
        for name in ("torch_dtype", "dtype"):
            if name in config and dtype is not None:
                config[name] = _CONFIG_DTYPE_NAMES[dtype]
        if base.quantized:
            config.pop("quantization_config", None)
        for section in (config, config.get("text_config")):
            if untie and isinstance(section, dict):
                section["tie_word_embeddings"] = False
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


class _Scratch:
    """Buffers sized once for the largest changed tensor and reused for every one: fresh
    multi-hundred-MB allocations per tensor cost more in page faults than the arithmetic does.
    Results alternate between two slots so that one can be written while the next is computed."""

    SLOTS = 2

    def __init__(self, changed: list[TensorInfo], device: torch.device):
        largest = max((math.prod(i.shape) for i in changed), default=0)
        widest = max((i.dtype.itemsize for i in changed), default=1)
        self._work = torch.empty(largest, dtype=torch.float32, device=device)
        self._results = [torch.empty(largest * widest, dtype=torch.uint8) for _ in range(self.SLOTS)]

    def work(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An fp32 tensor of ``shape`` on the compute device (contents undefined)."""
        return self._work[: math.prod(shape)].view(shape)

    def result(self, info: TensorInfo, slot: int) -> torch.Tensor:
        """A CPU tensor of ``info``'s shape and dtype in result slot ``slot`` (contents undefined)."""
        return self._results[slot % self.SLOTS][: info.num_bytes].view(info.dtype).view(info.shape)


def transform_checkpoint(
    base: Checkpoint,
    plan: dict[str, list[tuple[Delta, float]]],
    out: Path,
    *,
    undo: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device = torch.device("cpu"),
    shard_size: int = 5 * 10**9,
    on_tensor: Callable[[str], None] | None = None,
    metadata: dict[str, str] | None = None,
    allow_nonfinite: bool = False,
    untied: dict[str, str] | None = None,
    encoder: "BnbEncoder | None" = None,
) -> MergeReport:
    """Write ``base`` with ``plan``'s deltas applied (or removed, with ``undo``) into ``out``.
    ``untied``: {output head: tied embedding key}: each head is written as its embedding was in
    ``base``, and config.json says the two are no longer tied.

    Float tensors are computed in fp32 on ``device`` and cast to ``dtype`` (default: each tensor's
    own dtype; for a quantized base, the dtype it computes in); tensors without deltas are copied,
    cast only when ``dtype`` asks for it.
    ``metadata`` goes into every shard's header (surgeon records how the file was made there).
    Every tensor written is checked to be finite (one sum: see :func:`all_finite`), unless ``allow_nonfinite``.
    An ``encoder`` writes the result as a bitsandbytes checkpoint (:mod:`surgeon.ops.quantized_output`).
    """
    started = time.perf_counter()
    if dtype is None and base.quantized:
        dtype = getattr(torch, dequantized_dtype(base.config()))

    def out_dtype(info: TensorInfo) -> torch.dtype:
        return dtype if dtype is not None and info.dtype.is_floating_point else info.dtype

    untied = untied or {}
    config = base.config() if dtype is not None or untied else {}
    sources = {**{key: key for key in base.keys()}, **untied}  # output key → the base key it is computed from
    planned = planned_outputs(base, plan, undo, out_dtype)
    # an untied head keeps the embedding's base values, with as many rows as the embedding is written with
    specs = [
        (key, planned[key] if key in planned else TensorInfo(planned[source].shape, out_dtype(base.info(source))))
        for key, source in sources.items()
    ]
    for key in plan:
        if not base.info(key).dtype.is_floating_point:
            raise SurgeonError(f"{base.path}: {key!r} is {base.info(key).dtype}; deltas apply to float weights only.")
    changed = [info for key, info in specs if key in plan]
    scratch = _Scratch(changed + [TensorInfo(base.info(k).shape, out_dtype(base.info(k))) for k in plan], device)
    report = MergeReport(output=str(out), device=str(device))
    # Writing is as costly as computing, so one thread writes tensor i while this one computes i+1;
    # at most one write is in flight when a result slot is filled, and it uses the other slot.
    tokens = [token for deltas in plan.values() for delta, _ in deltas for token in delta.new_tokens]
    if tokens and not undo:
        from surgeon.vocabulary import check_new_tokens

        check_new_tokens(base.extra_files(), tokens, base.path)
    stored = encoder.layout(specs) if encoder else specs
    with (
        StreamingWriter(out, stored, shard_size=shard_size, metadata=metadata) as writer,
        ThreadPoolExecutor(1) as io,
        ThreadPoolExecutor(1) as reader,
    ):
        in_flight: deque[Future] = deque()
        for (key, info), tensor in zip(specs, _read_ahead(reader, base, [sources[key] for key, _ in specs])):
            tensor = _grown(tensor, info.shape) if key in untied else tensor
            deltas = plan.get(key)
            while len(in_flight) > 1:
                in_flight.popleft().result()
            base_tensor, work = tensor, None
            if deltas:
                work = scratch.work(tensor.shape).copy_(tensor)
                work = _removed(base, key, work, deltas) if undo else apply_deltas(work, deltas)
                tensor = scratch.result(info, slot=report.changed).copy_(work)
                report.changed += 1
            tensor = tensor.to(dtype=info.dtype).cpu()
            if not allow_nonfinite and not all_finite(tensor):
                raise SurgeonError(_nonfinite_cause(base, key, base_tensor, work, info.dtype))
            in_flight.append(io.submit(_write, writer, encoder, key, tensor))
            report.tensors += 1
            if on_tensor is not None:
                on_tensor(key)
        for write in in_flight:
            write.result()
        report.files = writer.file_names
    _copy_extras(base, out, dtype, config, bool(untied))
    if tokens:
        from surgeon.vocabulary import record_tokens

        report.notes += record_tokens(out, tokens, undo)
    if encoder:
        float_dtypes = {str(i.dtype).removeprefix("torch.") for _, i in specs if i.dtype.is_floating_point}
        written = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else base.config()
        # the config as written so far (vocab_size of a merged prompt, untied heads), with the quantization added
        encoder.finish(out, writer, written, "bfloat16" if len(float_dtypes) != 1 else float_dtypes.pop())
    report.dtype = ", ".join(sorted({str(i.dtype).removeprefix("torch.") for _, i in specs}))
    report.seconds = time.perf_counter() - started
    return report


def _removed(base: Checkpoint, key: str, work: torch.Tensor, deltas: list[tuple[Delta, float]]) -> torch.Tensor:
    """:func:`remove_deltas`, a delta that finds it was never applied named with the tensor."""
    try:
        return remove_deltas(work, deltas)
    except SurgeonError as error:
        raise SurgeonError(f"{base.path}: {key!r}: {error}") from None


def _grown(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` with zero rows appended up to ``shape``: an untied head's rows for appended virtual
    tokens, as an untied head gets them (never produced, so never predicted above the real ones' logits)."""
    missing = shape[0] - tensor.shape[0] if tensor.dim() and len(shape) else 0
    return torch.cat([tensor, tensor.new_zeros((missing, *tensor.shape[1:]))]) if missing > 0 else tensor


def _output_shape(key: str, shape: tuple[int, ...], deltas: list[tuple[Delta, float]], undo: bool) -> tuple[int, ...]:
    """The shape a parameter is written with: the deltas that append rows grow it (or, undone, shrink it).
    Each delta must fit the shape the ones before it leave (a LoRA after appended rows would not)."""
    for delta, _ in reversed(deltas) if undo else deltas:
        if not delta.fits(shape):
            raise SurgeonError(
                f"{key!r}: a {delta.label} delta does not fit the {tuple(shape)} parameter it would "
                "apply to; check that the adapters belong to this model, the one that appends rows "
                "given last."
            )
        shape = delta.output_shape(shape, undo)
    return tuple(shape)


def planned_outputs(
    base: Checkpoint,
    plan: dict[str, list[tuple[Delta, float]]],
    undo: bool,
    out_dtype: Callable[[TensorInfo], torch.dtype] = lambda info: info.dtype,
) -> dict[str, TensorInfo]:
    """Every tensor :func:`transform_checkpoint` writes, with the shape the deltas give it and its output dtype."""
    shapes = {key: _output_shape(key, base.info(key).shape, plan.get(key, []), undo) for key in base.keys()}
    return {key: TensorInfo(shape, out_dtype(base.info(key))) for key, shape in shapes.items()}


@dataclass
class _Planned:
    """An output not yet written, as :func:`surgeon.pairing.paired_keys` reads a checkpoint."""

    path: Path
    specs: dict[str, TensorInfo]

    def keys(self) -> list[str]:
        return list(self.specs)

    def __contains__(self, key: str) -> bool:
        return key in self.specs

    def info(self, key: str) -> TensorInfo:
        return self.specs[key]


def _read_ahead(reader: ThreadPoolExecutor, base: Checkpoint, keys: list[str]) -> Iterator[torch.Tensor]:
    """``base.get`` of each key in turn, the next one read while the caller computes with this one: reading
    (page faults, and a QLoRA base's quantization round trip) then overlaps the merge arithmetic."""
    pending = None
    for key in keys:
        upcoming = reader.submit(base.get, key)
        if pending is not None:
            yield pending.result()
        pending = upcoming
    if pending is not None:
        yield pending.result()


def _write(writer: StreamingWriter, encoder: "BnbEncoder | None", key: str, tensor: torch.Tensor) -> None:
    """One result, as the tensors that store it (an encoder may quantize it into several)."""
    for name, part in (encoder.encode(key, tensor) if encoder else {key: tensor}).items():
        writer.write(name, part)


def _nonfinite_cause(
    base: Checkpoint, key: str, original: torch.Tensor, work: torch.Tensor | None, dtype: torch.dtype
) -> str:
    """Why the tensor about to be written as ``key`` holds NaN or Inf: the base already did, the
    fp32 arithmetic overflowed, or the cast to a narrower ``dtype`` did."""
    anyway = "merge, unmerge and compose --base write it anyway with --allow-nonfinite"
    if not all_finite(original):
        return f"{base.path}: {key!r} already holds NaN or Inf; fix the checkpoint ({anyway})."
    if work is not None and not all_finite(work):
        return (
            f"{key!r} comes out NaN or Inf: the deltas applied to it overflow fp32 (weights or scales too "
            f"large?); check the adapter's scale and the weights ({anyway})."
        )
    return (
        f"{key!r} overflows {str(dtype).removeprefix('torch.')} when cast (a value beyond its largest finite "
        f"number); write a wider dtype such as fp32 or bf16 ({anyway})."
    )


def one_weight_each(weights: Sequence[float] | None, inputs: Sequence, what: str = "adapters") -> list[float]:
    """The -w values, one per input (default 1 each), each a finite number, or an error when their
    counts differ. (torch's addmm_ treats a NaN alpha as 1, so a NaN weight would merge silently.)"""
    weights = [float(w) for w in weights] if weights else [1.0] * len(inputs)
    if len(weights) != len(inputs):
        raise SurgeonError(f"got {len(weights)} weights for {len(inputs)} {what}; give one per input or none.")
    bad = next((w for w in weights if not abs(w) <= FP32_MAX), None)  # NaN fails the comparison too
    if bad is not None:
        raise SurgeonError(f"weight {bad} is not a finite number within fp32's range; give each input a finite weight.")
    return weights


def merge(
    base: Checkpoint,
    adapters: Sequence[tuple[Adapter, str]],
    out: Path,
    *,
    weights: Sequence[float] | None = None,
    allow_nonfinite: bool = False,
    untie: bool = False,
    **options,
) -> MergeReport:
    """Merge adapters into ``base``, in the order given, each scaled by its weight (default 1).
    ``untie``: where a changed embedding is tied to the output head, write the head as it was
    (what PEFT computes before merging) instead of letting it follow the embedding."""
    weights = one_weight_each(weights, adapters)
    bound = prepare(adapters, base, allow_nonfinite)
    for adapter, weight, (_, where) in zip(bound, weights, adapters):
        if weight != 1.0 and not all(d.scalable for ds in adapter.deltas.values() for d in ds):
            kinds = sorted({d.kind for ds in adapter.deltas.values() for d in ds if not d.scalable})
            raise SurgeonError(
                f"{where}: its {' and '.join(kinds)} deltas have no defined meaning at a weight "
                "other than 1 (DoRA rescales whole rows, appended rows are looked up whole); "
                "give it weight 1."
            )
    plan = deltas_by_key(bound, weights)
    tied = tied_heads(base, [k for k in plan if embedding_name(k.rpartition(".")[0])])
    if untie and not tied:
        raise SurgeonError(
            f"untie: the adapters change no embedding of {base.path} that is tied to an output head; "
            "there is nothing to untie."
        )
    untied = {head: key for key, head in tied.items()} if untie else None
    report = transform_checkpoint(base, plan, out, allow_nonfinite=allow_nonfinite, untied=untied, **options)
    report.notes += [] if untie else [_tied_note(key, head) for key, head in tied.items()]
    report.notes += [note for adapter in bound for note in adapter.notes]
    return report


def _tied_note(key: str, head: str) -> str:
    return (
        f"{key!r} is tied to the output head {head!r}, so the merged embedding changes the head too (as PEFT's "
        "merge does; PEFT's unmerged adapter leaves the head as it was); untie to keep the head as it was."
    )


def unmerge(
    merged: Checkpoint,
    adapters: Sequence[tuple[Adapter, str]],
    out: Path,
    *,
    weights: Sequence[float] | None = None,
    allow_nonfinite: bool = False,
    check: Checkpoint | None = None,
    **options,
) -> MergeReport:
    """Take adapters back off a merged checkpoint: the inverse of :func:`merge` with the same arguments.
    ``check``, the real base, must be the same model as the restored output (refused before writing)."""
    weights = one_weight_each(weights, adapters)
    bound = prepare(adapters, merged, allow_nonfinite, base_shapes=False)
    plan = deltas_by_key(bound, weights)
    for key, deltas in plan.items():
        reason = unmerge_refusal(key, [d for d, _ in deltas])
        if reason:
            raise SurgeonError(f"cannot unmerge: {reason}.")
    if check is not None:
        planned = _Planned(merged.path, planned_outputs(merged, plan, undo=True))
        check_comparable(planned, with_implied_heads(check, planned))
    return transform_checkpoint(merged, plan, out, undo=True, allow_nonfinite=allow_nonfinite, **options)


@dataclass
class Difference:
    key: str
    max_abs: float
    relative: float


def check_comparable(a: Checkpoint | _Planned, b: Checkpoint) -> list[str]:
    """The keys two checkpoints of one model both hold, or an error (:func:`surgeon.pairing.paired_keys`);
    asked from the headers alone, so that ``unmerge --check`` can refuse a wrong base before writing anything."""
    keys, _ = paired_keys(a, b, "they are not the same model and cannot be compared")
    return keys


def compare(a: Checkpoint, b: Checkpoint) -> list[Difference]:
    """Per-tensor max absolute and relative Frobenius difference of two checkpoints of one model
    (non-float tensors that only one holds are left out, see :mod:`surgeon.pairing`)."""
    b = with_implied_heads(b, a)
    keys = check_comparable(a, b)
    found = []
    for key in keys:
        x = a.get(key).to(torch.float64)
        y = b.get(key).to(torch.float64)
        diff = x - y
        norm = float(torch.linalg.vector_norm(y))
        found.append(
            Difference(
                key,
                float(diff.abs().max()) if diff.numel() else 0.0,
                float(torch.linalg.vector_norm(diff)) / norm if norm else float(torch.linalg.vector_norm(diff)),
            )
        )
    return found
