"""Checkpoint surgery for parameter-efficient fine-tuning.

The public surface is small: an :class:`~surgeon.delta.Adapter` maps base-checkpoint keys to
deltas, :mod:`surgeon.formats` reads and writes adapters, :mod:`surgeon.checkpoint` streams
checkpoints, and :mod:`surgeon.ops` holds the operations over them. The delta types are loaded
on first use, so that ``import surgeon`` (and ``surgeon --help``) does not import torch.
"""

from surgeon.errors import SurgeonError

__version__ = "0.1.0"
__all__ = ["Adapter", "Dense", "LowRank", "Replace", "Sparse", "SurgeonError", "__version__"]
_DELTA_TYPES = ("Adapter", "Dense", "LowRank", "Replace", "Sparse")


def __getattr__(name: str):
    if name in _DELTA_TYPES:
        from surgeon import delta

        return getattr(delta, name)
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")
