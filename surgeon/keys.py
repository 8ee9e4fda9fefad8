"""Matching an adapter's target names to the keys of the checkpoint it is applied to.

Adapters name parameters by their path inside the model class that trained them, which can
differ from the checkpoint's keys by a leading component (``bert.`` in a BertForMaskedLM file,
none in a BertModel one); transformers bridges that with its ``base_model_prefix``, and so do we:
one consistent prefix is added or removed, never a guess per key.
"""

from __future__ import annotations

import difflib
import re
import zlib
from typing import Collection

import torch

from surgeon.delta import Adapter
from surgeon.errors import SurgeonError
from surgeon.model_names import model_names


def _prefix_shift(missing: list[str], base_keys: Collection[str]) -> tuple[str, str] | None:
    """A (remove, add) prefix pair that maps every missing key onto a base key, if there is one:
    a prefix added, one removed, or one leading component swapped for another
    (``unet.layers.0…`` → ``model.layers.0…``, a component named differently in the base)."""
    probe = missing[0]
    candidates: set[tuple[str, str]] = set()
    for key in base_keys:
        if key.endswith("." + probe):
            candidates.add(("", key[: -len(probe)]))
    parts = probe.split(".")
    for cut in range(1, len(parts)):
        if ".".join(parts[cut:]) in base_keys:
            candidates.add((".".join(parts[:cut]) + ".", ""))
    rest = ".".join(parts[1:])
    for key in base_keys:
        if key.endswith("." + rest) and key.count(".") == rest.count(".") + 1:
            candidates.add((parts[0] + ".", key[: -len(rest)]))
    for remove, add in sorted(candidates, key=lambda c: (len(c[0]) + len(c[1]), c)):
        if all(k.startswith(remove) and add + k[len(remove) :] in base_keys for k in missing):
            return remove, add
    return None


def bind_to_base(adapter: Adapter, base_keys: Collection[str], where: str, checkpoint=None) -> Adapter:
    """The adapter with every key renamed to the base checkpoint's own, or an error naming the
    first key that matches nothing and the closest base keys. Keys named the way the model class
    of ``checkpoint`` (a :class:`surgeon.checkpoint.Checkpoint`) names its parameters, as PEFT names
    them, are translated with transformers' conversion table (:mod:`surgeon.model_names`)."""
    base_keys = set(base_keys)
    missing = [k for k in adapter.deltas if k not in base_keys]
    if not missing:
        return adapter
    names = model_names(checkpoint) if checkpoint is not None else None
    known = base_keys | (names.model_keys if names is not None else set())
    unknown = [k for k in missing if k not in known]
    shift = _prefix_shift(unknown, known) if unknown else ("", "")
    if shift is None:
        raise _unmatched(unknown, base_keys, where)
    remove, add = shift

    def parts(key: str, delta) -> list:
        if key not in known:
            key = add + key[len(remove) :]
        if names is None or key in base_keys:
            return [(key, delta)]
        return names.checkpoint_parts(key, delta, where)

    return adapter.translated(parts)


def base_key_of(base, key: str) -> str | None:
    """The base's name for one adapter ``key``, for a reader that needs the base weight itself ((IA)³
    scales it): ``key``, or the one that differs by a leading component, as :func:`bind_to_base` will
    shift it; None without a base or a match."""
    if base is None:
        return None
    if key in base:
        return key
    longer = [k for k in base.keys() if k.endswith("." + key)]
    if len(longer) == 1:
        return longer[0]
    parts = key.split(".")
    return next((".".join(parts[cut:]) for cut in range(1, len(parts)) if ".".join(parts[cut:]) in base), None)


def _unmatched(missing: list[str], base_keys: set[str], where: str) -> SurgeonError:
    key = missing[0]
    close = difflib.get_close_matches(key, list(base_keys), n=3, cutoff=0.5)
    hint = f" Closest base keys: {', '.join(close)}." if close else ""
    if key.endswith("lm_head.weight"):
        hint += " A base with tied embeddings stores no lm_head; untie it or target the embedding."
    return SurgeonError(
        f"{where}: the adapter targets {key!r}, which the base checkpoint does not have "
        f"({len(missing)} such keys).{hint}"
    )


def check_shapes(adapter: Adapter, shape_of, where: str) -> None:
    """Every delta must fit its base parameter (a ΔW: the same shape), checked before anything is written."""
    for key, deltas in adapter.items():
        expected = tuple(shape_of(key))
        for delta in deltas:
            if not delta.fits(expected):
                raise SurgeonError(
                    f"{where}: the delta for {key!r} has shape {tuple(delta.shape)} but the base parameter is "
                    f"{expected}; the adapter was made for a different model."
                )


_EMBEDDING_NAME = re.compile(r"embed|^wte$|^wpe$|^shared$")


def embedding_name(module: str) -> bool:
    """Whether a module's own name says it is an embedding (``embed_tokens``, ``word_embeddings``,
    GPT-2's ``wte``/``wpe``, T5's ``shared``): the one rule used where the model class is not at hand."""
    return bool(_EMBEDDING_NAME.search(module.rsplit(".", 1)[-1]))


def key_generator(seed: int, key: str) -> torch.Generator:
    """A CPU random generator for one tensor, seeded from ``seed`` and its key: what is drawn for a
    key does not depend on which other keys are processed, nor in which order (threads, subsets),
    nor on the device the result is computed on."""
    generator = torch.Generator()
    generator.manual_seed((seed * 0x9E3779B1 + zlib.crc32(key.encode())) % 2**63)
    return generator
