"""Kohya-style module names (``lora_unet_down_blocks_0_attentions_0_..._to_q``) and the base
checkpoint's keys, in both directions.

kohya, LyCORIS and the tools around them name a module by its dotted path with every ``.``
turned into ``_``, behind a prefix saying which model of a pipeline it belongs to. Real module
names contain ``_`` themselves (``transformer_blocks``, ``to_q``, ``self_attn``), so the dots
cannot be put back by string rules; like kohya's own ``merge_lora.py`` and ComfyUI, we go the
other way: underscore every module path of the base checkpoint and look the names up. Each
prefix group must land under one consistent component prefix of the base (``unet.``,
``model.diffusion_model.`` or none), and two base modules that underscore to the same name are
refused rather than guessed between.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable

from surgeon.errors import SurgeonError

#: Kohya name prefixes and the diffusers pipeline component each one names. kohya uses
#: ``lora_unet`` for every denoiser (Flux and SD3 transformers too); ``lora_te3`` is T5.
PREFIXES = {
    "lora_unet": "unet",
    "lora_prior_unet": "prior",
    "lora_transformer": "transformer",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
    "lora_te": "text_encoder",
    "lycoris": None,
}
# Longest first, so that ``lora_te1_…`` is not read as ``lora_te`` + ``1_…``.
_BY_LENGTH = sorted(PREFIXES, key=len, reverse=True)

_SHOWN = 5


def split_prefix(stem: str) -> tuple[str, str] | None:
    """(prefix, underscored module path) of a kohya name, or None if it has no known prefix."""
    for prefix in _BY_LENGTH:
        if stem.startswith(prefix + "_"):
            return prefix, stem[len(prefix) + 1 :]
    return None


def _underscored_suffixes(modules: Iterable[str]) -> dict[str, dict[str, list[str]]]:
    """underscored name → {component prefix → modules}: every way a base module can be named
    once the leading components of its path are taken as the pipeline component's prefix."""
    index: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for module in modules:
        cuts = [0] + [i + 1 for i, char in enumerate(module) if char == "."]
        for cut in cuts:
            index[module[cut:].replace(".", "_")][module[:cut]].append(module)
    return index


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def resolve(stems: Iterable[str], base, where: str) -> dict[str, tuple[str, str]]:
    """Each kohya name's (component prefix in the base, base module path): the module path is
    the base key without ``.weight``, the prefix its leading part that the name leaves out.

    Names are matched against the base checkpoint's keys, which is how kohya tools name modules;
    those that match none are then matched against the module names of the model transformers
    builds from the base, where transformers 5 renames them (ViT's ``vit.layers.0.attention.q_proj``
    is the checkpoint's ``vit.encoder.layer.0.attention.attention.query``), and translated back to
    the checkpoint's keys with transformers' own table.

    Raises with every unresolved name when the base is missing, when a name matches nothing,
    when a prefix group would need two different component prefixes, or when a name is
    ambiguous in the base.
    """
    stems = sorted(set(stems))
    unknown = [s for s in stems if split_prefix(s) is None]
    if unknown:
        raise SurgeonError(
            f"{where}: {len(unknown)} module names have no kohya prefix ({', '.join(p + '_' for p in PREFIXES)}): "
            f"{_shown(unknown)}; the file is not a kohya-style adapter."
        )
    if base is None:
        raise SurgeonError(
            f"{where}: kohya-style module names ({_shown(stems)}) turn '.' into '_' and can only be matched to "
            "parameters against the base model's own keys; pass --base with the checkpoint the adapter was trained on."
        )
    resolved, unresolved = _match(stems, _weights(base.keys()), where)
    if unresolved:
        renamed, unresolved = _match_model_names(unresolved, base, where)
        resolved.update(renamed)
    if unresolved:
        raise SurgeonError(
            f"{where}: {len(unresolved)} of {len(stems)} modules match no weight of the base checkpoint {base.path}: "
            f"{_shown(unresolved)}. Pass the base the adapter was trained on (an SDXL LoRA names SGM blocks like "
            "input_blocks, an SD 1.x one diffusers blocks like down_blocks; text-encoder modules need a base that "
            "holds "
            "the text encoder)."
        )
    return resolved


def _weights(keys: Iterable[str]) -> list[str]:
    """The module paths of the ``.weight`` parameters among ``keys``."""
    return [k[: -len(".weight")] for k in keys if k.endswith(".weight")]


