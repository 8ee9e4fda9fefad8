"""LoRA on a stacked MoE expert parameter (experts × m × k), as PEFT's ``ParamWrapper`` stores it
when ``target_parameters`` names a fused expert tensor (transformers 5's ``experts.gate_up_proj``,
``experts.down_proj``): one low-rank pair per expert, ΔW[e] = scale · up[e] @ down[e].

transformers builds such a parameter from one checkpoint tensor per expert (and per half of a
fused gate/up projection), so a merge gives each of those tensors its expert's rows
(:meth:`ExpertLowRank.expert_rows`, a plain :class:`~surgeon.delta.LowRank`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import torch

from surgeon.delta import FACTOR_DTYPES, Adapter, Delta, LowRank, Shape, promoted_dtype
from surgeon.errors import SurgeonError


@dataclass(frozen=True, eq=False)
class ExpertLowRank(Delta):
    """ΔW[e] = scale · up[e] @ down[e]: ``down`` is experts×r×k, ``up`` experts×m×r."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0
    kind = "expert LoRA"

    def __post_init__(self) -> None:
        if any(t.dtype not in FACTOR_DTYPES for t in (self.down, self.up)):
            raise SurgeonError(f"expert LoRA factors are {self.down.dtype}; they must be fp16, bf16, fp32 or fp64.")
        if self.down.dim() != 3 or self.up.dim() != 3 or self.up.shape[::2] != self.down.shape[:2]:
            raise SurgeonError(
                f"expert LoRA factors do not chain: up is {tuple(self.up.shape)} and down is "
                f"{tuple(self.down.shape)}; expected experts×m×r and experts×r×k."
            )
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        return (int(self.up.shape[0]), int(self.up.shape[1]), int(self.down.shape[2]))

    @property
    def rank(self) -> int:
        return int(self.down.shape[1])

    @property
    def label(self) -> str:
        return f"LoRA r={self.rank} scale={self.scale:g} on each of {self.shape[0]} experts"

    def tensors(self) -> list[torch.Tensor]:
        return [self.down, self.up]

    def materialize(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        up, down = self.up.to(device=device, dtype=dtype), self.down.to(device=device, dtype=dtype)
        return torch.bmm(up, down).mul_(self.scale)

    def apply_(self, weight: torch.Tensor, factor: float, reference: torch.Tensor | None) -> torch.Tensor:
        up, down = self.up.to(weight.device, weight.dtype), self.down.to(weight.device, weight.dtype)
        return weight.baddbmm_(up, down, alpha=factor * self.scale)

    def expert_rows(self, expert: int, start: int, stop: int) -> Delta:
        return LowRank(self.down[expert].clone(), self.up[expert, start:stop].clone(), self.scale)


def fuse_experts(pieces: dict[int, list[tuple[int, int, Delta]]], shape: Shape, where: str) -> ExpertLowRank:
    """The deltas on a stacked parameter's checkpoint tensors (expert → its (first row, end row,
    delta) pieces) as one :class:`ExpertLowRank` of ``shape``: per expert, pieces sharing one down
    factor and scale share it (exact), others are laid side by side in rank (exact, as PEFT fuses
    w1 and w3); every expert is zero-padded to the largest rank, and missing pieces are zero."""
    fused = {e: _fuse_expert(found, shape[1], where) for e, found in pieces.items()}
    scale = next(iter(fused.values()))[2]
    rank = max(down.shape[0] for down, _, _ in fused.values())
    down = torch.zeros((shape[0], rank, shape[2]), dtype=torch.float32)
    up = torch.zeros((shape[0], shape[1], rank), dtype=torch.float32)
    for e, (d, u, s) in fused.items():
        down[e, : d.shape[0]] = d
        up[e, :, : d.shape[0]] = u * (s / scale)
    dtype = promoted_dtype(d.stored_dtype for found in pieces.values() for _, _, d in found)
    return ExpertLowRank(down.to(dtype), up.to(dtype), scale)


def gather_experts(adapter: Adapter, stacked: dict[str, tuple[str, int]], where: str) -> tuple[dict, Adapter]:
    """(stacked name → one :class:`ExpertLowRank`) for the adapter's deltas on per-expert tensors that a
    consumer stacks whole (``stacked``: checkpoint key → (stacked name, expert)), and the adapter without
    them. A stack has as many experts as ``stacked`` gives it; experts without a delta are zero."""
    taken = sorted(key for key in adapter.deltas if key in stacked)
    pieces: dict[str, dict[int, list]] = {}
    for key in taken:
        name, expert = stacked[key]
        for delta in adapter.deltas[key]:
            pieces.setdefault(name, {}).setdefault(expert, []).append((0, delta.shape[0], delta))
    counts = Counter(name for name, _ in stacked.values())
    fused = {
        name: fuse_experts(found, (counts[name], *next(iter(found.values()))[0][2].shape), f"{where}: {name}")
        for name, found in pieces.items()
    }
    rest = {k: v for k, v in adapter.deltas.items() if k not in stacked}
    return fused, replace(adapter, deltas=rest, module_types={k: adapter.module_types.get(k, "linear") for k in rest})


def _fuse_expert(found: list[tuple[int, int, Delta]], rows: int, where: str) -> tuple:
    lows = [(start, stop, delta.factored()) for start, stop, delta in found]
    bad = next((d for _, _, d in found if d.factored() is None or d.factored().is_dora), None)
    if bad is not None:
        raise SurgeonError(
            f"{where}: one expert of a stacked MoE parameter has {bad.label}, and stacked experts hold only plain "
            "LoRA (PEFT, mlx-lm, llama.cpp); merge it into the base instead (surgeon merge)."
        )
    first = lows[0][2]
    if all(low.scale == first.scale and torch.equal(low.down, first.down) for _, _, low in lows):
        downs = [first.down]
    else:
        downs = [low.down for _, _, low in lows]
    up = torch.zeros((rows, sum(d.shape[0] for d in downs)), dtype=torch.float32)
    column = 0
    for start, stop, low in lows:
        width = low.rank
        up[start:stop, column : column + width] = low.up.float() * (low.scale / first.scale)
        column += width if len(downs) > 1 else 0
    return torch.cat(downs).float(), up, first.scale
