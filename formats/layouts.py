"""What each adapter format looks like on disk: its file names, and the test that recognises it.

This module imports neither torch nor any format's reader, so that format detection (``inspect``
of a header, the CLI's choices and errors) answers in a fraction of a second. Readers and
writers import their file names from here: one place says what a format's files are called.
"""

from __future__ import annotations

import re
from pathlib import Path

from surgeon.formats.kohya_names import split_prefix
from surgeon.header import header_or_none

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MLX_CONFIG = "adapter_config.json"
MLX_WEIGHTS = "adapters.safetensors"
#: The adapters library's (AdapterHub's) files: its utils.CONFIG_NAME, WEIGHTS_NAME and SAFE_WEIGHTS_NAME.
ADAPTERHUB_CONFIG = "adapter_config.json"
ADAPTERHUB_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
#: Its prediction head, saved beside an adapter of a model with a head: HEAD_CONFIG_NAME and the weights.
ADAPTERHUB_HEAD = ("head_config.json", "pytorch_model_head.bin", "model_head.safetensors")
SPARSE_CONFIG = "sparse_config.json"
SPARSE_WEIGHTS = "sparse_model.safetensors"
SPARSE_TAG = "surgeon-sparse"
DIFFUSERS_WEIGHTS = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
DIFFUSERS_COMPONENTS = ("unet", "transformer", "prior", "text_encoder", "text_encoder_2", "text_encoder_3")
KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale")
#: Parts that only LyCORIS algorithms have (LoHa, LoKr, (IA)³, full diff, norms).
LYCORIS_PARTS = ("hada_w1_a", "lokr_w1", "lokr_w1_a", "on_input", "diff", "w_norm")
#: LyCORIS algorithms surgeon recognises in order to refuse them by name.
LYCORIS_REFUSED = {
    "a1.weight": "GLoRA, whose update multiplies the base weight by learned factors",
    "oft_blocks": "OFT/BOFT, which rotates the base weight rather than adding to it",
    "lambda_layer": "T-LoRA, whose rank depends on the diffusion timestep",
    "bias_indices": "a sparse residual from lycoris extract_diff, which no LyCORIS loader applies",
}
_DIFFUSERS_HINT = re.compile(r"(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer|_lora\.down|_lora\.up)")


def header_keys(path: Path) -> list[str] | None:
    """The tensor names of a .safetensors file, or None where ``path`` is not a readable one."""
    if not path.is_file() or path.suffix != ".safetensors":
        return None
    header = header_or_none(path)
    return None if header is None else [k for k in header if k != "__metadata__"]


def kohya_style(keys: list[str]) -> bool:
    """Every key is ``<prefixed underscored name>.<part>``."""
    return bool(keys) and all("." in k and split_prefix(k.partition(".")[0]) is not None for k in keys)


def diffusers_file(path: Path) -> Path | None:
    """The weights file of a diffusers LoRA given as a file or as the folder that holds it."""
    if path.is_file():
        return path
    if path.is_dir() and not (path / PEFT_CONFIG).exists():
        return next((path / n for n in DIFFUSERS_WEIGHTS if (path / n).is_file()), None)
    return None


# PEFT, mlx-lm and sparse diffs are recognised by their file names alone: their configs are judged
# when read, so that a broken one is reported as broken instead of the folder passing for another thing.
def is_peft(path: Path) -> bool:
    return path.is_dir() and (path / PEFT_CONFIG).is_file() and any((path / f).is_file() for f in PEFT_WEIGHTS)


def is_mlx(path: Path) -> bool:
    return path.is_dir() and (path / MLX_WEIGHTS).is_file() and (path / MLX_CONFIG).is_file()


def is_adapterhub(path: Path) -> bool:
    weights = any((path / f).is_file() for f in ADAPTERHUB_WEIGHTS)
    return path.is_dir() and (path / ADAPTERHUB_CONFIG).is_file() and weights


def is_sparse(path: Path) -> bool:
    return path.is_dir() and (path / SPARSE_CONFIG).is_file()


def _starts_with(path: Path, magic: bytes, offset: int = 0) -> bool:
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(offset + len(magic))[offset:] == magic
    except OSError:
        return False


def is_gguf(path: Path) -> bool:
    return _starts_with(path, b"GGUF")


def is_ort(path: Path) -> bool:
    return _starts_with(path, b"TORT", offset=4)


def is_diffusers(path: Path) -> bool:
    file = diffusers_file(path)
    keys = header_keys(file) if file is not None else None
    return (
        bool(keys)
        and all(k.partition(".")[0] in DIFFUSERS_COMPONENTS for k in keys)
        and any(_DIFFUSERS_HINT.search(k) for k in keys)
    )


def is_lycoris(path: Path) -> bool:
    keys = header_keys(path)
    if not keys or not kohya_style(keys):
        return False
    parts = {k.partition(".")[2] for k in keys}
    return bool(parts & set(LYCORIS_PARTS) or parts & set(LYCORIS_REFUSED)) or any(
        k.startswith("lycoris_") for k in keys
    )


def is_kohya(path: Path) -> bool:
    keys = header_keys(path)
    return (
        bool(keys)
        and kohya_style(keys)
        and any(k.endswith(".lora_down.weight") for k in keys)
        and all(k.partition(".")[2] in KOHYA_PARTS for k in keys)
    )
