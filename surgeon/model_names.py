"""Checkpoint keys ↔ the parameter names of the model transformers builds from them.

transformers 5 renames some models' parameters on load with a conversion table: ViT's
``vit.encoder.layer.0.attention.attention.query`` is ``vit.layers.0.attention.q_proj`` in the model,
Qwen2.5-VL's ``model.layers.…`` is ``model.language_model.layers.…``. PEFT names adapter tensors by
the model's names; surgeon's deltas are keyed by the checkpoint's. This module is the one place that
translates, with transformers' own table for the class named in ``config.json`` (the model is built
on the meta device, and ``get_model_conversion_mapping`` + ``rename_source_key`` are run on every
checkpoint key, as ``from_pretrained`` does), never a copied one. Checkpoint tensors that transformers
fuses or splits (a ``WeightConverter``: per-expert weights stacked into one parameter) have no
one-to-one name, and a delta on one is refused rather than dropped.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from surgeon.errors import SurgeonError, missing_extra


@dataclass(frozen=True)
class ModelNames:
    """Both directions between a checkpoint's keys and its model's parameter names."""

    model_class: str
    to_model: dict[str, str]  # every checkpoint key that becomes one model parameter → that parameter's name
    fused: dict[str, str]  # checkpoint key → the model parameter transformers fuses or splits it into
    model_keys: frozenset[str]  # the model's own state_dict names
    modules: frozenset[str]  # the model's module names (what PEFT's target_modules resolve against)

    @functools.cached_property
    def to_checkpoint(self) -> dict[str, str]:
        return {name: key for key, name in self.to_model.items()}

    def model_name(self, key: str, where: str) -> str:
        """The model's name for checkpoint key ``key``; a key transformers fuses or splits is refused."""
        if key in self.fused:
            raise SurgeonError(
                f"{where}: transformers fuses or splits {key!r} into {self.fused[key]!r} when it builds "
                f"{self.model_class}, so a delta on it has no module of its own in the model; merge it into the "
                "base (surgeon merge) instead.")
        return self.to_model.get(key, key)

    def checkpoint_key(self, name: str, where: str) -> str:
        """The checkpoint key for the model's parameter ``name`` (itself where the two agree)."""
        fused = sorted(k for k, target in self.fused.items() if target == name)
        if fused:
            raise SurgeonError(
                f"{where}: {name!r} is built by transformers from several checkpoint tensors ({', '.join(fused[:3])}), "
                "and surgeon cannot split a delta on it into theirs; merge it with transformers and PEFT instead.")
        return self.to_checkpoint.get(name, name)


def model_names(checkpoint) -> ModelNames | None:
    """The translation for ``checkpoint`` (a :class:`surgeon.checkpoint.Checkpoint`), or None where
    it is no transformers model (no ``architectures`` in a ``config.json``, or a class this
    transformers does not have)."""
    architecture = _architecture(checkpoint)
    if architecture is None:
        return None
    model = meta_model(checkpoint.directory, architecture)
    if model is None:
        return None
    return _names(model, architecture, checkpoint.keys())


def _architecture(checkpoint) -> str | None:
    architectures = checkpoint.config().get("architectures") or []
    if not architectures or checkpoint.directory is None:
        return None
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SurgeonError(missing_extra(
            "transformers", ["transformers"],
            f"{checkpoint.directory}: config.json names {architectures[0]}, whose parameters transformers may rename "
            "on load; translating adapter names for it")) from None
    return architectures[0]


@functools.lru_cache(maxsize=8)
def meta_model(directory: Path, architecture: str) -> torch.nn.Module | None:
    """``architecture`` built from ``directory``'s config on the meta device (no memory, no weights),
    or None where this transformers cannot build it."""
    import transformers

    cls = getattr(transformers, architecture, None)
    if cls is None:
        return None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its config warnings are about the model, not this run
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            return cls._from_config(config)
    except Exception:  # an architecture this transformers cannot build
        return None
    finally:
        transformers.logging.set_verbosity(verbosity)


def _names(model: torch.nn.Module, architecture: str, keys: list[str]) -> ModelNames:
    meta = model.state_dict()
    rename = _renamer(model, meta)
    to_model, fused = {}, {}
    for key in keys:
        name, converted = rename(key)
        (fused if converted else to_model)[key] = name
    modules = frozenset(name for name, _ in model.named_modules())
    return ModelNames(architecture, to_model, fused, frozenset(meta), modules)


def _renamer(model: torch.nn.Module, meta: dict):
    """key → (model name, whether a converter fuses or splits it), the way ``from_pretrained`` renames."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # transformers 4: at most a class-level table of regular expressions
        return _legacy_renamer(getattr(model, "_checkpoint_conversion_mapping", None) or {})
    mapping = get_model_conversion_mapping(model)
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
    prefix = model.base_model_prefix

    def rename(key: str) -> tuple[str, bool]:
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if name not in meta and key in meta:  # what from_pretrained does: the key was right as it was
            name, pattern = rename_source_key(key, [], [], prefix, meta)
        return name, pattern is not None

    return rename


def _legacy_renamer(table: dict[str, str]):
    def rename(key: str) -> tuple[str, bool]:
        for pattern, replacement in table.items():
            name, count = re.subn(pattern, replacement, key)
            if count:
                return name, False
        return key, False

    return rename


def named_for_peft(adapter, checkpoint, where: str):
    """``adapter`` (keyed by ``checkpoint``'s keys) keyed by the names of the model transformers builds
    from ``checkpoint``, as PEFT names them, with that translation (None: not a transformers model).

    A key transformers fuses or splits keeps its checkpoint name where PEFT's own loader converts
    LoRA factors through that fusion (per-expert MoE weights, as in adapters trained before the
    fusion); any other is refused."""
    names = model_names(checkpoint) if checkpoint is not None else None
    if names is None:
        return adapter, None
    fused = {key for key in adapter.deltas if key in names.fused}
    converted = _peft_converts(checkpoint.directory, names.model_class, fused)
    return adapter.renamed(lambda key: key if key in converted else names.model_name(key, where)), names


def _peft_converts(directory: Path, architecture: str, keys: set[str]) -> set[str]:
    """Those of ``keys`` whose LoRA factors PEFT's loader carries through transformers' fusion."""
    if not keys:
        return set()
    try:
        from peft.utils.transformers_weight_conversion import build_peft_weight_mapping
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:
        return set()
    mapping = build_peft_weight_mapping(get_model_conversion_mapping(meta_model(directory, architecture)), "default")
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    renamings = [m for m in mapping if not isinstance(m, WeightConverter)]

    def converts(key: str) -> bool:
        module = "base_model.model." + key.removesuffix(".weight")
        return all(rename_source_key(f"{module}.{part}.weight", renamings, converters)[1] is not None
                   for part in ("lora_A", "lora_B"))

    return {key for key in keys if converts(key)}


def check_modules(names: ModelNames | None, modules, where: str) -> None:
    """Every module an adapter names must be a module of the model that loads it (or a checkpoint
    name PEFT converts, see :func:`named_for_peft`): one that is not would be skipped by the
    consumer (PEFT loads it without a word), so it is refused here."""
    if names is None:
        return
    fused = {key.removesuffix(".weight") for key in names.fused}
    stray = sorted(m for m in modules if m not in names.modules and m not in fused)
    if stray:
        raise SurgeonError(
            f"{where}: {stray[0]!r} is no module of {names.model_class} ({len(stray)} such names), so the consumer "
            "would skip it; the adapter does not belong to this base.")
