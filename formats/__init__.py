"""Adapter formats: each module reads its on-disk layout into a :class:`surgeon.delta.Adapter`
and, where it makes sense, writes one back. Nothing converts between two formats directly.

:data:`FORMATS` is the registry: one :class:`Format` per format, in the order detection tries
them (the more specific layout first: LyCORIS files are kohya-named too). An entry says what a
format is and can do without importing its module, which is loaded the first time it reads or
writes; detection (:mod:`surgeon.formats.layouts`) needs no torch.

A format module has ``read(path, base=None) -> Adapter`` and, if writable, ``write(adapter,
staging[, base=...])`` returning notes: one sentence each on what the target could not hold as
it was (scales folded into a factor, ranks zero-padded, metadata dropped). What a format cannot
represent at all (DoRA in GGUF) is refused with a :class:`SurgeonError`, never dropped.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable

from surgeon.errors import SurgeonError
from surgeon.formats import layouts

if TYPE_CHECKING:
    from surgeon.delta import Adapter


#: Suffixes that name a file; an output that is a directory must not carry one.
FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".onnx_adapter", ".json", ".npz")


@dataclass(frozen=True)
class Format:
    """One adapter format: its name, how to recognise it, and what its writer needs."""

    name: str
    description: str
    looks_for: str
    sniff: Callable[[Path], bool]
    writable: bool = False
    writes_file: bool = False  # a single file (adapter.gguf) rather than a directory
    write_needs_base: bool = False  # names or head counts come from the base's config (GGUF)
    write_uses_base: bool = False  # uses the base where given (mlx-lm counts layers from the last)
    needs_base_to_read: bool = False  # names only the base resolves (kohya, LyCORIS)
    file_suffix: str | None = None  # what detection needs a written file to be called (by name, not by magic)

    def check_output(self, output: Path) -> None:
        """Refuse an output name this format cannot be written to, or not recognised by after:
        a file's suffix for a directory format, and a suffix detection needs for a file format."""
        output = Path(output)
        if not self.writes_file and output.suffix in FILE_SUFFIXES:
            raise SurgeonError(
                f"{output} names a {output.suffix} file, but a {self.name} adapter is a directory; "
                f"give a folder such as {output.with_suffix('')}/."
            )
        if self.file_suffix and output.suffix != self.file_suffix:
            raise SurgeonError(
                f"{output}: a {self.name} adapter is a {self.file_suffix} file, and only by that name "
                f"is it recognised; give a name such as {output.with_suffix(self.file_suffix).name}."
            )

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"surgeon.formats.{self.name}")

    def read(self, path: Path, base=None) -> "Adapter":
        return self.module.read(path, base=base)

    def write(self, adapter: "Adapter", staging: Path, base=None) -> list[str]:
        if not self.writable:
            raise SurgeonError(f"surgeon reads {self.name} but does not write it; it writes {', '.join(writers())}.")
        if self.write_needs_base and base is None:
            raise SurgeonError(
                f"writing {self.name} needs the base model's checkpoint directory (config.json beside the weights)."
            )
        if self.write_needs_base or self.write_uses_base:
            return list(self.module.write(adapter, staging, base=base) or [])
        return list(self.module.write(adapter, staging) or [])


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "peft",
            "PEFT LoRA / DoRA / LoHa / LoKr / IA3 / VeRA / soft prompt "
            "(adapter_config.json + adapter_model.safetensors)",
            "a directory with adapter_config.json and adapter_model.safetensors or adapter_model.bin",
            layouts.is_peft,
            writable=True,
            write_uses_base=True,
        ),
        Format(
            "mlx",
            "mlx-lm LoRA / DoRA (adapter_config.json + adapters.safetensors)",
            "a directory with adapter_config.json (with lora_parameters) and adapters.safetensors",
            layouts.is_mlx,
            writable=True,
            write_uses_base=True,
        ),
        Format(
            "gguf",
            "GGUF LoRA adapter for llama.cpp (adapter.gguf)",
            "a file starting with the GGUF magic",
            layouts.is_gguf,
            writable=True,
            writes_file=True,
            write_needs_base=True,
        ),
        Format(
            "ort",
            "ONNX Runtime LoRA adapter (.onnx_adapter)",
            "a file with the ONNX Runtime adapter identifier TORT at byte 4 (.onnx_adapter)",
            layouts.is_ort,
            writable=True,
            writes_file=True,
        ),
        Format(
            "diffusers",
            "diffusers LoRA (pytorch_lora_weights.safetensors, unet./transformer./text_encoder. prefixes)",
            "a .safetensors file (or a directory with pytorch_lora_weights.safetensors) whose keys start with unet., "
            "transformer. or text_encoder. and hold lora_A/lora_B or lora.down/lora.up",
            layouts.is_diffusers,
            writable=True,
            writes_file=True,
            file_suffix=".safetensors",
        ),
        Format(
            "lycoris",
            "LyCORIS LoHa / LoKr / (IA)³ / full / LoCon (one .safetensors, kohya-style names)",
            "a .safetensors file with kohya-style names and hada_w1_a, lokr_w1(_a), diff, w_norm or on_input parts "
            "(or lycoris_ names)",
            layouts.is_lycoris,
            needs_base_to_read=True,
        ),
        Format(
            "kohya",
            "kohya / sd-scripts LoRA (one .safetensors, lora_unet_… / lora_te_… names)",
            "a .safetensors file with <lora_unet_|lora_te_…name>.lora_down.weight, .lora_up.weight and .alpha keys",
            layouts.is_kohya,
            writable=True,
            writes_file=True,
            write_uses_base=True,
            needs_base_to_read=True,
            file_suffix=".safetensors",
        ),
        Format(
            "adapterhub",
            "AdapterHub / adapters library (adapter_config.json + adapter.safetensors or "
            "pytorch_adapter.bin): LoRA and (IA)³ read as deltas, other methods inspected",
            "a directory with adapter_config.json and adapter.safetensors or pytorch_adapter.bin",
            layouts.is_adapterhub,
        ),
        Format(
            "sparse",
            "surgeon sparse diff (sparse_config.json + sparse_model.safetensors)",
            "a directory with sparse_config.json (format surgeon-sparse) and sparse_model.safetensors",
            layouts.is_sparse,
            writable=True,
        ),
    )
}


