"""Float weights quantized as bitsandbytes quantizes them, in plain torch: the other half of
:mod:`surgeon.quantized`.

A QLoRA adapter was trained on ``dequantize(quantize(W))``, not on ``W``: merging it faithfully
needs that exact weight, and writing a bitsandbytes checkpoint needs the quantized parts. Both are
computed here operation for operation as bitsandbytes 0.50 does on CPU (its pure-torch 4-bit
quantizer, its LUT 8-bit blockwise quantizer for double quantization's scales, and
``int8_vectorwise_quant``), so the results are equal bit for bit; the tests hold them to that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from surgeon.errors import SurgeonError
from surgeon.quantized import QuantizedWeight, _table, dequantize

#: bitsandbytes quantizes double quantization's scales in blocks of this many.
NESTED_BLOCKSIZE = 256
_LUT_SIZE = 65536


@dataclass(frozen=True)
class Scheme:
    """One bitsandbytes quantization: what ``BitsAndBytesConfig`` and ``Linear4bit`` choose."""

    kind: str  # "nf4", "fp4" or "int8"
    double_quant: bool = False
    blocksize: int = 64

    @property
    def bits(self) -> int:
        return 8 if self.kind == "int8" else 4


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes.functional.create_dynamic_map(): the signed 8-bit code for the nested scales,
    computed the same way (in float32 tensors) so that its float32 values are equal."""
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10 ** (-6 + i) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@lru_cache(maxsize=1)
def _dynamic_lut() -> tuple[torch.Tensor, torch.Tensor]:
    """The dynamic code and bitsandbytes' CPU lookup table into it: 65536 bins of [-1, 1], each the
    index of the code nearest to the bin's value (the first code whose upper midpoint is not below it)."""
    code = _dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    bins = torch.arange(_LUT_SIZE, dtype=torch.float32)
    values = -1.0 + (2.0 * bins) / (_LUT_SIZE - 1)
    return code, torch.searchsorted(midpoints, values, side="left").to(torch.uint8)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    full = flat.numel() // blocksize * blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)
    if full < flat.numel():
        absmax = torch.cat([absmax, flat[full:].abs().amax().view(1)])
    return absmax


def _quantize_8bit_blockwise(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU ``quantize_blockwise`` of fp32 ``values`` with the dynamic code: codes,
    per-block absmax, and the code itself."""
    code, lut = _dynamic_lut()
    absmax = _blockwise_absmax(values, NESTED_BLOCKSIZE)
    inverse = torch.where(absmax == 0, 0.0, 1.0 / absmax).repeat_interleave(NESTED_BLOCKSIZE)[: values.numel()]
    normed = (values * inverse).clamp_(-1.0, 1.0)
    index = ((normed + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = torch.where(inverse == 0, 0, lut[index]).to(torch.uint8)  # an all-zero block is code 0, not code(0)
    return codes, absmax, code


def _codes_4bit(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int, table: torch.Tensor) -> torch.Tensor:
    """Each value's nearest code, scaled by its block's absmax as bitsandbytes' torch quantizer does
    (multiplied by the reciprocal in whole blocks, divided in the short last one)."""
    full = flat.numel() // blocksize * blocksize
    scaled = flat[:full].view(-1, blocksize) * (1.0 / absmax[: full // blocksize].clamp(min=1e-38)).view(-1, 1)
    scaled = scaled.clamp_(-1, 1).reshape(-1)
    if full < flat.numel():
        scaled = torch.cat([scaled, (flat[full:] / absmax[-1].clamp(min=1e-38)).clamp_(-1, 1)])
    if scaled.numel() % 2:  # the odd last nibble is the code of 0.0
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    order = torch.argsort(table)
    sorted_table = table[order]
    codes = torch.bucketize(scaled, (sorted_table[:-1] + sorted_table[1:]) / 2, out_int32=True).to(torch.uint8)
    if torch.equal(order, torch.arange(16)):  # NF4's table is sorted: its codes are the buckets
        return codes
    return order.to(torch.uint8)[codes.long()]


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, high nibble first, as a (bytes, 1) uint8 column (Params4bit's shape)."""
    return ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)


