"""The output of compose, resize and extract: a PEFT LoRA at the output path and, beside it, the
part a LoRA cannot hold as surgeon's sparse diff (in ``<output>/sparse``), which
``surgeon merge BASE OUT OUT/sparse`` applies after the LoRA. A result with no LoRA part is a
sparse diff at the output path itself."""

from __future__ import annotations

from pathlib import Path

from surgeon.delta import Adapter, Sparse
from surgeon.errors import SurgeonError

#: Where a result's sparse part goes when it also has a LoRA part.
SPARSE_SUBDIR = "sparse"


def split_result(adapter: Adapter) -> tuple[Adapter, Adapter]:
    """(the part PEFT LoRA can store, the part only a sparse diff can): factor pairs, LoRA biases and
    replacements go to the first; sparse deltas, and other dense ones as sparse at density 1, to the second.
    Without any factor pair everything goes to the sparse diff, which holds replacements too."""
    low_modules = {k.rpartition(".")[0] for k, ds in adapter.items() for d in ds if d.factored() is not None}
    lora = Adapter(
        source_format=adapter.source_format,
        base_model=adapter.base_model,
        config=adapter.config,
        metadata=adapter.metadata,
    )
    sparse = Adapter(source_format="compose", base_model=adapter.base_model, metadata=adapter.metadata)
    for key, deltas in adapter.items():
        module_type = adapter.module_types.get(key, "linear")
        for delta in deltas:
            lora_bias = key.endswith(".bias") and key.rpartition(".")[0] in low_modules
            if delta.additive and delta.factored() is None and not (lora_bias and delta.sparse_form() is None):
                sparse.add(key, Sparse.of(delta), module_type)
            elif not low_modules:
                sparse.add(key, delta, module_type)
            else:
                lora.add(key, delta, module_type)
    return lora, sparse


def write_parts(lora: Adapter, residual: Adapter, staging: Path, output: Path, base=None) -> list[str]:
    """Write ``lora`` as PEFT at ``staging`` (named for the ``base`` checkpoint's model class where
    given) and ``residual`` as a sparse diff beside it (or in its place when there is no LoRA part);
    returns the paths written, as ``output`` names them."""
    from surgeon.formats import peft, sparse

    written = []
    if len(lora):
        peft.write(lora, staging, base=base)
        written.append(str(output))
    if len(residual):
        sparse.write(residual, staging / SPARSE_SUBDIR if len(lora) else staging)
        written.append(str(output / SPARSE_SUBDIR) if len(lora) else str(output))
    return written


def write_result(adapter: Adapter, staging: Path, output: Path, base=None) -> list[str]:
    """Write a composed adapter split by :func:`split_result` (its PEFT part named for the ``base``
    checkpoint's model class where given); returns what was written."""
    written = write_parts(*split_result(adapter), staging, output, base=base)
    if not written:
        raise SurgeonError("the result is empty (every module cancelled out or was cut to rank 0); nothing written.")
    return written
