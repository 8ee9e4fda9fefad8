"""ONNX Runtime LoRA adapters (``.onnx_adapter``, onnxruntime ≥ 1.20 ``AdapterFormat``), in the
convention ONNX Runtime GenAI and Olive use.

Parameters are named after the base module with PEFT's suffixes
(``model.layers.0.self_attn.q_proj.lora_A.weight``) and feed the graph's MatMul inputs, so both
are transposed (A in×r, B r×out: y += x @ A @ B) and B carries the scale: the file holds no
scale, no rank and no metadata. Only Linear targets have that form.
"""

from __future__ import annotations

import ctypes
import math
import re
from pathlib import Path

import numpy as np
import torch

from surgeon.delta import Adapter, LowRank
from surgeon.errors import SurgeonError, missing_extra
from surgeon.formats.lora_only import fold, metadata_note, pick_targets

NAME = "ort"

_PARAMETER = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_BFLOAT16 = 16  # ONNX TensorProto.BFLOAT16


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise SurgeonError(missing_extra("onnx", ["onnxruntime>=1.20"], "ONNX Runtime adapters")) from None
    if not hasattr(onnxruntime, "AdapterFormat"):
        raise SurgeonError(
            f"onnxruntime {onnxruntime.__version__} has no AdapterFormat; ONNX Runtime adapters need onnxruntime >= "
            "1.20."
        )
    return onnxruntime


def _to_ort(tensor: torch.Tensor, ort):
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            tensor.view(torch.int16).numpy().view(np.uint16), _BFLOAT16
        )
    return ort.OrtValue.ortvalue_from_numpy(tensor.numpy())


def _from_ort(value) -> torch.Tensor:
    if value.data_type() == "tensor(bfloat16)":  # numpy has no bfloat16: copy the raw bytes
        shape = tuple(value.shape())
        raw = ctypes.string_at(value.data_ptr(), 2 * math.prod(shape))
        return torch.from_numpy(np.frombuffer(raw, dtype=np.int16).copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.array(value.numpy()))


def write(adapter: Adapter, staging: Path) -> list[str]:
    """Write an ``.onnx_adapter`` file that ``onnxruntime.AdapterFormat.read_adapter`` and
    ``LoraAdapter.Load`` take."""
    ort = _ort()
    picked = pick_targets(adapter, NAME, ("linear",))
    targets = picked.targets
    parameters = {}
    for t in targets:
        parameters[f"{t.module}.lora_A.weight"] = _to_ort(t.delta.down.T, ort)
        parameters[f"{t.module}.lora_B.weight"] = _to_ort(fold(t.delta.up, t.delta.scale).T, ort)
    versions = adapter.config if adapter.source_format == NAME else {}
    file = ort.AdapterFormat()
    file.set_adapter_version(int(versions.get("adapter_version", 1)))
    file.set_model_version(int(versions.get("model_version", 1)))
    file.set_parameters(parameters)
    file.export_adapter(str(staging))
    notes = picked.notes + metadata_note(adapter, "an ONNX Runtime adapter")
    if adapter.base_model:
        notes.append(
            f"the base model's name ({adapter.base_model}) is not kept: an ONNX Runtime adapter has no field for it."
        )
    return notes


def read(path: Path, base=None) -> Adapter:
    """An ``.onnx_adapter`` as canonical deltas (scale 1: the scale is in lora_B)."""
    ort = _ort()
    path = Path(path)
    try:
        file = ort.AdapterFormat.read_adapter(str(path))
    except Exception as error:  # onnxruntime raises its own types for a corrupt file
        raise SurgeonError(f"{path}: not a readable ONNX Runtime adapter ({error}).") from error
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in file.get_parameters().items():
        match = _PARAMETER.match(name)
        if match is None:
            raise SurgeonError(
                f"{path}: parameter {name!r} is not a lora_A.weight or lora_B.weight (a quantized adapter?); "
                "surgeon reads float LoRA adapters."
            )
        modules.setdefault(match["module"], {})[match["part"]] = _from_ort(value)
    config = {"adapter_version": file.get_adapter_version(), "model_version": file.get_model_version()}
    adapter = Adapter(source_format=NAME, config=config)
    for module, parts in modules.items():
        if len(parts) != 2:
            raise SurgeonError(f"{path}: {module!r} has only one of lora_A and lora_B; the file is incomplete.")
        a, b = parts["lora_A"], parts["lora_B"]
        adapter.add(f"{module}.weight", LowRank(down=a.T.contiguous(), up=b.T.contiguous(), scale=1.0), "linear")
    return adapter
