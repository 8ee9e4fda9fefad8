"""The one check that two checkpoints are the same model: extract, task arithmetic and
``unmerge --check`` pair them tensor by tensor, and need the same keys with the same shapes.

Only float parameters count. ``transformers.save_pretrained`` leaves out non-persistent buffers
(BERT's int64 ``embeddings.position_ids``) that other savers keep, so a key that only one side
holds and that is not a float tensor is skipped and listed, never an error; a float parameter
that only one side holds is."""

from __future__ import annotations

from surgeon.checkpoint import Checkpoint
from surgeon.errors import SurgeonError


def paired_keys(first: Checkpoint, second: Checkpoint, purpose: str) -> tuple[list[str], list[str]]:
    """(the keys both hold, in ``first``'s order; the non-float keys only one holds, skipped).

    ``purpose`` ends the error sentence: what the pair is needed for."""
    one_sided = [(k, first, second) for k in first.keys() if k not in second]
    one_sided += [(k, second, first) for k in second.keys() if k not in first]
    floats = [(k, holder, other) for k, holder, other in one_sided if holder.info(k).dtype.is_floating_point]
    if floats:
        key, holder, _ = floats[0]
        raise SurgeonError(
            f"{first.path} and {second.path} hold different tensors: the float parameter {key!r} is only in "
            f"{holder.path} ({len(floats)} such); {purpose}."
        )
    shared = [k for k in first.keys() if k in second]
    for key in shared:
        if first.info(key).shape != second.info(key).shape:
            raise SurgeonError(
                f"{key!r} is {first.info(key).shape} in {first.path} but {second.info(key).shape} in "
                f"{second.path}; {purpose} (same architecture and vocabulary)."
            )
    return shared, [k for k, _, _ in one_sided]


class TiedView:
    """A checkpoint whose output head is tied to its input embedding, also readable under the head's own
    key: ``merge --untie`` stores the head that the base only implies, and the two are still one model."""

    def __init__(self, checkpoint: Checkpoint, heads: dict[str, str]):
        self.checkpoint, self.heads = checkpoint, heads
        self.path = checkpoint.path

    def keys(self) -> list[str]:
        return [*self.checkpoint.keys(), *self.heads]

    def __contains__(self, key: str) -> bool:
        return key in self.heads or key in self.checkpoint

    def info(self, key: str):
        return self.checkpoint.info(self.heads.get(key, key))

    def get(self, key: str):
        return self.checkpoint.get(self.heads.get(key, key))


def with_implied_heads(checkpoint: Checkpoint, other) -> Checkpoint | TiedView:
    """``checkpoint``, with the heads it ties to an embedding named where ``other`` stores them; asks
    transformers about ties only when ``other`` holds a float tensor that ``checkpoint`` lacks."""
    from surgeon.model_names import tied_heads

    lacking = {k for k in other.keys() if k not in checkpoint and other.info(k).dtype.is_floating_point}
    if not lacking:
        return checkpoint
    heads = {head: key for key, head in tied_heads(checkpoint, checkpoint.keys()).items() if head in lacking}
    return TiedView(checkpoint, heads) if heads else checkpoint
