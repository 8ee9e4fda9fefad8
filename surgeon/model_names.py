"""Checkpoint keys ↔ the parameter names of the model transformers builds from them.

transformers 5 renames some models' parameters on load with a conversion table: ViT's
``vit.encoder.layer.0.attention.attention.query`` is ``vit.layers.0.attention.q_proj`` in the model,
Qwen2.5-VL's ``model.layers.…`` is ``model.language_model.layers.…``. PEFT names adapter tensors by
the model's names; surgeon's deltas are keyed by the checkpoint's. This module is the one place that
translates, with transformers' own table for the class named in ``config.json`` (the model is built
on the meta device, and ``get_model_conversion_mapping`` + ``rename_source_key`` are run on every
checkpoint key, as ``from_pretrained`` does), never a copied one. A tensor the table cuts in rows
(``Chunk(dim=0)``: a fused qkv, SwiGLU's ``weights_in``) has its delta cut the same way, and deltas on
the pieces are placed back at their rows. Per-expert tensors stacked into one MoE parameter
(``MergeModulelist(dim=0)``, gate and up first concatenated in rows) are the stacked parameter's
expert rows (:attr:`ModelNames.stacked`): a delta on the stacked parameter is cut into theirs, and
the PEFT writer gathers theirs into one (:func:`named_for_peft`). Other fusions PEFT's loader
converts keep their checkpoint names; any other is refused, never dropped.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from surgeon.errors import SurgeonError, missing_extra


@dataclass(frozen=True)
class ModelNames:
    """Both directions between a checkpoint's keys and its model's parameter names."""

    model_class: str
    to_model: dict[str, str]  # every checkpoint key that becomes one model parameter → that parameter's name
    splits: dict[str, tuple[str, ...]]  # checkpoint key → the parameters transformers cuts its rows into, in order
    fused: dict[str, str]  # checkpoint key → the parameter transformers otherwise fuses or splits it into
    stacked: dict[str, tuple[str, int, int, int]]  # fused key → (stacked expert parameter, expert, first row, end row)
    model_keys: frozenset[str]  # the model's own state_dict names
    modules: frozenset[str]  # the model's module names (what PEFT's target_modules resolve against)
    tied: frozenset[str]  # the output head's weight and the parameters that are that very tensor (tied embeddings)

    @functools.cached_property
    def to_checkpoint(self) -> dict[str, str]:
        return {name: key for key, name in self.to_model.items()}

    @functools.cached_property
    def split_parts(self) -> dict[str, tuple[str, int, int]]:
        """model parameter → (the checkpoint key it is cut from, its place, how many pieces)."""
        return {name: (key, i, len(names)) for key, names in self.splits.items() for i, name in enumerate(names)}

    @functools.cached_property
    def stacked_parts(self) -> dict[str, list[tuple[str, int, int, int]]]:
        """stacked expert parameter → (checkpoint key, expert, first row, end row) of every tensor it is built from."""
        found: dict[str, list] = {}
        for key, (name, expert, start, stop) in sorted(self.stacked.items()):
            found.setdefault(name, []).append((key, expert, start, stop))
        return found

    def model_name(self, key: str, where: str) -> str:
        """The model's name for checkpoint key ``key``; a key transformers fuses or splits is refused."""
        if key in self.fused or key in self.splits:
            raise SurgeonError(
                f"{where}: transformers fuses or splits {key!r} into {self.fused.get(key) or self.splits[key][0]!r} "
                f"when it builds {self.model_class}, so a delta on it has no module of its own in the model; "
                "merge it into the base (surgeon merge) instead."
            )
        return self.to_model.get(key, key)

    def model_parts(self, key: str, delta, where: str) -> list:
        """(model name, delta) for checkpoint key ``key``: one, or one per piece of a row split."""
        pieces = self.splits.get(key)
        if pieces is None:
            return [(self.model_name(key, where), delta)]
        size = -(-delta.shape[0] // len(pieces))  # torch.chunk's piece size
        return [(name, delta.rows(i * size, (i + 1) * size)) for i, name in enumerate(pieces)]

    def checkpoint_parts(self, name: str, delta, where: str) -> list:
        """(checkpoint key, delta) for the model's parameter ``name``: a piece of a row split is
        placed at its rows of the checkpoint tensor it is cut from."""
        if name in self.split_parts:
            key, index, count = self.split_parts[name]
            return [(key, delta.placed(index * delta.shape[0], count * delta.shape[0]))]
        fused = sorted(k for k, target in self.fused.items() if target == name)
        if fused and all(k in self.stacked for k in fused):
            return [(key, delta.expert_rows(e, start, stop)) for key, e, start, stop in self.stacked_parts[name]]
        if fused:
            raise SurgeonError(
                f"{where}: {name!r} is built by transformers from several checkpoint tensors ({', '.join(fused[:3])}), "
                "and surgeon cannot split a delta on it into theirs; merge it with transformers and PEFT instead."
            )
        return [(self.to_checkpoint.get(name, name), delta)]

    def first_name(self, key: str) -> str:
        """The model parameter checkpoint key ``key`` becomes (the first, where it becomes several)."""
        return self.to_model.get(key) or self.fused.get(key) or self.splits[key][0]


def model_names(checkpoint) -> ModelNames | None:
    """The translation for ``checkpoint`` (a :class:`surgeon.checkpoint.Checkpoint`), or None where
    it is no transformers model (no ``architectures`` in a ``config.json``, or a class this
    transformers does not have)."""
    architecture = _architecture(checkpoint)
    if architecture is None:
        return None
    return _names(checkpoint.directory, architecture, tuple(checkpoint.keys()))


def _architecture(checkpoint) -> str | None:
    architectures = checkpoint.config().get("architectures") or []
    if not architectures or checkpoint.directory is None:
        return None
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SurgeonError(
            missing_extra(
                "transformers",
                ["transformers"],
                f"{checkpoint.directory}: config.json names {architectures[0]}, whose parameters transformers may "
                "rename "
                "on load; translating adapter names for it",
            )
        ) from None
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


def fresh_meta_model(checkpoint, where: str) -> torch.nn.Module:
    """A new meta-device model of ``checkpoint``'s class for PEFT to wrap (the cached one stays as built)."""
    architecture = _architecture(checkpoint)
    model = meta_model.__wrapped__(checkpoint.directory, architecture) if architecture else None
    if model is None:
        raise SurgeonError(
            f"{where}: transformers cannot build the base's model class ({architecture or 'none in config.json'}), "
            "which decides how the adapter's parameters are laid out; pass the base it was trained on."
        )
    return model


@functools.lru_cache(maxsize=8)
def _names(directory: Path, architecture: str, keys: tuple[str, ...]) -> ModelNames | None:
    model = meta_model(directory, architecture)
    if model is None:
        return None
    meta = model.state_dict()
    rename = _renamer(model, meta)
    to_model, splits, fused, stacked = {}, {}, {}, {}
    for key in keys:
        name, converter, pattern = rename(key)
        pieces = _row_split(converter, name, meta) if converter is not None else None
        if converter is None:
            to_model[key] = name
        elif pieces:
            splits[key] = pieces
        else:
            fused[key] = name
            place = _stacked_place(converter, pattern, key, meta.get(name))
            if place is not None:
                stacked[key] = (name, *place)
    modules = frozenset(name for name, _ in model.named_modules())
    tied = frozenset(_tied_names(model))
    return ModelNames(architecture, to_model, splits, fused, stacked, frozenset(meta), modules, tied)


def _tied_names(model: torch.nn.Module) -> set[str]:
    """The names of the output head's weight and of every parameter that is that very tensor."""
    try:
        weight = getattr(model.get_output_embeddings(), "weight", None)
        inputs = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return set()
    if weight is None or getattr(inputs, "weight", None) is not weight:
        return set()
    return {name for name, param in model.named_parameters(remove_duplicate=False) if param is weight}


def tied_heads(checkpoint, keys) -> dict[str, str]:
    """{key: the output head's name} for those of ``keys`` whose parameter transformers ties to an output
    head that ``checkpoint`` does not store (so a change to the embedding changes the head too).
    Empty where transformers cannot tell (not installed, or no model class to build), and at once
    where no key is an embedding's: most merges touch none, and need not import transformers."""
    if not keys:
        return {}
    try:
        names = model_names(checkpoint)
    except SurgeonError:  # no transformers: nothing can be said about ties, and nothing needs translating here
        return {}
    if names is None:
        return {}
    stored = {names.first_name(key) for key in checkpoint.keys()}
    heads = sorted(names.tied - stored)
    return {key: heads[0] for key in keys if heads and names.first_name(key) in names.tied}


def _row_split(converter, name: str, meta: dict) -> tuple[str, ...] | None:
    """The parameters a converter cuts one checkpoint tensor's rows into (``Chunk(dim=0)``, equal
    pieces, as in a fused qkv or SwiGLU input); None for any other conversion."""
    from transformers.core_model_loading import Chunk

    operations = converter.operations
    if len(operations) != 1 or not isinstance(operations[0], Chunk) or operations[0].dim != 0:
        return None
    first = converter.target_patterns[0]
    if operations[0].num_shards_attribute or len(converter.source_patterns) != 1 or not name.endswith(first):
        return None
    pieces = tuple(name[: -len(first)] + target for target in converter.target_patterns)
    return pieces if all(piece in meta for piece in pieces) else None


def _stacked_place(converter, pattern: str, key: str, stacked) -> tuple[int, int, int] | None:
    """(expert, first row, end row) of checkpoint tensor ``key`` in the stacked expert parameter
    ``stacked`` (a meta tensor) transformers builds from it: one 2-D tensor per expert stacked
    (``MergeModulelist(dim=0)``), several sources (gate, up) first put one after the other in rows
    (``Concatenate(dim=1)``) in the converter's order. None for any other conversion."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    sources, operations = converter.source_patterns, converter.operations
    expected = [(MergeModulelist, 0)] + ([(Concatenate, 1)] if len(sources) > 1 else [])
    if [(type(op), getattr(op, "dim", None)) for op in operations] != expected:
        return None
    if stacked is None or stacked.dim() != 3 or stacked.shape[1] % len(sources):
        return None
    found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    if found is None or len(found.groups()) != 1 or int(found[1]) >= stacked.shape[0]:
        return None
    rows = stacked.shape[1] // len(sources)
    piece = sources.index(pattern)
    return int(found[1]), piece * rows, (piece + 1) * rows


def _renamer(model: torch.nn.Module, meta: dict):
    """key → (model name, the converter that fuses or splits it if one does, the source pattern it
    matched), the way ``from_pretrained`` renames."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # transformers 4: at most a class-level table of regular expressions
        return _legacy_renamer(getattr(model, "_checkpoint_conversion_mapping", None) or {})
    mapping = get_model_conversion_mapping(model)
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    prefix = model.base_model_prefix

    def rename(key: str):
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if name not in meta and key in meta:  # what from_pretrained does: the key was right as it was
            name, pattern = rename_source_key(key, [], [], prefix, meta)
        return name, by_pattern.get(pattern), pattern

    return rename


def _legacy_renamer(table: dict[str, str]):
    def rename(key: str):
        for pattern, replacement in table.items():
            name, count = re.subn(pattern, replacement, key)
            if count:
                return name, None, None
        return key, None, None

    return rename


def named_for_peft(adapter, checkpoint, where: str):
    """``adapter`` (keyed by ``checkpoint``'s keys) keyed by the names of the model transformers builds
    from ``checkpoint``, as PEFT names them, with that translation (None: not a transformers model).

    The per-expert tensors of a stacked expert parameter become one delta on that parameter (PEFT's
    ``target_parameters``). Another key transformers fuses or splits keeps its checkpoint name where
    PEFT's own loader converts LoRA factors through that fusion; any other is refused."""
    names = model_names(checkpoint) if checkpoint is not None else None
    if names is None:
        return adapter, None
    adapter = _experts_stacked(adapter, names, where)
    fused = {key for key in adapter.deltas if key in names.fused}
    converted = _peft_converts(checkpoint.directory, names.model_class, fused)
    return adapter.translated(
        lambda key, delta: [(key, delta)] if key in converted else names.model_parts(key, delta, where)
    ), names


def _experts_stacked(adapter, names: ModelNames, where: str):
    """``adapter`` with the deltas on per-expert checkpoint tensors gathered into one per stacked parameter."""
    from surgeon.experts import fuse_experts

    stacked = {key for key in adapter.deltas if key in names.stacked}
    if not stacked:
        return adapter
    kept = {key: deltas for key, deltas in adapter.deltas.items() if key not in stacked}
    result = replace(adapter, deltas=kept, module_types={k: adapter.module_types.get(k, "linear") for k in kept})
    gathered: dict[str, dict[int, list]] = {}
    for key in sorted(stacked):
        name, expert, start, stop = names.stacked[key]
        for delta in adapter.deltas[key]:
            gathered.setdefault(name, {}).setdefault(expert, []).append((start, stop, delta))
    for name, pieces in gathered.items():
        parts = names.stacked_parts[name]
        experts, rows = len({e for _, e, _, _ in parts}), max(stop for _, _, _, stop in parts)
        shape = (experts, rows, next(iter(pieces.values()))[0][2].shape[1])
        result.add(name, fuse_experts(pieces, shape, f"{where}: {name}"), "MoE expert")
    return result


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
        return all(
            rename_source_key(f"{module}.{part}.weight", renamings, converters)[1] is not None
            for part in ("lora_A", "lora_B")
        )

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
            "would skip it; the adapter does not belong to this base."
        )
