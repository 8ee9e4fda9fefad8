"""The fields of an ``adapter_config.json`` that decide the math, checked once before any tensor is
read: a wrong type, a non-finite alpha or a pattern that is not a regex is one sentence naming the
file and the field, never a traceback halfway through a merge.

PEFT's LoRA, LoHa, LoKr and VeRA configs (``r``, ``lora_alpha`` or ``alpha``, ``rank_pattern`` and
``alpha_pattern`` keyed by module-name regexes, ``target_modules``, the boolean switches) and
mlx-lm's (``lora_parameters`` with ``rank`` and ``scale``, ``num_layers``) are checked here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from surgeon.checkpoint_files import read_json
from surgeon.errors import SurgeonError

# Fields PEFT reads as booleans; null means the default (false).
_FLAGS = ("use_dora", "use_rslora", "fan_in_fan_out")
# The alpha field of each PEFT type that has one (IA3 has neither r nor alpha; VeRA only r).
ALPHA_FIELDS = {"LORA": "lora_alpha", "LOHA": "alpha", "LOKR": "alpha"}
_RANKED = ("LORA", "LOHA", "LOKR", "VERA")


def load(file: Path) -> dict:
    """The config in ``file``, with ``peft_type`` checked to be a string."""
    config = read_json(file)
    if not isinstance(config.get("peft_type", ""), str):
        raise SurgeonError(f'{file}: peft_type is {config["peft_type"]!r}; it must be a string such as "LORA".')
    return config


def _fail(file: Path, field: str, value, expected: str) -> SurgeonError:
    return SurgeonError(f"{file}: {field} is {value!r}, but it must be {expected}; fix {file.name}.")


def check_rank(value, file: Path, field: str) -> int:
    """A rank: a positive integer (JSON true is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(file, field, value, "a positive integer")
    return value


def check_number(value, file: Path, field: str) -> float:
    """An alpha or a scale: a finite number (NaN and Infinity parse as JSON numbers, and torch
    merges a NaN scale as 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(file, field, value, "a finite number")
    return float(value)


def check_name(value, file: Path, field: str) -> str | None:
    """The base model a producer recorded (``base_model_name_or_path``, AdapterHub's ``model_name``):
    null or a name or path, which compose compares and writers copy on."""
    if value is not None and not isinstance(value, str):
        raise _fail(file, field, value, "the base model's name or path (a string) or null")
    return value


def _check_regex(pattern, file: Path, field: str) -> None:
    if not isinstance(pattern, str):
        raise _fail(file, field, pattern, "a module name or regex (a string)")
    try:
        re.compile(rf"(.*\.)?({pattern})$")
    except re.error as error:
        raise SurgeonError(
            f"{file}: {field} has {pattern!r}, which is not a valid regex ({error}); fix {file.name}."
        ) from None


def _check_pattern(config: dict, file: Path, field: str, check_value) -> None:
    patterns = config.get(field)
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise _fail(file, field, patterns, "an object mapping module patterns to values")
    for pattern, value in patterns.items():
        _check_regex(pattern, file, f"{field} key")
        check_value(value, file, f"{field}[{pattern!r}]")


def check_modules(value, file: Path, field: str, allow_empty: bool) -> None:
    """``target_modules``-like fields: null, one regex, or a list of module names."""
    if value is None:
        return
    if isinstance(value, str):
        _check_regex(value, file, field)
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(file, field, value, "a list of module names or one regex")
    if not value and not allow_empty:
        raise SurgeonError(
            f"{file}: {field} is empty, so the adapter targets nothing (PEFT refuses it too); "
            "list the modules it was trained on."
        )


def check_peft(config: dict, file: Path) -> None:
    """Every field of a PEFT config that surgeon's reading depends on, by the config's peft_type."""
    peft_type = config.get("peft_type", "").upper()
    for flag in _FLAGS:
        if config.get(flag) is not None and not isinstance(config[flag], bool):
            raise _fail(file, flag, config[flag], "true or false")
    if peft_type in _RANKED:
        check_rank(config.get("r", 8), file, "r")
        _check_pattern(config, file, "rank_pattern", check_rank)
    alpha = ALPHA_FIELDS.get(peft_type)
    if alpha is not None:
        check_number(config.get(alpha, 8), file, alpha)
        _check_pattern(config, file, "alpha_pattern", check_number)
    seed = config.get("projection_prng_key", 0)  # VeRA regenerates its projections from it
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise _fail(file, "projection_prng_key", seed, "an integer seed")
    check_name(config.get("base_model_name_or_path"), file, "base_model_name_or_path")
    # PEFT saves target_modules empty where an adapter targets only parameters (target_parameters)
    bare = bool(config.get("target_parameters"))
    check_modules(config.get("target_modules"), file, "target_modules", allow_empty=bare)
    check_modules(config.get("feedforward_modules"), file, "feedforward_modules", allow_empty=True)
    saved = config.get("modules_to_save")
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(m, str) for m in saved)):
        raise _fail(file, "modules_to_save", saved, "a list of module names or null")


def check_mlx(config: dict, file: Path) -> dict:
    """An mlx-lm config's ``lora_parameters`` (rank, scale) and ``num_layers``; returns them."""
    parameters = config.get("lora_parameters")
    if not isinstance(parameters, dict):
        raise _fail(file, "lora_parameters", parameters, "an object with rank and scale")
    if "scale" not in parameters:
        raise SurgeonError(f"{file}: lora_parameters has no scale, which mlx-lm requires; the config is incomplete.")
    check_number(parameters["scale"], file, "lora_parameters.scale")
    if "rank" in parameters:
        check_rank(parameters["rank"], file, "lora_parameters.rank")
    check_modules(parameters.get("keys"), file, "lora_parameters.keys", allow_empty=False)
    layers = config.get("num_layers")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int)):
        raise _fail(file, "num_layers", layers, "an integer (-1 for all blocks)")
    check_name(config.get("model"), file, "model")
    if not isinstance(config.get("fine_tune_type", "lora"), str):
        raise _fail(file, "fine_tune_type", config["fine_tune_type"], '"lora" or "dora"')
    return parameters
