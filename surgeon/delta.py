"""The canonical in-memory model of a delta: the hub every format and operation goes through.

A delta targets one parameter of the base checkpoint, named by the base's own key and given in
the base parameter's own layout (a GPT-2 ``Conv1D`` weight is in×out, an embedding is
num_embeddings×dim). Formats translate their orientations into this one on read and back on
write, so operations never need to know where a delta came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Union

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


@dataclass(frozen=True, eq=False)
class LowRank:
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
            raise SurgeonError(f"a low-rank factor is {bad.dtype}; factors and magnitudes must be fp16, bf16, fp32 or fp64.")
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
            raise SurgeonError(f"a low-rank delta has the scale {self.scale} (alpha/r); a scale must be a finite number "
                               "within fp32's range.")
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

    def tensors(self) -> list[torch.Tensor]:
        found = [self.down, self.up]
        return found if self.magnitude is None else [*found, self.magnitude]

    def materialize(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ΔW (without the DoRA rescaling, which depends on the base weight)."""
        up = self.up.to(device=device, dtype=dtype)
        down = self.down.to(device=device, dtype=dtype)
        return torch.mm(up, down).mul_(self.scale).reshape(self.shape)


@dataclass(frozen=True, eq=False)
class Dense:
    """A full ΔW, added as is."""

    delta: torch.Tensor

    @property
    def shape(self) -> Shape:
        return _shape(self.delta.shape)

    def tensors(self) -> list[torch.Tensor]:
        return [self.delta]

    def materialize(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.delta.to(device=device, dtype=dtype, copy=True)


class LazyDense(Dense):
    """A dense ΔW computed only when it is used, from a format's own factors (LoKr's Kronecker
    product, the base weight an (IA)³ vector scales): reading such an adapter holds what the file
    holds, and a merge materialises one target at a time instead of a model's worth up front.

    ``reads_base`` marks a ΔW computed from the base weight itself ((IA)³'s W ⊙ (s − 1)): given a
    merged file in its place it comes out wrong, so such a delta cannot be unmerged."""

    def __init__(self, compute: Callable[[], torch.Tensor], shape: Iterable[int], tensors: Iterable[torch.Tensor],
                 reads_base: bool = False):
        object.__setattr__(self, "reads_base", reads_base)
        object.__setattr__(self, "_compute", compute)
        object.__setattr__(self, "_shape", tuple(int(d) for d in shape))
        object.__setattr__(self, "_tensors", list(tensors))

    @property
    def delta(self) -> torch.Tensor:
        return self._compute().reshape(self._shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def tensors(self) -> list[torch.Tensor]:
        return self._tensors

    def materialize(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.delta.to(device=device, dtype=dtype)


@dataclass(frozen=True, eq=False)
class Sparse:
    """A ΔW that is zero except at ``indices`` (flat, row-major) where it equals ``values``.

    Duplicate indices add up, so that two sparse diffs can be concatenated exactly.
    """

    indices: torch.Tensor
    values: torch.Tensor
    shape: Shape = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _shape(self.shape))
        if self.indices.is_floating_point() or self.indices.dtype == torch.bool or self.values.dtype not in FACTOR_DTYPES:
            raise SurgeonError(f"a sparse delta needs integer indices and float values; got {self.indices.dtype} and {self.values.dtype}.")
        if self.indices.dim() != 1 or self.values.shape != self.indices.shape:
            raise SurgeonError(
                f"a sparse delta needs 1-D indices and values of one length; got {tuple(self.indices.shape)} "
                f"and {tuple(self.values.shape)}."
            )
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= math.prod(self.shape)):
            raise SurgeonError(f"a sparse delta has indices outside its shape {self.shape}.")

    @property
    def density(self) -> float:
        return self.indices.numel() / max(1, math.prod(self.shape))

    def tensors(self) -> list[torch.Tensor]:
        return [self.indices, self.values]

    def materialize(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        flat = torch.zeros(math.prod(self.shape), device=device, dtype=dtype)
        flat.index_add_(0, self.indices.to(device=device, dtype=torch.int64), self.values.to(device=device, dtype=dtype))
        return flat.reshape(self.shape)


@dataclass(frozen=True, eq=False)
class Replace:
    """A new value for the whole parameter (PEFT ``modules_to_save``, a trained bias)."""

    weight: torch.Tensor

    @property
    def shape(self) -> Shape:
        return _shape(self.weight.shape)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight]

    def materialize(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The replacement weight itself (not a difference)."""
        return self.weight.to(device=device, dtype=dtype, copy=True)


Delta = Union[LowRank, Dense, Sparse, Replace]

#: How the base module uses a parameter; writers need it to pick key names and orientation.
MODULE_TYPES = ("linear", "conv1d", "embedding", "conv", "other")


@dataclass
class Adapter:
    """Deltas keyed by the base checkpoint's parameter names, applied in order per key.

    ``config`` keeps the source format's own configuration so that a round trip through the same
    format loses nothing; ``module_types`` says, per key, which kind of module the parameter
    belongs to (see :data:`MODULE_TYPES`).
    """

    deltas: dict[str, list[Delta]] = field(default_factory=dict)
    source_format: str = ""
    base_model: str | None = None
    config: dict = field(default_factory=dict)
    module_types: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, delta: Delta, module_type: str = "linear") -> None:
        self.deltas.setdefault(key, []).append(delta)
        self.module_types.setdefault(key, module_type)

    def __len__(self) -> int:
        return len(self.deltas)

    def __iter__(self):
        return iter(self.deltas.items())

    def items(self):
        return self.deltas.items()

    def low_ranks(self) -> dict[str, LowRank]:
        return {k: d for k, ds in self.deltas.items() for d in ds if isinstance(d, LowRank)}

    def num_params(self) -> int:
        return sum(t.numel() for ds in self.deltas.values() for d in ds for t in d.tensors())

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ds in self.deltas.values() for d in ds for t in d.tensors())

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for ds in self.deltas.values():
            for d in ds:
                name = "DoRA" if isinstance(d, LowRank) and d.is_dora else type(d).__name__
                counts[name] = counts.get(name, 0) + 1
        return counts

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