def _match(stems: list[str], modules: list[str], where: str) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """(stem → (component prefix, module)) for the stems that match one of ``modules``, and the rest."""
    index = _underscored_suffixes(modules)
    groups: dict[str, list[str]] = defaultdict(list)
    for stem in stems:
        groups[split_prefix(stem)[0]].append(stem)

    resolved: dict[str, tuple[str, str]] = {}
    unresolved: list[str] = []
    for prefix, members in groups.items():
        votes = Counter(p for s in members for p in index.get(split_prefix(s)[1], {}))
        covering = [p for p, n in votes.items() if n == len(members)]
        if len(covering) > 1:
            raise SurgeonError(
                f"{where}: the {prefix}_ modules match the base under several component prefixes "
                f"({', '.join(repr(p) for p in sorted(covering))}); pass a base checkpoint that holds that model only."
            )
        chosen = covering[0] if covering else (votes.most_common(1)[0][0] if votes else None)
        for stem in members:
            found = index.get(split_prefix(stem)[1], {}).get(chosen, []) if chosen is not None else []
            if len(found) > 1:
                raise SurgeonError(
                    f"{where}: {stem!r} fits several base modules ({', '.join(found)}), which the '.'→'_' naming "
                    "cannot "
                    "tell apart."
                )
            if found:
                resolved[stem] = (chosen, found[0])
            else:
                unresolved.append(stem)
    return resolved, unresolved


def _match_model_names(stems: list[str], base, where: str) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """The stems that name modules of the model transformers builds from ``base`` by its own names
    (where they differ from the checkpoint's), each resolved to the checkpoint key it is loaded from."""
    from surgeon.model_names import model_names  # needs transformers: imported only for names the keys miss

    names = model_names(base)
    if names is None:
        return {}, stems
    renamed = _weights(n for n in names.model_keys if names.to_checkpoint.get(n) != n)
    matched, unresolved = _match(stems, renamed, where)
    resolved = {}
    for stem, (_, module) in matched.items():
        key = names.to_checkpoint.get(f"{module}.weight")
        if key is None:
            raise SurgeonError(
                f"{where}: {stem!r} names {module!r}, which transformers builds from part of a checkpoint tensor or "
                f"from several when it builds {names.model_class}; a kohya delta on it cannot be placed, so merge it "
                "with PEFT instead."
            )
        resolved[stem] = ("", key[: -len(".weight")])
    return resolved, unresolved


def component_of(module: str) -> tuple[str, str]:
    """(pipeline component, module path inside it) of a canonical key's module, read from its
    leading component (``unet.``, ``text_encoder_2.``); a bare path is the denoiser's, except a
    bare CLIP text model's (``text_model.``)."""
    from surgeon.formats.layouts import DIFFUSERS_COMPONENTS  # layouts reads kohya names: imported when used

    head, _, rest = module.partition(".")
    if head in DIFFUSERS_COMPONENTS and rest:
        return head, rest
    return ("text_encoder" if head == "text_model" else "unet"), module


def kohya_prefix(component: str | None, components: set[str]) -> str:
    """The kohya prefix for a component: ``lora_te`` for the only text encoder, numbered ones
    beside others."""
    if component in ("unet", "transformer", None):
        return "lora_unet"
    if component == "prior":
        return "lora_prior_unet"
    if component == "text_encoder":
        return "lora_te1" if components & {"text_encoder_2", "text_encoder_3"} else "lora_te"
    return "lora_te" + component[-1]


def recorded(adapter) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The kohya names and (component, local path) pairs a kohya-style reader recorded, so that
    writing back reproduces the names it read."""
    if adapter.source_format not in ("kohya", "lycoris"):
        return {}, {}
    return adapter.config.get("kohya_names", {}), adapter.config.get("components", {})


def components(adapter, modules: Iterable[str]) -> dict[str, tuple[str | None, str]]:
    """(pipeline component, path inside it) for each module of ``adapter``."""
    _, known = recorded(adapter)
    return {m: tuple(known[m]) if m in known else component_of(m) for m in modules}


def kohya_names(adapter, modules: Iterable[str]) -> dict[str, str]:
    """A kohya name for each module: the one it was read with, or one built from its component."""
    modules = list(modules)
    names, _ = recorded(adapter)
    where = components(adapter, modules)
    present = {c for c, _ in where.values()}
    built = {
        m: names.get(m) or f"{kohya_prefix(where[m][0], present)}_{where[m][1].replace('.', '_')}" for m in modules
    }
    clashes = [name for name, n in Counter(built.values()).items() if n > 1]
    if clashes:
        raise SurgeonError(
            f"cannot write kohya names: several modules become {clashes[0]!r} once '.' is turned into '_'."
        )
    return built
