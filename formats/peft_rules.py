"""PEFT's rules for adapter names, ranks and scales, apart from the tensors: what the reader
applies to the weights and what ``inspect`` reads off a header alone, without torch."""

from __future__ import annotations

import math
import re
from pathlib import Path

from surgeon.errors import SurgeonError

PREFIX = "base_model.model."

# Options whose effect on the weights is not a plain (Do)LoRA delta.
UNSUPPORTED = {
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA (aLoRA), which applies only after its invocation tokens",
    "use_qalora": "QALoRA",
    "arrow_config": "Arrow routing",
    "use_bdlora": "block-diagonal LoRA",
}

# Options the reader handles but a header alone cannot describe: LoRA on bare parameters is laid out
# by the base model's class (formats/peft_params.py).
BY_MODEL = {"target_parameters": "LoRA on bare parameters"}

LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?P<rest>(\.weight|\.bias)?)$"
)


def pattern_key(patterns: dict, module: str) -> str | None:
    """The entry of a rank/alpha pattern that applies to ``module``, by PEFT's own rule: the first
    key that matches a dotted suffix of the module path, as a regex."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_rank_alpha(config: dict, module: str, alpha_field: str = "lora_alpha") -> tuple[int, float]:
    """r and alpha of one module; LoHa and LoKr configs call alpha ``alpha``."""
    rank_key = pattern_key(config.get("rank_pattern") or {}, module)
    alpha_key = pattern_key(config.get("alpha_pattern") or {}, module)
    rank = config["rank_pattern"][rank_key] if rank_key is not None else config.get("r", 8)
    alpha = config["alpha_pattern"][alpha_key] if alpha_key is not None else config.get(alpha_field, 8)
    return int(rank), float(alpha)


def scale_of(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def targeted(targets: str | list[str], module: str) -> bool:
    """Whether PEFT wraps ``module`` given ``target_modules``: a regex matches the whole module path,
    a list entry its name or a dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def check_modules_match(config: dict, modules: dict[str, dict], where: Path) -> None:
    """What PEFT would load: only modules that ``target_modules`` names get LoRA layers (the other
    factors are dropped as unexpected keys), and with ``use_dora`` every one needs its magnitude."""
    targets = config.get("target_modules")
    if modules and targets and targets != "all-linear" and not any(targeted(targets, m) for m in modules):
        raise SurgeonError(
            f"{where}: target_modules {targets!r} matches none of the adapter's modules (such as "
            f"{next(iter(modules))!r}), so PEFT would load none of its weights; fix target_modules."
        )
    dora = bool(config.get("use_dora"))
    wrong = next((m for m, parts in modules.items() if ("lora_magnitude_vector" in parts) != dora), None)
    if wrong is not None:
        has = "has" if not dora else "lacks"
        raise SurgeonError(
            f"{where}: use_dora is {str(dora).lower()} but {wrong!r} {has} a lora_magnitude_vector; "
            "the config does not belong to these weights."
        )


def factor_rank(file: Path, module: str, a_shape: tuple, b_shape: tuple, magnitude_shape: tuple | None = None) -> int:
    """The rank of one module's LoRA factors, checked from their shapes alone (the reader and
    header-only ``inspect`` both ask here): lora_B's second axis is the rank too, a convolutional
    lora_B is 1×1, and a DoRA magnitude has one entry per output (lora_B's first axis)."""
    rank = int(a_shape[0])
    if b_shape[1] != rank:
        raise SurgeonError(
            f"{file}: {module!r} has factors of shapes {tuple(a_shape)} and {tuple(b_shape)}, "
            "whose ranks differ; the file is damaged."
        )
    if len(a_shape) > 2 and any(d != 1 for d in b_shape[2:]):
        raise SurgeonError(
            f"{file}: {module!r} has a convolutional lora_B with a kernel {tuple(b_shape[2:])}; only 1×1 is supported."
        )
    if magnitude_shape is not None and math.prod(magnitude_shape) != b_shape[0]:
        raise SurgeonError(
            f"{file}: in {module!r}, the DoRA magnitude has shape {tuple(magnitude_shape)}, but lora_B "
            f"has {b_shape[0]} outputs; the file is damaged."
        )
    return rank
