"""PEFT's rules for adapter names, ranks and scales, apart from the tensors: what the reader
applies to the weights and what ``inspect`` reads off a header alone, without torch."""

from __future__ import annotations

import math
import re

PREFIX = "base_model.model."

# Options whose effect on the weights is not a plain (Do)LoRA delta.
UNSUPPORTED = {
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA (aLoRA), which applies only after its invocation tokens",
    "use_qalora": "QALoRA",
    "target_parameters": "LoRA on bare nn.Parameter targets",
    "arrow_config": "Arrow routing",
    "use_bdlora": "block-diagonal LoRA",
}

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
