"""Extracting an adapter from a full fine-tune: ΔW = tuned − base, factored tensor by tensor.

Every weight whose delta is non-zero becomes a :class:`LowRank` of the rank its spectrum earns
(:class:`RankRule`), optionally followed by a :class:`Sparse` residual holding the largest
entries of what the low-rank part missed. Keeping the k largest entries of the residual R cuts
the squared error by exactly the sum of their squares, so the report can say what the sparse
part buys. By default the adapter is complete: embeddings and heads are factored too, changed
1-D norms and biases kept whole (PEFT modules_to_save). What is left out (by choice, an
embedding tied to the output head, which no adapter carries, excluded keys, integer buffers) is
listed in the report with the norm of its change and, in total, its share of the squared change:
nothing that differs is dropped without a line saying so.

On CPU a few worker threads factor one pair each (see :func:`parallelism`); the reading
thread stays at most one pair ahead of them, so memory holds a delta per worker, not a model
(tensors that are only reported are differenced a slice at a time).
Reports and adapters come out in checkpoint order whatever the workers' timing, and each
matrix's random sketch is seeded by its key. On a GPU one worker factors while reader threads
keep the next ``prefetch`` pairs loaded (through pinned memory, on their own CUDA streams), so
disk reading, host-to-device copies and the SVD overlap; the same threads run with ``prefetch``
on CPU (without the pinned staging), where the tests exercise them.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch

from surgeon.architectures import known_module_types
from surgeon.checkpoint import Checkpoint
from surgeon.choices import EMBEDDING_CHOICES
from surgeon.delta import Adapter, Delta, LowRank, Replace, Sparse
from surgeon.errors import SurgeonError
from surgeon.formats.sparse import index_dtype
from surgeon.keys import embedding_name, key_generator
from surgeon.model_names import meta_model, model_names
from surgeon.ops.norms import frobenius_norm
from surgeon.ops.rank import RankRule
from surgeon.ops.svd import factor_split, truncated_svd
from surgeon.pairing import paired_keys

#: Why a key that only one checkpoint holds is left out (see surgeon/pairing.py).
_ONE_SIDED = "in one checkpoint only, and not a float parameter (a buffer such as position_ids)"
SPLIT_CHOICES = ("balanced", "up", "down")
MAX_WORKERS = 4
READERS = 4  # reader threads at most: several reads in flight keep a fast disk busy


@dataclass(frozen=True)
class ExtractOptions:
    """How to factor each delta; see ``surgeon extract --help`` for the user-facing meaning."""

    rule: RankRule
    method: str = "auto"
    precision: torch.dtype = torch.float32
    split: str = "balanced"
    alpha: float | None = None
    sparse_density: float = 0.0
    embeddings: str = "auto"  # lora, except an embedding tied to the output head (no adapter can carry it)
    keep_changed_1d: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    factor_dtype: torch.dtype | None = None
    device: torch.device = torch.device("cpu")
    prefetch: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparse_density <= 1.0:
            raise SurgeonError(f"sparse_density must be in [0, 1]; got {self.sparse_density}.")
        if self.rule.rank == 0 and self.sparse_density == 0.0:
            raise SurgeonError("rank 0 keeps no low-rank part; give a sparse_density for a pure sparse diff.")
        if self.embeddings not in EMBEDDING_CHOICES:
            raise SurgeonError(f"embeddings must be one of {', '.join(EMBEDDING_CHOICES)}; got {self.embeddings!r}.")
        if self.split not in SPLIT_CHOICES:
            raise SurgeonError(f"split must be one of {', '.join(SPLIT_CHOICES)}; got {self.split!r}.")
        if self.alpha is not None and self.alpha <= 0:
            raise SurgeonError(f"alpha must be positive; got {self.alpha}.")
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as error:
                raise SurgeonError(
                    f"include/exclude pattern {pattern!r} is not a valid regular expression ({error})."
                ) from None


@dataclass
class Row:
    """One changed tensor: what was done with it and how well."""

    key: str
    action: str  # lora, sparse, replace, skipped
    module_type: str
    shape: list[int]
    delta_norm: float
    rank: int = 0
    energy_kept: float | None = None
    relative_error: float | None = None
    sparse_entries: int = 0
    relative_error_with_sparse: float | None = None
    params: int = 0
    method: str = ""
    reason: str = ""


@dataclass
class Extraction:
    """The result: low-rank deltas (PEFT-writable), sparse deltas, and the per-tensor rows."""

    lora: Adapter
    sparse: Adapter
    rows: list[Row] = field(default_factory=list)
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    tensors: int = 0
    unchanged: int = 0
    full_delta_bytes: int = 0
    seconds: float = 0.0
    module_types_source: str = ""

    def report(self) -> dict:
        targets = [r for r in self.rows if r.action in ("lora", "sparse")]
        errors = [
            r.relative_error_with_sparse if r.relative_error_with_sparse is not None else r.relative_error
            for r in targets
        ]
        ranks = [r.rank for r in targets if r.action == "lora"]
        one_sided = [r.key for r in self.rows if r.reason == _ONE_SIDED]
        left = [r for r in self.rows if r.action == "skipped" and r.reason != _ONE_SIDED]
        change = sum(r.delta_norm**2 for r in self.rows if math.isfinite(r.delta_norm))
        return {
            "tensors": self.tensors,
            "unchanged": self.unchanged,
            "changed": len(self.rows) - len(one_sided),
            "targets": len(targets),
            "replaced": sum(r.action == "replace" for r in self.rows),
            "skipped": sum(r.action == "skipped" for r in self.rows) - len(one_sided),
            "one_sided": one_sided,
            # what the adapter leaves out, and its cost: the share of the total squared change it does not carry
            "left_out": [{"key": r.key, "reason": r.reason, "delta_norm": r.delta_norm} for r in left],
            "left_out_share": sum(r.delta_norm**2 for r in left if math.isfinite(r.delta_norm)) / change
            if change
            else 0.0,
            "rank": {"min": min(ranks), "max": max(ranks), "mean": sum(ranks) / len(ranks)} if ranks else None,
            "mean_relative_error": sum(errors) / len(errors) if errors else None,
            "max_relative_error": max(errors) if errors else None,
            "adapter_params": self.lora.num_params() + self.sparse.num_params(),
            "adapter_bytes": self.lora.num_bytes() + self.sparse.num_bytes(),
            "full_delta_bytes": self.full_delta_bytes,
            "seconds": self.seconds,
            "module_types": self.module_types_source,
            "modules": [asdict(r) for r in self.rows],
        }


def module_types(checkpoint: Checkpoint) -> tuple[dict[str, str], set[str], set[str], str]:
    """(module type per weight key, keys of input/output embeddings, those tied to one another, how it was found).

    Architectures whose layout is known (surgeon/architectures.py: Llama, Mistral, Qwen, ...)
    are read off names, without importing transformers. Otherwise the model class named in
    ``config.json`` is instantiated on the meta device (no memory,
    no weights) and its modules are read off: that is the only reliable way to tell a GPT-2
    ``Conv1D`` (in×out) from a Linear of the transposed shape. Without transformers or a config,
    names and ranks are used: 4-D is conv, ``embed``/``wte``/``wpe`` names are embeddings.
    """
    found = known_module_types(checkpoint.config(), {k: tuple(checkpoint.info(k).shape) for k in checkpoint.keys()})
    found = found or _types_from_model(checkpoint)
    if found is not None:
        return found
    types, embeddings = {}, set()
    for key in checkpoint.keys():
        dims = len(checkpoint.info(key).shape)
        if dims >= 3:
            types[key] = "conv"
        elif dims == 2 and embedding_name(key.rpartition(".")[0]):
            types[key] = "embedding"
            embeddings.add(key)
        elif dims == 2:
            types[key] = "linear"
            if re.search(r"(^|\.)lm_head\.", key):
                embeddings.add(key)
    return types, embeddings, set(), "guessed from tensor names (no config.json or transformers)"


def _types_from_model(checkpoint: Checkpoint) -> tuple[dict[str, str], set[str], set[str], str] | None:
    names = model_names(checkpoint)  # refuses a transformers model's checkpoint without transformers
    if names is None:
        return None
    from transformers.pytorch_utils import Conv1D

    model = meta_model(checkpoint.directory, names.model_class)
    kinds = (
        (torch.nn.Embedding, "embedding"),
        (Conv1D, "conv1d"),
        (torch.nn.modules.conv._ConvNd, "conv"),
        (torch.nn.Linear, "linear"),
    )
    by_module = {}
    for name, module in model.named_modules():
        for cls_, kind in kinds:
            if isinstance(module, cls_):
                by_module[name + ".weight"] = kind
                break
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_names = {n + ".weight" for n, m in model.named_modules() if output is not None and m is output}
    types, embeddings = {}, set()
    containers = _containers(model)
    for key in checkpoint.keys():
        name = names.first_name(key)
        dims = len(checkpoint.info(key).shape)
        fallback = "conv" if dims >= 3 else "linear" if dims == 2 else "other"
        types[key] = by_module.get(name) or ("parameter" if name.rpartition(".")[0] in containers else fallback)
        if types[key] == "embedding" or name in output_names:
            embeddings.add(key)
    tied_keys = {key for key in checkpoint.keys() if names.first_name(key) in names.tied}
    return types, embeddings, tied_keys, f"read from {names.model_class} (transformers)"


def _containers(model: torch.nn.Module) -> set[str]:
    """Modules that hold bare parameters beside child modules with parameters of their own (ViT's
    embeddings: ``cls_token`` and ``position_embeddings`` beside the patch projection). No LoRA can
    sit on such a parameter; PEFT keeps it only by copying its module whole (modules_to_save)."""
    return {
        name
        for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
        and any(any(True for _ in child.parameters()) for child in module.children())
    }


def _pairs(
    base: Checkpoint, tuned: Checkpoint, keys: list[str], prefetch: int, device: torch.device
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, base tensor, tuned tensor) on ``device``, in ``keys`` order; with ``prefetch`` > 0,
    reader threads (up to ``READERS``) keep that many pairs loaded ahead of the consumer."""
    if prefetch <= 0:
        for key in keys:
            yield key, base.get(key).to(device), tuned.get(key).to(device)
        return
    staging = _Staging(device)

    def load(key: str) -> tuple[str, torch.Tensor, torch.Tensor]:
        return key, staging.load(base.get(key)), staging.load(tuned.get(key))

    pool = ThreadPoolExecutor(min(prefetch, READERS), thread_name_prefix="surgeon-extract-reader")
    ahead: deque[Future] = deque()
    try:
        for key in keys:
            ahead.append(pool.submit(load, key))
            if len(ahead) > prefetch:
                yield staging.received(*ahead.popleft().result())
        while ahead:
            yield staging.received(*ahead.popleft().result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Staging:
    """Moves tensors read on the CPU to ``device`` from reader threads.

    On CUDA each tensor goes through pinned memory (torch's caching host allocator reuses the
    buffers) and is copied on the reader thread's own stream, so that copies run beside the
    factoring kernels instead of queueing behind them; the reader waits for its copy, and the
    consumer marks the tensor as used on its stream (``record_stream``) so that the allocator
    does not hand the memory back to the reader's stream while a kernel still reads it. On
    CPU (and any other device) it is a plain ``.to(device)``.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._local = threading.local()

    def load(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return tensor.to(self.device)
        if not hasattr(self._local, "stream"):
            self._local.stream = torch.cuda.Stream(self.device)
        pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)
        with torch.cuda.stream(self._local.stream):
            moved = pinned.to(self.device, non_blocking=True)
        self._local.stream.synchronize()
        return moved

    def received(self, key: str, *tensors: torch.Tensor) -> tuple:
        """``(key, *tensors)``, now usable on the consumer's stream."""
        if self.cuda:
            for tensor in tensors:
                tensor.record_stream(torch.cuda.current_stream(self.device))
        return (key, *tensors)


class _Workspace:
    """The delta of the current pair, in a buffer grown to the largest delta so far and reused:
    a fresh fp32 tensor per weight costs more in page faults than the subtraction itself.

    On CPU ``new − old`` is taken as a cast copy of ``new`` minus cast slices of ``old``: torch's
    in-place subtraction of a bf16 tensor from an fp32 one is not vectorised there and runs ~4×
    slower than casting the operand first. A GPU casts the operand inside the subtraction kernel,
    so there it is one copy and one subtraction over the whole tensor (slices cost a launch each:
    ≈78 ms a 7B matrix on an H200 against about one)."""

    SLICE = 1 << 20

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.sliced = device.type == "cpu"
        self._flat = torch.empty(0, dtype=dtype, device=device)
        self._slice = torch.empty(self.SLICE, dtype=dtype, device=device)
        self._other = torch.empty(self.SLICE, dtype=dtype, device=device)

    def difference_norm(self, old: torch.Tensor, new: torch.Tensor) -> float:
        """‖new − old‖_F, a slice at a time: tensors that are only reported (embeddings left
        out, norms, excluded keys) never grow the workspace to their size."""
        old, new = old.reshape(-1), new.reshape(-1)
        energy = 0.0
        for start in range(0, old.numel(), self.SLICE):
            part = slice(start, start + self.SLICE)
            energy += frobenius_norm(self._difference(self._other[: old[part].numel()], old[part], new[part])) ** 2
        return math.sqrt(energy)

    def delta(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """new − old, computed in the workspace's dtype; valid until the next call."""
        size = old.numel()
        if self._flat.numel() < size:
            self._flat = torch.empty(0, dtype=self._flat.dtype, device=self._flat.device)  # free before growing
            self._flat = torch.empty(size, dtype=self._flat.dtype, device=self._flat.device)
        return self._difference(self._flat[:size], old.reshape(-1), new.reshape(-1)).view(old.shape)

    def _difference(self, out: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``out`` (flat) filled with new − old (flat, as long as ``out``)."""
        out.copy_(new)
        if old.dtype == out.dtype or not self.sliced:
            return out.sub_(old)
        for start in range(0, out.numel(), self.SLICE):
            part = old[start : start + self.SLICE]
            out[start : start + part.numel()].sub_(self._slice[: part.numel()].copy_(part))
        return out


def _matches(key: str, options: ExtractOptions) -> bool:
    if options.include and not any(re.search(p, key) for p in options.include):
        return False
    return not any(re.search(p, key) for p in options.exclude)


def _top_entries(residual: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (ascending) and values of the ⌈density·n⌉ largest-magnitude entries."""
    flat = residual.reshape(-1)
    count = min(flat.numel(), math.ceil(density * flat.numel()))
    if count == flat.numel():
        indices = torch.arange(flat.numel(), device=flat.device)
    else:
        indices = torch.topk(flat.abs(), count, sorted=False).indices.sort().values
    return indices, flat[indices]


def _sparse_of(residual: torch.Tensor, density: float, shape: tuple[int, ...]) -> Sparse:
    indices, values = _top_entries(residual, density)
    return Sparse(indices.to(index_dtype(shape)).cpu(), values.to(torch.float32).cpu(), shape)


def _factor(
    key: str,
    delta: torch.Tensor,
    module_type: str,
    shape: tuple[int, ...],
    options: ExtractOptions,
    out_dtype: torch.dtype,
    generator: torch.Generator,
) -> tuple[LowRank | None, torch.Tensor, object]:
    """The low-rank part of one delta (or None at rank 0), the residual, and the factorization."""
    matrix = delta.reshape(shape[0], -1)
    found = truncated_svd(matrix, options.rule, method=options.method, precision=options.precision, generator=generator)
    if found.rank == 0:
        return None, delta, found
    scale = options.alpha / found.rank if options.alpha is not None else 1.0
    # "up" is PEFT's lora_B: the left factor for Linear and conv, the right one where the base
    # layout is transposed (GPT-2 Conv1D in×out, embeddings), as formats/peft.py writes them.
    transposed = module_type in ("conv1d", "embedding")
    side = {"balanced": "balanced", "up": "right" if transposed else "left", "down": "left" if transposed else "right"}[
        options.split
    ]
    left, right = factor_split(found.u, found.s / scale, found.vh, side)
    left, right = left.to(out_dtype), right.to(out_dtype)
    residual = matrix.addmm_(left.to(matrix.dtype), right.to(matrix.dtype), alpha=-scale).reshape(
        shape
    )  # delta is not needed again
    low_rank = LowRank(down=right.cpu().contiguous(), up=left.cpu().contiguous(), scale=scale, shape=shape)
    return low_rank, residual, found


def _extract_matrix(
    row: Row,
    delta: torch.Tensor,
    module_type: str,
    options: ExtractOptions,
    out_dtype: torch.dtype,
    generator: torch.Generator,
    outcome: _Outcome,
    keep_spectra: bool,
) -> None:
    """Factor one targeted delta into ``outcome`` (low rank, then the sparse residual) and fill its row."""
    key, shape = row.key, tuple(row.shape)
    residual = delta
    if options.rule.rank != 0:
        low_rank, residual, found = _factor(key, delta, module_type, shape, options, out_dtype, generator)
        row.method, row.energy_kept = found.method, found.energy_kept
        if keep_spectra and found.spectrum.numel():
            outcome.spectrum = (found.spectrum / found.spectrum[0]).float()
        if low_rank is not None:
            outcome.parts.append(("lora", low_rank, module_type))
            row.action, row.rank, row.params = "lora", low_rank.rank, low_rank.up.numel() + low_rank.down.numel()
    residual_norm = frobenius_norm(residual)
    row.relative_error = residual_norm / row.delta_norm
    if options.sparse_density > 0:
        part = _sparse_of(residual, options.sparse_density, shape)
        outcome.parts.append(("sparse", part, module_type))
        kept = frobenius_norm(part.values.double())
        row.sparse_entries = part.indices.numel()
        row.params += part.indices.numel()
        row.relative_error_with_sparse = math.sqrt(max(0.0, residual_norm**2 - kept**2)) / row.delta_norm
        if row.action == "skipped":
            row.action = "sparse"
    if row.action == "skipped":
        row.reason = "the rank rule kept nothing"


@dataclass
class _Outcome:
    """What one changed tensor contributes: its report row and the deltas for each output."""

    row: Row
    parts: list[tuple[str, Delta, str]] = field(default_factory=list)  # (lora|sparse, delta, module type)
    spectrum: torch.Tensor | None = None
    delta_bytes: int = 0


_EMBEDDING_LEFT_OUT = {
    "embedding": "embedding or lm_head, left out by --embeddings skip",
    "tied": "embedding tied to the output head: PEFT would apply an adapter on it to the input only, so the tuned "
    "output head would be lost; merge the fine-tune instead, or force it with --embeddings lora or full",
}


def _embedding_mode(embedding: str, options: ExtractOptions) -> str:
    """skip, lora or full for an embedding: "auto" factors it, unless it is tied to the output head."""
    if options.embeddings != "auto":
        return options.embeddings
    return "skip" if embedding == "tied" else "lora"


def _changed_tensor(
    key: str,
    old: torch.Tensor,
    new: torch.Tensor,
    module_type: str,
    embedding: str,
    options: ExtractOptions,
    workspace: _Workspace,
    keep_spectra: bool,
) -> _Outcome:
    """Everything about one tensor that differs: its delta, its row, and what to extract from it.
    ``embedding``: "embedding" for an input or output embedding, "tied" for one tied to the other.
    Runs in a worker thread; it touches nothing shared."""
    shape = tuple(old.shape)
    if not (old.is_floating_point() and new.is_floating_point()):
        return _Outcome(
            Row(
                key,
                "skipped",
                module_type,
                list(shape),
                float("nan"),
                reason="not a float tensor; it cannot carry a delta",
            )
        )
    row = Row(key, "skipped", module_type, list(shape), 0.0)
    outcome = _Outcome(row)
    whole = None
    if not _matches(key, options):
        row.reason = "excluded by --include/--exclude"
    elif "." not in key:
        row.reason = "a parameter of the model itself, which PEFT cannot keep whole (modules_to_save)"
    elif len(shape) <= 1:
        whole = options.keep_changed_1d or "1-D (norm or bias), left out by --skip-changed-1d"
    elif module_type == "parameter":
        whole = (
            options.keep_changed_1d
            or "a bare parameter (cls_token, position embeddings), left out by --skip-changed-1d"
        )
    elif embedding and _embedding_mode(embedding, options) != "lora":
        left_out = _EMBEDDING_LEFT_OUT[embedding if options.embeddings == "auto" else "embedding"]  # or by choice
        whole = _embedding_mode(embedding, options) == "full" or left_out
    if row.reason or whole is not None:
        row.delta_norm = workspace.difference_norm(old, new)
        if whole is True:
            row.action, row.params = "replace", new.numel()
            outcome.parts.append(("sparse" if options.rule.rank == 0 else "lora", Replace(new.cpu()), "other"))
        elif whole:
            row.reason = whole
        return outcome
    delta = workspace.delta(old, new)
    row.delta_norm = frobenius_norm(delta)
    if not math.isfinite(row.delta_norm):
        raise SurgeonError(
            f"{key!r} changes by NaN or Inf (or overflows {options.precision}) between the two checkpoints; "
            "extract needs finite weights: check the fine-tune that wrote them."
        )
    if module_type == "other":
        module_type = row.module_type = "conv" if delta.dim() > 2 else "linear"
    outcome.delta_bytes = delta.numel() * new.element_size()
    generator = key_generator(options.seed, key)
    _extract_matrix(
        row, delta, module_type, options, options.factor_dtype or new.dtype, generator, outcome, keep_spectra
    )
    return outcome


def _complete_whole_modules(result: Extraction, base: Checkpoint, tuned: Checkpoint, keys: list[str]) -> None:
    """A module kept whole (a changed norm's weight, a container's cls_token) is loaded by PEFT's
    modules_to_save with all its parameters, its children's included, and refused (KeyError) when one
    is missing: the others go along at the base's value, and a child's LoRA (and sparse residual)
    becomes the child's tuned weight, since PEFT would not apply a LoRA inside a module it copies whole."""
    lora = result.lora
    whole = {k.rpartition(".")[0] for k, deltas in lora.items() if all(d.replaces for d in deltas)}
    whole -= {k.rpartition(".")[0] for k, deltas in lora.items() if not all(d.replaces for d in deltas)}
    rows = {row.key: row for row in result.rows}
    for key in keys:
        owner = next((m for m in whole if key.startswith(m + ".")), None)
        if owner is None:
            continue
        if key not in lora.deltas:
            lora.add(key, Replace(base.get(key)), "other")
        elif not all(d.replaces for d in lora.deltas[key]):
            lora.deltas[key], lora.module_types[key] = [Replace(tuned.get(key))], "other"
            result.sparse.deltas.pop(key, None)
            result.sparse.module_types.pop(key, None)
            rows[key].action, rows[key].rank, rows[key].sparse_entries = "replace", 0, 0
            rows[key].params = math.prod(tuned.info(key).shape)
            rows[key].reason = f"inside {owner}, which PEFT copies whole (modules_to_save) for a parameter it holds"


def parallelism(device: torch.device) -> tuple[int, int]:
    """(worker threads, intra-op threads each) for factoring on ``device``.

    On CPU whole matrices go to up to ``MAX_WORKERS`` workers, splitting torch's threads among
    them: much of a Krylov step is small operations that keep one core busy at most, and two
    matrices at once fill the gaps (1.2–1.3× on 2 cores). Memory grows by a delta per worker.
    torch's thread count is process-wide: :func:`extract` sets it for its duration and restores
    it. A GPU takes one matrix at a time; a reader thread keeps it fed instead.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu":
        return 1, threads
    workers = max(w for w in range(1, MAX_WORKERS + 1) if threads % w == 0)  # every thread busy
    return workers, threads // workers


@contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def extract(
    base: Checkpoint,
    tuned: Checkpoint,
    options: ExtractOptions,
    on_tensor: Callable[[str], None] | None = None,
    keep_spectra: bool = False,
) -> Extraction:
    """Factor ``tuned − base`` tensor by tensor. Nothing is written here; the caller writes
    ``lora`` as PEFT and ``sparse`` as a sparse diff."""
    started = time.perf_counter()
    keys, one_sided = paired_keys(base, tuned, "extract needs a fine-tune of this very base")
    types, embeddings, tied, types_source = module_types(base)
    lora = Adapter(source_format="extract", base_model=str(base.path))
    sparse = Adapter(source_format="extract", base_model=str(base.path))
    result = Extraction(lora=lora, sparse=sparse)
    result.module_types_source = types_source
    prefetch = options.prefetch if options.prefetch is not None else (READERS if options.device.type == "cuda" else 0)
    result.tensors = len(keys) + len(one_sided)
    result.rows += [Row(k, "skipped", "other", [], 0.0, reason=_ONE_SIDED) for k in one_sided]
    workers, threads = parallelism(options.device)
    local = threading.local()

    def job(key: str, old: torch.Tensor, new: torch.Tensor) -> _Outcome:
        if not hasattr(local, "workspace"):
            local.workspace = _Workspace(options.precision, options.device)
        embedding = "tied" if key in tied else "embedding" if key in embeddings else ""
        return _changed_tensor(
            key, old, new, types.get(key, "other"), embedding, options, local.workspace, keep_spectra
        )

    pending: deque[tuple[str, Future]] = deque()

    def collect_first() -> None:
        """Add the oldest pending tensor's outcome to the result: checkpoint order, whatever the workers' timing."""
        key, future = pending.popleft()
        outcome = future.result()
        result.rows.append(outcome.row)
        for output, delta, module_type in outcome.parts:
            (lora if output == "lora" else sparse).add(key, delta, module_type)
        if outcome.spectrum is not None:
            result.spectra[key] = outcome.spectrum
        result.full_delta_bytes += outcome.delta_bytes
        if on_tensor is not None:
            on_tensor(key)

    with _intra_op_threads(threads):
        pool = ThreadPoolExecutor(workers, thread_name_prefix="surgeon-extract")
        try:
            for key, old, new in _pairs(base, tuned, keys, prefetch, options.device):
                if torch.equal(old, new):
                    result.unchanged += 1
                    if on_tensor is not None:
                        on_tensor(key)
                    continue
                pending.append((key, pool.submit(job, key, old, new)))
                while len(pending) > workers:  # at most one tensor waits for a worker: memory stays bounded
                    collect_first()
            while pending:
                collect_first()
        except BaseException:  # an error or Ctrl-C: drop the queued work instead of finishing it
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    if all(r.reason == _ONE_SIDED for r in result.rows):
        raise SurgeonError(
            f"{base.path} and {tuned.path} are identical: no tensor differs, so there is nothing to extract; nothing "
            "was written."
        )
    if not lora.low_ranks():  # no LoRA to write: whole replacements go with the sparse diff
        for key, deltas in lora.items():
            for d in deltas:
                sparse.add(key, d, "other")
        lora.deltas.clear()
    _complete_whole_modules(result, base, tuned, keys)
    if not len(lora) and not len(sparse):
        first = result.rows[0]
        raise SurgeonError(
            f"{len(result.rows)} tensors differ but none was extracted (e.g. {first.key!r}: {first.reason}); nothing "
            "was written."
        )
    result.seconds = time.perf_counter() - started
    return result
