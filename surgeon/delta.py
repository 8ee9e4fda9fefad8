"""The canonical in-memory model of a delta: the hub every format and operation goes through.

A delta targets one parameter of the base checkpoint, named by the base's own key and given in
the base parameter's own layout (a GPT-2 ``Conv1D`` weight is in×out, an embedding is
num_embeddings×dim). Formats translate their orientations into this one on read and back on
write, so operations never need to know where a delta came from.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import torch

from surgeon.errors import SurgeonError

Shape = tuple[int, ...]
#: The dtypes a low-rank factor may have: an integer, bool or fp8 tensor would be converted by
#: value into nonsense (a quantized checkpoint's codes, not its weights).
FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: The largest scale merge can apply: its arithmetic is fp32, and torch refuses a larger factor.
FP32_MAX = torch.finfo(torch.float32).max


def _shape(value) -> Shape:
    return tuple(int(d) for d in value)


def promoted_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype all of ``dtypes`` promote to (fp32 for none)."""
    found = torch.float32
    for i, dtype in enumerate(dtypes):
        found = dtype if i == 0 else torch.promote_types(found, dtype)
    return found


class Delta:
    """What every delta answers, so that operations ask instead of switching on its class.

    ``additive``: W' = W + factor·ΔW (DoRA rescales rows, a replacement overwrites);
    ``replaces``: the delta is a new value for the whole parameter; ``scalable``: a weight other
    than 1 has a meaning; ``reads_base``: ΔW is computed from the base weight itself, so it cannot
    be recomputed from a merged file. ``factored()`` is the delta as low-rank factors where it is
    stored so, ``sparse_form()`` as sparse entries where it is stored so.
    """

    additive = True
    replaces = False
    scalable = True
    reads_base = False
    kind = ""
    shape: Shape

    @property
    def label(self) -> str:
        """How ``inspect`` names the delta."""
        return self.kind

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def materialize(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def factored(self) -> "LowRank | None":
        return None

    def sparse_form(self) -> "Sparse | None":
        return None

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype its float tensors promote to (what a result built from it is stored in)."""
        return promoted_dtype(t.dtype for t in self.tensors() if t.is_floating_point())

    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors())

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def apply_(self, weight: torch.Tensor, factor: float, reference: torch.Tensor | None) -> torch.Tensor:
        """``weight`` with factor·ΔW applied, in place where it can be; ``reference`` is the
        unmerged weight DoRA norms are taken against."""
        return weight.add_(self.materialize(weight.device, weight.dtype), alpha=factor)

    def remove_(self, weight: torch.Tensor, factor: float) -> torch.Tensor:
        """The inverse of :meth:`apply_` given the merged ``weight``."""
        return self.apply_(weight, -factor, None)

    def unmerge_refusal(self, key: str) -> str | None:
        """Why this delta cannot be taken back off a merged weight, or None if it can."""
        return None

    def fits(self, shape: Shape) -> bool:
        """Whether the delta applies to a parameter of ``shape`` (its own shape, for a ΔW)."""
        return tuple(self.shape) == tuple(shape)

    def output_shape(self, shape: Shape, undo: bool = False) -> Shape:
        """The parameter's shape once the delta is applied (or, with ``undo``, removed): a ΔW keeps it."""
        return tuple(shape)

    @property
    def new_tokens(self) -> tuple[str, ...]:
        """Vocabulary entries the delta adds (names of the embedding rows it appends), in order."""
        return ()

    def rows(self, start: int, stop: int) -> "Delta":
        """The delta on rows ``start:stop`` (first axis) alone: how it follows a parameter that
        transformers splits in rows into several (:mod:`surgeon.model_names`)."""
        self._must_add("split")
        return Dense(self.materialize(dtype=self.stored_dtype)[start:stop])

    def expert_rows(self, expert: int, start: int, stop: int) -> "Delta":
        """The delta on rows ``start:stop`` of expert ``expert`` of a stacked (experts × m × k) parameter:
        the checkpoint tensor transformers stacks there (:mod:`surgeon.model_names`)."""
        self._must_add("split")
        return Dense(self.materialize(dtype=self.stored_dtype)[expert, start:stop])

    def placed(self, start: int, total: int) -> "Delta":
        """This delta as rows ``start:`` of a parameter of ``total`` rows, zero elsewhere: the inverse of
        :meth:`rows`, for a delta on one of the parameters transformers makes from one checkpoint tensor."""
        self._must_add("placed into a fused parameter")
        piece = self.materialize(dtype=self.stored_dtype)
        whole = piece.new_zeros((total, *piece.shape[1:]))
        whole[start : start + piece.shape[0]] = piece
        return Dense(whole)

    def _must_add(self, what: str) -> None:
        if not self.additive:
            raise SurgeonError(
                f"{self.label} cannot be {what} row by row: it is no sum over rows; "
                "merge it with transformers and PEFT instead."
            )


@dataclass(frozen=True, eq=False)
class LowRank(Delta):
    """ΔW = scale · up @ down, reshaped to ``shape``; with ``magnitude``, a DoRA update.

    ``down`` is r×k and ``up`` is m×r where m·k = numel(shape): for a convolution, k folds the
    input channels and the kernel. DoRA rescales the merged weight so that its norm along every
    axis except ``magnitude_axis`` equals ``magnitude`` (PEFT's rule); the norm is taken of the
    base weight plus this delta.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0
    shape: Shape = ()
    magnitude: torch.Tensor | None = None
    magnitude_axis: int = 0

    def __post_init__(self) -> None:
        bad = next((t for t in self.tensors() if t.dtype not in FACTOR_DTYPES), None)
        if bad is not None:
            raise SurgeonError(
                f"a low-rank factor is {bad.dtype}; factors and magnitudes must be fp16, bf16, fp32 or fp64."
            )
        if self.down.dim() != 2 or self.up.dim() != 2 or self.up.shape[1] != self.down.shape[0]:
            raise SurgeonError(
                f"low-rank factors do not chain: up is {tuple(self.up.shape)} and down is "
                f"{tuple(self.down.shape)}; expected up m×r and down r×k."
            )
        shape = _shape(self.shape) if self.shape else (self.up.shape[0], self.down.shape[1])
        if math.prod(shape) != self.up.shape[0] * self.down.shape[1]:
            raise SurgeonError(
                f"low-rank factors give {self.up.shape[0]}×{self.down.shape[1]} values, "
                f"which cannot fill a parameter of shape {shape}."
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "scale", float(self.scale))
        if not abs(self.scale) <= FP32_MAX:  # NaN fails this too
            raise SurgeonError(
                f"a low-rank delta has the scale {self.scale} (alpha/r); a scale must be a finite number "
                "within fp32's range."
            )
        axis_size = shape[self.magnitude_axis] if 0 <= self.magnitude_axis < len(shape) else None
        if self.magnitude is not None and (self.magnitude.dim() != 1 or self.magnitude.numel() != axis_size):
            raise SurgeonError(
                f"a DoRA magnitude has shape {tuple(self.magnitude.shape)}, but the {shape} weight has "
                f"{axis_size} entries on axis {self.magnitude_axis}; the adapter does not fit it."
            )

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def additive(self) -> bool:  # type: ignore[override]
        return self.magnitude is None

    @property
    def scalable(self) -> bool:  # type: ignore[override]
        return self.magnitude is None

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "DoRA" if self.is_dora else "LoRA"

    @property
    def label(self) -> str:
        return f"{self.kind} r={self.rank} scale={self.scale:g}"

    def factored(self) -> LowRank:
        return self

    def tensors(self) -> list[torch.Tensor]:
        found = [self.down, self.up]
        return found if self.magnitude is None else [*found, self.magnitude]

    def materialize(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ΔW (without the DoRA rescaling, which depends on the base weight)."""
        up = self.up.to(device=device, dtype=dtype)
        down = self.down.to(device=device, dtype=dtype)
        return torch.mm(up, down).mul_(self.scale).reshape(self.shape)

    def apply_(self, weight: torch.Tensor, factor: float, reference: torch.Tensor | None) -> torch.Tensor:
        if self.magnitude is not None:
            return self._apply_dora(weight, factor, weight.clone() if reference is None else reference)
        up = self.up.to(weight.device, weight.dtype)
        down = self.down.to(weight.device, weight.dtype)
        weight.view(up.shape[0], down.shape[1]).addmm_(up, down, alpha=factor * self.scale)
        return weight

    def _apply_dora(self, weight: torch.Tensor, factor: float, reference: torch.Tensor) -> torch.Tensor:
        update = self.materialize(weight.device, weight.dtype).mul_(factor)
        dims = tuple(d for d in range(weight.dim()) if d != self.magnitude_axis)
        norm = torch.linalg.vector_norm(reference + update, dim=dims, keepdim=True)
        shape = [1] * weight.dim()
        shape[self.magnitude_axis] = -1
        magnitude = self.magnitude.to(weight.device, weight.dtype).reshape(shape)
        return weight.add_(update).mul_(magnitude / norm)

    def remove_(self, weight: torch.Tensor, factor: float) -> torch.Tensor:
        if self.magnitude is not None:
            raise SurgeonError("a DoRA update cannot be unmerged from a merged weight.")
        return self.apply_(weight, -factor, None)

    def unmerge_refusal(self, key: str) -> str | None:
        if self.magnitude is None:
            return None
        return (
            f"{key!r} has a DoRA update, which rescales each row by its magnitude over the norm of the unmerged "
            "weight; the merged file does not keep that norm, so the base cannot be recovered from it"
        )

    def rows(self, start: int, stop: int) -> Delta:
        self._must_add("split")
        # each piece owns its factors: writers store them as tensors of their own
        return LowRank(self.down.clone(), self.up[start:stop].clone(), self.scale, (stop - start, *self.shape[1:]))

    def placed(self, start: int, total: int) -> Delta:
        self._must_add("placed into a fused parameter")
        up = self.up.new_zeros((total, self.rank))
        up[start : start + self.up.shape[0]] = self.up
        return LowRank(self.down, up, self.scale, (total, *self.shape[1:]))

    @classmethod
    def stack(cls, key: str, deltas: list[LowRank]) -> LowRank:
        """Several low-rank deltas on one weight as one, by stacking their ranks: exact, since
        Σ sᵢ·Bᵢ@Aᵢ = [s₁B₁ … sₙBₙ] @ [A₁; …; Aₙ] (the first delta's scale is kept)."""
        if len(deltas) == 1:
            return deltas[0]
        if any(d.is_dora for d in deltas):
            raise SurgeonError(
                f"{key!r} has several DoRA updates, which do not add up to one; merge them into the base first."
            )
        scale = deltas[0].scale
        ups = [d.up if d.scale == scale else (d.up.float() * (d.scale / scale)).to(d.up.dtype) for d in deltas]
        down = torch.cat([d.down for d in deltas])
        return cls(down=down, up=torch.cat(ups, dim=1), scale=scale, shape=deltas[0].shape)


class Dense(Delta):
    """A full ΔW, added as is: stored (``Dense(tensor)``) or computed from a format's own factors
    when it is used (:meth:`lazy`: LoKr's Kronecker product, the base weight an (IA)³ vector
    scales), so that reading such an adapter holds what the file holds and a merge materialises
    one target at a time."""

    kind = "dense"

    def __init__(
        self,
        delta: torch.Tensor | None = None,
        *,
        compute: Callable[[], torch.Tensor] | None = None,
        shape: Iterable[int] = (),
        tensors: Iterable[torch.Tensor] = (),
        reads_base: bool = False,
    ):
        self._stored = delta
        self._compute = compute
        self.shape = _shape(delta.shape) if delta is not None else _shape(shape)
        self._tensors = [delta] if delta is not None else list(tensors)
        self.reads_base = reads_base

    @classmethod
    def lazy(
        cls,
        compute: Callable[[], torch.Tensor],
        shape: Iterable[int],
        tensors: Iterable[torch.Tensor],
        reads_base: bool = False,
    ) -> Dense:
        """A ΔW of ``shape`` computed by ``compute`` when used; ``tensors`` are what the file stores
        for it (counted as its parameters). ``reads_base``: ``compute`` reads the base weight."""
        return cls(compute=compute, shape=shape, tensors=tensors, reads_base=reads_base)

    def __repr__(self) -> str:
        return f"Dense(shape={self.shape}{', lazy' if self._stored is None else ''})"

    @property
    def label(self) -> str:
        return "(IA)³ scaling" if self.reads_base else self.kind

    @property
    def delta(self) -> torch.Tensor:
        """ΔW itself (computed now for a lazy delta)."""
        return self._stored if self._stored is not None else self._compute().reshape(self.shape)

    def tensors(self) -> list[torch.Tensor]:
        return self._tensors

    def materialize(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.delta.to(device=device, dtype=dtype, copy=self._stored is not None)

    def unmerge_refusal(self, key: str) -> str | None:
        if not self.reads_base:
            return None
        return (
            f"{key!r} has an (IA)³ update, which scales the base weight; its ΔW would be computed from the merged "
            "weight instead of the original one, so it cannot be taken back off this way"
        )


@dataclass(frozen=True, eq=False)
class Sparse(Delta):
    """A ΔW that is zero except at ``indices`` (flat, row-major) where it equals ``values``.

    Duplicate indices add up, so that two sparse diffs can be concatenated exactly.
    """

    indices: torch.Tensor
    values: torch.Tensor
    shape: Shape = field(default=())
    kind = "sparse"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _shape(self.shape))
        if (
            self.indices.is_floating_point()
            or self.indices.dtype == torch.bool
            or self.values.dtype not in FACTOR_DTYPES
        ):
            raise SurgeonError(
                f"a sparse delta needs integer indices and float values; got {self.indices.dtype} and "
                f"{self.values.dtype}."
            )
        if self.indices.dim() != 1 or self.values.shape != self.indices.shape:
            raise SurgeonError(
                f"a sparse delta needs 1-D indices and values of one length; got {tuple(self.indices.shape)} "
                f"and {tuple(self.values.shape)}."
            )
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= math.prod(self.shape)):
            raise SurgeonError(f"a sparse delta has indices outside its shape {self.shape}.")

    @classmethod
    def of(cls, delta: Delta) -> Sparse:
        """``delta`` as sparse entries: itself when stored so, else every entry (density 1)."""
        found = delta.sparse_form()
        if found is not None:
            return found
        values = delta.materialize(dtype=delta.stored_dtype).reshape(-1)
        return cls(torch.arange(values.numel()), values, delta.shape)

    @property
    def density(self) -> float:
        return self.indices.numel() / max(1, math.prod(self.shape))

    def sparse_form(self) -> Sparse:
        return self

    def tensors(self) -> list[torch.Tensor]:
        return [self.indices, self.values]

    def materialize(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        flat = torch.zeros(math.prod(self.shape), device=device, dtype=dtype)
        flat.index_add_(
            0, self.indices.to(device=device, dtype=torch.int64), self.values.to(device=device, dtype=dtype)
        )
        return flat.reshape(self.shape)


@dataclass(frozen=True, eq=False)
class Replace(Delta):
    """A new value for the whole parameter (PEFT ``modules_to_save``, a trained bias)."""

    weight: torch.Tensor
    additive = False
    replaces = True
    kind = "replacement"

    @property
    def shape(self) -> Shape:
        return _shape(self.weight.shape)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight]

    def materialize(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The replacement weight itself (not a difference)."""
        return self.weight.to(device=device, dtype=dtype, copy=True)

    def apply_(self, weight: torch.Tensor, factor: float, reference: torch.Tensor | None) -> torch.Tensor:
        return self.materialize(weight.device, weight.dtype)

    def remove_(self, weight: torch.Tensor, factor: float) -> torch.Tensor:
        return self.materialize(weight.device, weight.dtype)

    def rows(self, start: int, stop: int) -> Delta:
        return Replace(self.weight[start:stop])

    def unmerge_refusal(self, key: str) -> str | None:
        return (
            f"{key!r} is replaced whole by the adapter (modules_to_save or a trained bias); the merged file does "
            "not keep the original value"
        )


@dataclass(frozen=True, eq=False)
class AppendRows(Delta):
    """New rows after the last one of a parameter: the virtual tokens of a prompt-tuning adapter
    become vocabulary entries (rows of the input embedding, named ``tokens``), and an untied output
    embedding or output bias grows by as many rows so that the model stays consistent.

    It changes the parameter's shape, which no ΔW does: it fits any parameter whose rows are as
    wide as its own, answers the grown (or, undone, the shrunk) shape, and is taken back off by
    dropping the last rows. A weight other than 1 would scale vectors that are looked up, not added.
    ``derived`` rows follow from another delta's (an untied head's zeros, a tied head's copy of the
    prompt) and are not the adapter's own parameters.
    """

    rows: torch.Tensor
    tokens: tuple[str, ...] = ()
    derived: bool = False
    additive = False
    scalable = False
    kind = "appended rows"

    def __post_init__(self) -> None:
        if self.rows.dtype not in FACTOR_DTYPES or self.rows.dim() < 1 or self.rows.shape[0] < 1:
            raise SurgeonError(
                f"rows to append must be a non-empty float tensor; got {tuple(self.rows.shape)} {self.rows.dtype}."
            )
        if self.tokens and len(self.tokens) != self.rows.shape[0]:
            raise SurgeonError(f"{self.rows.shape[0]} rows to append are named by {len(self.tokens)} tokens.")

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        return _shape(self.rows.shape)

    @property
    def label(self) -> str:
        return f"{self.shape[0]} appended rows" + (" (virtual tokens)" if self.tokens else "")

    @property
    def new_tokens(self) -> tuple[str, ...]:
        return tuple(self.tokens)

    def fits(self, shape: Shape) -> bool:
        return len(shape) == len(self.shape) and tuple(shape[1:]) == self.shape[1:]

    def output_shape(self, shape: Shape, undo: bool = False) -> Shape:
        rows = shape[0] - self.shape[0] if undo else shape[0] + self.shape[0]
        if rows < 1:
            raise SurgeonError(
                f"a parameter of {shape[0]} rows cannot lose the {self.shape[0]} rows a prompt "
                "adapter appended; it is not the merged checkpoint."
            )
        return (rows, *shape[1:])

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.derived else [self.rows]

    def materialize(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The rows themselves (they are appended, not added)."""
        return self.rows.to(device=device, dtype=dtype, copy=True)

    def apply_(self, weight: torch.Tensor, factor: float, reference: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([weight, self.materialize(weight.device, weight.dtype)])

    def remove_(self, weight: torch.Tensor, factor: float) -> torch.Tensor:
        kept = self.output_shape(tuple(weight.shape), undo=True)[0]
        # bf16's round-off at most: other rows are real vocabulary entries, which dropping would lose
        if not torch.allclose(weight[kept:], self.materialize(weight.device, weight.dtype), rtol=1e-2, atol=1e-3):
            raise SurgeonError(
                f"the last {self.shape[0]} rows of a {tuple(weight.shape)} parameter are not the rows the prompt "
                "adapter appended; unmerge it from the checkpoint it was merged into."
            )
        return weight[:kept]


def exact_sum(terms: list[tuple[Delta, float]], shape: Shape) -> Delta:
    """Σ wᵢ·ΔWᵢ of additive deltas kept exactly: sparse entries concatenated (duplicates add) when
    every term is stored sparse, else one dense ΔW in the terms' promoted dtype."""
    sparse = [(d.sparse_form(), w) for d, w in terms]
    if all(s is not None for s, _ in sparse):
        return Sparse(torch.cat([s.indices for s, _ in sparse]), torch.cat([s.values * w for s, w in sparse]), shape)
    dtype = promoted_dtype(d.stored_dtype for d, _ in terms)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    total = sum(d.materialize(dtype=work) * w for d, w in terms)
    return Dense(total.to(dtype))


#: How the base module uses a parameter; writers need it to pick key names and orientation. "MoE expert":
#: one expert's tensor of a parameter transformers stacks (surgeon/experts.py).
MODULE_TYPES = ("linear", "conv1d", "embedding", "conv", "other", "MoE expert")


@dataclass
class Adapter:
    """Deltas keyed by the base checkpoint's parameter names, applied in order per key.

    ``config`` keeps the source format's own configuration so that a round trip through the same
    format loses nothing; ``module_types`` says, per key, which kind of module the parameter
    belongs to (see :data:`MODULE_TYPES`); ``notes`` are the reader's, one sentence each on what
    beside the deltas it left out (an AdapterHub prediction head), reported by merge and convert.
    """

    deltas: dict[str, list[Delta]] = field(default_factory=dict)
    source_format: str = ""
    base_model: str | None = None
    config: dict = field(default_factory=dict)
    module_types: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, delta: Delta, module_type: str = "linear") -> None:
        self.deltas.setdefault(key, []).append(delta)
        self.module_types.setdefault(key, module_type)

    def __len__(self) -> int:
        return len(self.deltas)

    def renamed(self, rename: Callable[[str], str]) -> "Adapter":
        """The same adapter with every key passed through ``rename`` (deltas and module types alike)."""
        return replace(
            self,
            deltas={rename(k): v for k, v in self.deltas.items()},
            module_types={rename(k): v for k, v in self.module_types.items()},
        )

    def translated(self, parts: Callable[[str, Delta], list[tuple[str, Delta]]]) -> "Adapter":
        """The same adapter with every (key, delta) replaced by ``parts(key, delta)``: renamed, or cut
        into several (keys keep their module type)."""
        result = replace(self, deltas={}, module_types={})
        for key, deltas in self.deltas.items():
            for delta in deltas:
                for new_key, new_delta in parts(key, delta):
                    result.add(new_key, new_delta, self.module_types.get(key, "linear"))
        return result

    def __iter__(self):
        return iter(self.deltas.items())

    def items(self):
        return self.deltas.items()

    def low_ranks(self) -> dict[str, LowRank]:
        """Per key, its low-rank deltas as one (stacked when there are several)."""
        found = {k: [d.factored() for d in ds if d.factored() is not None] for k, ds in self.deltas.items()}
        return {k: LowRank.stack(k, lows) for k, lows in found.items() if lows}

    def num_params(self) -> int:
        return sum(d.num_params() for ds in self.deltas.values() for d in ds)

    def num_bytes(self) -> int:
        return sum(d.num_bytes() for ds in self.deltas.values() for d in ds)

    def kinds(self) -> dict[str, int]:
        """How many deltas of each kind (LoRA, DoRA, dense, sparse, replacement) the adapter holds."""
        return dict(Counter(d.kind for ds in self.deltas.values() for d in ds))

    def nonfinite_keys(self) -> list[str]:
        """Keys with a NaN or Inf in any stored tensor."""
        return [key for key, ds in self.deltas.items() if not all(all_finite(t) for d in ds for t in d.tensors())]


def all_finite(tensor: torch.Tensor) -> bool:
    """All values finite, in one pass and no temporary: a sum is NaN or ±Inf whenever an element is.
    A sum in the tensor's own dtype (fp32 accumulation inside, as fast as reading it) settles the
    common case; only when it is not finite, which a large finite sum in fp16 can also be, does an
    fp64 sum (which no float32/bf16/fp16 values can overflow) decide. fp8 has no sum of its own."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.dtype.itemsize > 1 and math.isfinite(float(tensor.sum())):
        return True
    return math.isfinite(float(tensor.sum(dtype=torch.float64)))
