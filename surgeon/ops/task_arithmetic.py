"""Task arithmetic on full fine-tuned checkpoints: the compose methods applied to Δᵢ = Tᵢ − B,
written as B + merged Δ, one tensor at a time.

It rides on merge's streaming loop: only the tensor being merged is in memory (the base's and
each fine-tune's copy of it), so a model of any size merges within a few times its largest tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Sequence

import torch

from surgeon.checkpoint import Checkpoint
from surgeon.delta import Dense
from surgeon.errors import SurgeonError
from surgeon.keys import key_generator
from surgeon.ops.compose import DENSE_METHODS, ComposeOptions, combine_dense
from surgeon.ops.merge import MergeReport, one_weight_each, transform_checkpoint
from surgeon.pairing import paired_keys

#: With full deltas cat and linear both mean the plain weighted sum.
SUM_METHODS = ("cat", "linear")


def check_same_layout(base: Checkpoint, tuned: Sequence[Checkpoint]) -> None:
    """Every fine-tune must hold the base's float tensors, with the base's shapes."""
    for checkpoint in tuned:
        paired_keys(base, checkpoint, "a fine-tune must hold the base's tensors to be merged with it")


class _MergedDeltas(Mapping):
    """The plan :func:`transform_checkpoint` takes, computed key by key as it is asked: its keys
    are the base's float tensors, and looking one up reads that tensor from the base and every
    fine-tune and returns their merged delta (empty where no fine-tune changed it), so nothing
    is computed ahead of the writer."""

    def __init__(
        self, base: Checkpoint, tuned: Sequence[Checkpoint], weights: Sequence[float], options: ComposeOptions
    ):
        self.base, self.tuned, self.weights, self.options = base, tuned, weights, options
        self._float_keys = [k for k in base.keys() if base.info(k).dtype.is_floating_point]

    def __iter__(self) -> Iterator[str]:
        return iter(self._float_keys)

    def __len__(self) -> int:
        return len(self._float_keys)

    def __getitem__(self, key: str) -> list[tuple[Dense, float]]:
        if not self.base.info(key).dtype.is_floating_point:
            raise KeyError(key)
        device = self.options.device
        base = self.base.get(key).to(device=device, dtype=torch.float32)
        deltas = [_difference(t.get(key).to(device=device, dtype=torch.float32), base) for t in self.tuned]
        del base
        if not any(bool(d.any()) for d in deltas):
            return []
        if self.options.method in SUM_METHODS:
            merged = sum(d * w for d, w in zip(deltas, self.weights))
        else:
            merged = combine_dense(deltas, self.weights, self.options, key_generator(self.options.seed, key))
        return [(Dense(merged), 1.0)]


def _difference(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """T − B, zero wherever the two are equal: an infinity both hold (a -inf mask buffer) is unchanged, not NaN."""
    return torch.where(tuned == base, 0.0, tuned - base)


def task_arithmetic(
    base: Checkpoint,
    tuned: Sequence[Checkpoint],
    out: Path,
    weights: Sequence[float] | None,
    options: ComposeOptions,
    **write_options,
) -> MergeReport:
    """Write B + combine(Tᵢ − B) into ``out``: a plain weighted sum for cat/linear, PEFT's dense
    rules for ties, dare_* and magnitude_prune. ``write_options`` are transform_checkpoint's
    (dtype, shard_size, on_tensor, metadata)."""
    if options.method not in SUM_METHODS + DENSE_METHODS:
        raise SurgeonError(
            f"method {options.method} needs adapters; with a base use one of {', '.join(SUM_METHODS + DENSE_METHODS)} "
            "(then `surgeon extract` to get a low-rank adapter of the result)."
        )
    if options.rule is not None or options.keep != "lora":
        raise SurgeonError(
            "rank, energy, max_error and the result kind shape an adapter; with a base the output is a full checkpoint."
        )
    weights = one_weight_each(weights, tuned, "fine-tuned checkpoints")
    check_same_layout(base, tuned)
    plan = _MergedDeltas(base, tuned, weights, options)
    return transform_checkpoint(base, plan, out, device=options.device, **write_options)