def quantize_4bit(weight: torch.Tensor, scheme: Scheme) -> tuple[dict[str, torch.Tensor], dict]:
    """The parts bitsandbytes stores for ``weight`` quantized by ``scheme`` (by role: weight,
    absmax, quant_map, nested_absmax, nested_quant_map) and its quant state's JSON."""
    table = _table(scheme.kind)
    flat = weight.reshape(-1).float()
    absmax = _blockwise_absmax(flat, scheme.blocksize)
    parts = {"weight": _pack(_codes_4bit(flat, absmax, scheme.blocksize, table)), "quant_map": table}
    state = {
        "quant_type": scheme.kind,
        "blocksize": scheme.blocksize,
        "dtype": str(weight.dtype).removeprefix("torch."),
        "shape": list(weight.shape),
    }
    if scheme.double_quant:
        offset = absmax.mean()
        parts["absmax"], parts["nested_absmax"], parts["nested_quant_map"] = _quantize_8bit_blockwise(absmax - offset)
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset.item())
    else:
        parts["absmax"] = absmax
    return parts, state


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """LLM.int8's row-wise quantization of ``weight`` (bitsandbytes casts it to fp16 first): the
    int8 weight and each row's absmax (``SCB``)."""
    half = weight.to(torch.float16)
    scb = half.abs().amax(dim=1).float()
    return {"weight": torch.round(half * (127.0 / scb.unsqueeze(-1))).to(torch.int8), "scb": scb}


def state_tensor(state: dict) -> torch.Tensor:
    """The quant state's JSON as the uint8 tensor transformers saves beside the weight."""
    return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)


def quantize(weight: torch.Tensor, scheme: Scheme) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`quantize_4bit` or :func:`quantize_int8` by ``scheme`` (an 8-bit weight has no state)."""
    return (quantize_int8(weight), {}) if scheme.bits == 8 else quantize_4bit(weight, scheme)


def dequantize_parts(
    parts: dict[str, torch.Tensor], state: dict, scheme: Scheme, shape: tuple[int, ...], conv1d: bool = False
) -> torch.Tensor:
    """What bitsandbytes dequantizes :func:`quantize`'s result to: in the quantized weight's dtype
    (fp32 for int8), as the ``shape`` presented (transposed back for a ``conv1d``)."""
    stored = QuantizedWeight(
        "weight",
        scheme.bits,
        {role: role for role in parts},
        state,
        tuple(shape),
        state.get("dtype", "float32"),
        conv1d,
    )
    return dequantize(stored, parts.__getitem__, "in memory")


def roundtrip(weight: torch.Tensor, scheme: Scheme, conv1d: bool = False) -> torch.Tensor:
    """``weight`` as bitsandbytes hands it to a forward pass once it has quantized it by ``scheme``:
    dequantize(quantize(W)). A ``conv1d`` (GPT-2) weight is quantized as the Linear bitsandbytes
    makes of it, transposed."""
    source = weight.t().contiguous() if conv1d else weight
    return dequantize_parts(*quantize(source, scheme), scheme, tuple(weight.shape), conv1d)


def bnb_linear_weights(config: dict, keys: list[str], where: object) -> dict[str, bool]:
    """The weights among ``keys`` that transformers quantizes when it loads this model with
    bitsandbytes, each mapped to whether it is a Conv1D; decided by transformers' own rules
    (``replace_with_bnb_linear``: ``nn.Linear`` and ``Conv1D`` modules outside
    ``get_modules_to_not_convert``), on the model built from ``config`` without weights."""
    try:
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.base import HfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        raise SurgeonError("a quantized base is quantized by transformers' rules; install transformers.") from None
    model = causal_lm(config, where, torch.device("meta"))
    skipped = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    prefix = model.base_model_prefix + "."
    found = {}
    for name, module in model.named_modules():
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skipped):
            key = next((k for k in (f"{name}.weight", f"{name}.weight".removeprefix(prefix)) if k in keys), None)
            if key is not None:
                found[key] = isinstance(module, Conv1D)
    return found


def causal_lm(config: dict, where: object, device: torch.device) -> torch.nn.Module:
    """The causal LM ``config`` describes, built by transformers on ``device`` (on meta: no memory,
    no weights; elsewhere: fp32, randomly initialised)."""
    import transformers

    if not config.get("model_type"):
        raise SurgeonError(
            f"{where}: no config.json with a model_type beside the weights; surgeon needs it to "
            "build the model in transformers (which layers bitsandbytes quantizes, the probe)."
        )
    settings = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its remarks on a config are not surgeon's output
    try:
        built = transformers.AutoConfig.for_model(config["model_type"], **settings)
        with torch.device(device):
            return transformers.AutoModelForCausalLM.from_config(built, dtype=torch.float32)
    except (ValueError, KeyError, TypeError) as error:
        raise SurgeonError(
            f"{where}: transformers cannot build this model from its config.json ({error}); "
            "use a model transformers knows."
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