def get(name: str) -> Format:
    if name not in FORMATS:
        raise SurgeonError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}.")
    return FORMATS[name]


def detect(path: str | Path) -> Format | None:
    """The format whose layout ``path`` has, or None."""
    path = Path(path)
    return next((f for f in FORMATS.values() if f.sniff(path)), None)


def looked_for() -> str:
    return "; ".join(f"{f.name}: {f.looks_for}" for f in FORMATS.values())


def writers() -> list[str]:
    return [f.name for f in FORMATS.values() if f.writable]


def read_adapter(path: str | Path, format_name: str | None = None, base=None) -> "Adapter":
    """Read an adapter in ``format_name``, or in the format detected from its layout."""
    path = Path(path)
    if not path.exists():
        raise SurgeonError(f"{path}: no such file or directory.")
    found = get(format_name) if format_name else detect(path)
    if found is None:
        from surgeon.recognise import not_an_adapter

        raise not_an_adapter(path)
    if format_name and not found.sniff(path):
        raise SurgeonError(f"{path}: not in the {found.name} format, which is {found.looks_for}.")
    adapter = found.read(path, base=base)
    if not len(adapter):
        raise SurgeonError(f"{path}: the adapter holds no tensors, so there is nothing to apply (PEFT refuses it too).")
    return adapter


def write_adapter(adapter: "Adapter", staging: Path, format_name: str, base=None) -> list[str]:
    """Write ``adapter`` in ``format_name`` to ``staging``; returns the writer's notes."""
    return get(format_name).write(adapter, staging, base=base)
