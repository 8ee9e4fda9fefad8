"""Choosing a rank from a singular-value spectrum: one rule for extract, compose and resize.

By Eckart–Young, truncating to rank r leaves a Frobenius error of √(Σ_{i>r} σᵢ²), so every
criterion is read off the cumulative energy of the spectrum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.errors import SurgeonError


@dataclass(frozen=True)
class RankRule:
    """Exactly one of ``rank``, ``energy`` (fraction of Σσ² kept) or ``max_error`` (relative
    Frobenius error allowed), clamped to [min_rank, max_rank]."""

    rank: int | None = None
    energy: float | None = None
    max_error: float | None = None
    min_rank: int = 1
    max_rank: int | None = None

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.rank, self.energy, self.max_error)]
        if sum(given) != 1:
            raise SurgeonError("give exactly one of rank, energy or max_error.")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise SurgeonError(f"energy must be in (0, 1]; got {self.energy}.")
        if self.max_error is not None and not 0 <= self.max_error < 1:
            raise SurgeonError(f"max_error must be in [0, 1); got {self.max_error}.")
        if self.rank is not None and self.rank < 0:
            raise SurgeonError(f"rank must be 0 or more; got {self.rank}.")
        if self.min_rank < 0:
            raise SurgeonError(f"min_rank must be 0 or more; got {self.min_rank}.")
        if self.max_rank is not None and (self.max_rank < 1 or self.max_rank < self.min_rank):
            raise SurgeonError(
                f"max_rank must be at least 1 and at least min_rank ({self.min_rank}); got {self.max_rank}."
            )

    def choose(self, singular_values: torch.Tensor) -> int:
        """The smallest admissible rank for this spectrum (sorted, descending)."""
        full = int(singular_values.numel())
        if self.rank is not None:
            chosen = self.rank
        else:
            energy = singular_values.double().square()
            total = float(energy.sum())
            if total == 0.0:
                return 0
            kept = torch.cumsum(energy, 0) / total  # kept[r-1] = fraction kept at rank r
            if self.energy is not None:
                target = self.energy
            else:
                target = 1.0 - self.max_error**2  # relative error² = 1 − kept
            # tolerate round-off in the cumulative sum so that a spectrum that meets the target exactly counts
            chosen = int(torch.searchsorted(kept, torch.tensor(target - 1e-12, dtype=kept.dtype)).item()) + 1
            chosen = max(chosen, self.min_rank)
        if self.max_rank is not None:
            chosen = min(chosen, self.max_rank)
        return min(chosen, full)


def tail_error(singular_values: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation."""
    energy = singular_values.double().square()
    total = float(energy.sum())
    return float(energy[rank:].sum() / total) ** 0.5 if total else 0.0
