"""Checkpoints written as bitsandbytes checkpoints: transformers loads them with
``from_pretrained`` as it loads a model it quantized and saved itself.

Each weight transformers would quantize (its own rules, :func:`surgeon.quantize.bnb_linear_weights`)
is quantized as it is written, into the tensors ``save_pretrained`` stores for it; the rest is
written as usual. A 4-bit weight's quant state is JSON whose length depends on the values (double
quantization's offset), while a shard's header must be laid out before the first tensor: so the
states go into a small file of their own, written last, and an index lists both.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from surgeon.checkpoint import StreamingWriter, TensorInfo
from surgeon.checkpoint_files import SAFETENSORS_INDEX
from surgeon.errors import SurgeonError
from surgeon.quantize import (
    NESTED_BLOCKSIZE,
    OutOfRange,
    Scheme,
    bnb_linear_weights,
    dequantize_parts,
    quantize,
    shapes_of,
    state_tensor,
)

STATES_FILE = "model-quant-states.safetensors"
#: The output dtypes that mean a bitsandbytes checkpoint.
QUANTIZED_DTYPES = ("nf4", "fp4", "int8")


@dataclass
class QuantizationError:
    """How far re-quantizing moved a weight: relative Frobenius distance (module "total": all)."""

    module: str
    relative: float


class BnbEncoder:
    """Lays out and encodes the tensors of a bitsandbytes checkpoint quantized by ``scheme``."""

    def __init__(self, scheme: Scheme, shapes: dict[str, tuple[int, ...]], config: dict, where: object):
        self.scheme = scheme
        self.targets = bnb_linear_weights(config, shapes, where)
        self.states: dict[str, torch.Tensor] = {}
        self.errors: list[QuantizationError] = []
        self._squares = [0.0, 0.0]

    def layout(self, specs: list[tuple[str, TensorInfo]]) -> list[tuple[str, TensorInfo]]:
        """The stored tensors for the float ``specs``: each target's quantized parts in its place."""
        return [part for key, info in specs for part in self._parts(key, info)]

    def _parts(self, key: str, info: TensorInfo) -> list[tuple[str, TensorInfo]]:
        if key not in self.targets:
            return [(key, info)]
        if self.scheme.bits == 8:
            module = key.removesuffix(".weight")
            rows = info.shape[1] if self.targets[key] else info.shape[0]
            return [
                (key, TensorInfo(self._stored_shape(key, info), torch.int8)),
                (f"{module}.SCB", TensorInfo((rows,), torch.float32)),
                (f"{module}.weight_format", TensorInfo((), torch.uint8)),
            ]
        numel = math.prod(info.shape)
        blocks = -(-numel // self.scheme.blocksize)
        parts = [
            (key, TensorInfo((-(-numel // 2), 1), torch.uint8)),
            (f"{key}.absmax", TensorInfo((blocks,), torch.uint8 if self.scheme.double_quant else torch.float32)),
            (f"{key}.quant_map", TensorInfo((16,), torch.float32)),
        ]
        if self.scheme.double_quant:
            parts += [
                (f"{key}.nested_absmax", TensorInfo((-(-blocks // NESTED_BLOCKSIZE),), torch.float32)),
                (f"{key}.nested_quant_map", TensorInfo((256,), torch.float32)),
            ]
        return parts

    def _stored_shape(self, key: str, info: TensorInfo) -> tuple[int, ...]:
        return tuple(reversed(info.shape)) if self.targets[key] else info.shape

    def encode(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors for ``key``'s float value (its quant state kept for :meth:`finish`)."""
        if key not in self.targets:
            return {key: tensor}
        conv1d = self.targets[key]
        try:
            parts, state = quantize(tensor.t().contiguous() if conv1d else tensor, self.scheme)
        except OutOfRange as error:
            raise SurgeonError(f"{key!r} {error}") from None
        self._measure(key, tensor, dequantize_parts(parts, state, self.scheme, tuple(tensor.shape), conv1d))
        if self.scheme.bits == 8:
            module = key.removesuffix(".weight")
            return {
                key: parts["weight"],
                f"{module}.SCB": parts["scb"],
                f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8),
            }
        self.states[f"{key}.quant_state.bitsandbytes__{self.scheme.kind}"] = state_tensor(state)
        return {key: parts.pop("weight"), **{f"{key}.{role}": value for role, value in parts.items()}}

    def _measure(self, key: str, exact: torch.Tensor, quantized: torch.Tensor) -> None:
        difference = float(torch.sum((quantized.double() - exact.double()) ** 2))
        norm = float(torch.sum(exact.double() ** 2))
        self._squares = [self._squares[0] + difference, self._squares[1] + norm]
        self.errors.append(QuantizationError(key.removesuffix(".weight"), relative_distance(difference, norm)))

    def finish(self, out: Path, writer: StreamingWriter, config: dict, float_dtype: str) -> None:
        """The quant states' file, the index of every file, and a config.json that says how the
        weights are quantized (``float_dtype``: that of the tensors left float, and the compute dtype)."""
        weight_map = dict(writer.weight_map)
        if self.states:
            save_file(self.states, out / STATES_FILE, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(self.states, STATES_FILE))
        if writer.file_names == ["model.safetensors"]:  # with an index beside it transformers reads the index
            (out / "model.safetensors").rename(out / "model-00001-of-00001.safetensors")
            weight_map = {
                k: "model-00001-of-00001.safetensors" if f == "model.safetensors" else f for k, f in weight_map.items()
            }
        total = sum((out / name).stat().st_size for name in set(weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        config = {**config, "quantization_config": self.quantization_config(float_dtype)}
        for name in ("torch_dtype", "dtype"):
            if name in config:
                config[name] = float_dtype
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def quantization_config(self, compute_dtype: str) -> dict:
        """transformers' own BitsAndBytesConfig for this scheme, as ``save_pretrained`` writes it."""
        from transformers import BitsAndBytesConfig

        if self.scheme.bits == 8:
            settings = BitsAndBytesConfig(load_in_8bit=True)
        else:
            settings = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=self.scheme.kind,
                bnb_4bit_use_double_quant=self.scheme.double_quant,
                bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
            )
        return settings.to_dict()

    def total_error(self) -> list[dict]:
        """Each quantized module's error and the total, for the report."""
        total = QuantizationError("total", relative_distance(*self._squares))
        return [asdict(e) for e in [*self.errors, total]]


def relative_distance(difference: float, reference: float) -> float:
    """sqrt(difference / reference) of two squared Frobenius norms; absolute where the reference is 0."""
    return math.sqrt(difference / reference) if reference else math.sqrt(difference)


def encoder_for(dtype: str, base, double_quant: bool = False, blocksize: int = 64) -> BnbEncoder | None:
    """The encoder that writes ``base``'s model quantized when ``dtype`` is nf4, fp4 or int8; None otherwise."""
    if dtype not in QUANTIZED_DTYPES:
        return None
    return BnbEncoder(Scheme(dtype, double_quant, blocksize), shapes_of(base), base.config(), base.path)
