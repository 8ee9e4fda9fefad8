"""Checkpoint surgery for parameter-efficient fine-tuning.

The public surface is small: an :class:`~surgeon.delta.Adapter` maps base-checkpoint keys to
deltas, :mod:`surgeon.formats` reads and writes adapters, :mod:`surgeon.checkpoint` streams
checkpoints, and :mod:`surgeon.ops` holds the operations over them.
"""

from surgeon.delta import Adapter, Dense, LowRank, Replace, Sparse
from surgeon.errors import SurgeonError

__version__ = "0.1.0"
__all__ = ["Adapter", "Dense", "LowRank", "Replace", "Sparse", "SurgeonError", "__version__"]
