"""Float weights quantized as bitsandbytes quantizes them, in plain torch: the other half of
:mod:`surgeon.quantized`.

A QLoRA adapter was trained on ``dequantize(quantize(W))``, not on ``W``: merging it faithfully
needs that exact weight, and writing a bitsandbytes checkpoint needs the quantized parts. Both are
computed here with the fp32 arithmetic bitsandbytes 0.50 does on CPU (its pure-torch 4-bit
quantizer, its LUT 8-bit blockwise quantizer for double quantization's scales, and
``int8_vectorwise_quant``), so the results are equal bit for bit; the tests hold them to that.
Only the search for each value's nearest 4-bit code differs in method (a table lookup, not
``bucketize``: :class:`_Nearest`), not in result. A QLoRA merge never needs the packed bytes: its
round trip goes from each value's code straight to that code's value times the block's scale,
in cache-sized steps on torch's threads (:func:`surgeon.quantized.in_steps`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Mapping

import torch

from surgeon.architectures import known_module_types
from surgeon.errors import SurgeonError
from surgeon.quantized import STEP, QuantizedWeight, code_table, dequantize, in_steps, nested_scales, on_threads

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


_MAGNITUDE_BITS = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF)}


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Each block's largest magnitude, in fp32. Computed on the bits: with the sign bit cleared, a
    float's bits order as its magnitude does (Inf and NaN above every finite value), and torch's
    integer max is several times faster than its float abs and max over short rows."""
    int_type, mask = _MAGNITUDE_BITS[flat.element_size()]
    bits, full = flat.view(int_type), flat.numel() // blocksize * blocksize
    absmax = torch.empty(-(-flat.numel() // blocksize), dtype=int_type)

    def make_worker() -> Callable[[int, int], None]:
        magnitudes = torch.empty(STEP, dtype=int_type)

        def work(start: int, stop: int) -> None:
            part = torch.bitwise_and(bits[start:stop], mask, out=magnitudes[: stop - start])
            torch.amax(part.view(-1, blocksize), dim=1, out=absmax[start // blocksize : stop // blocksize])

        return work

    in_steps(full, make_worker)
    if full < flat.numel():
        absmax[-1] = (bits[full:] & mask).amax()
    return absmax.view(flat.dtype).float()


def _quantize_8bit_blockwise(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU ``quantize_blockwise`` of fp32 ``values`` with the dynamic code: codes,
    per-block absmax, and the code itself."""
    code, lut = _dynamic_lut()
    absmax = _blockwise_absmax(values, NESTED_BLOCKSIZE)
    blocks = -(-values.numel() // NESTED_BLOCKSIZE)
    padded = torch.zeros(blocks * NESTED_BLOCKSIZE, dtype=torch.float32)
    padded[: values.numel()] = values
    inverse = torch.where(absmax == 0, 0.0, 1.0 / absmax).view(-1, 1)
    if not bool(inverse.isfinite().all()):
        raise OutOfRange(
            f"has block scales within {float(absmax[inverse.view(-1).isinf()].max()):.3g} of their mean, below "
            "fp32's normal range, which double quantization cannot scale (bitsandbytes would index its code "
            "with NaN); quantize it without double quantization."
        )
    normed = (padded.view(blocks, -1) * inverse).clamp_(-1.0, 1.0)
    index = ((normed + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).int()
    found = torch.index_select(lut, 0, index.view(-1)).view(blocks, -1)
    codes = found.masked_fill_(inverse == 0, 0)  # an all-zero block is code 0, not code(0)
    return codes.view(-1)[: values.numel()], absmax, code


@dataclass(frozen=True)
class _Nearest:
    """bitsandbytes' nearest 4-bit code for scaled values s (``bucketize`` on the midpoints of the
    sorted table: the number of midpoints below s) without a search, which costs torch ~50 ns a value.

    The top 16 bits of an fp32 s select an interval of values too narrow to hold two midpoints (the
    tables are built that way and checked). Per 16-bit key k, entry 2k of ``values`` and ``codes``
    is the bucket of the interval's lowest value, entry 2k + 1 the next bucket, and ``bound[2k]``
    the midpoint between them (+inf where the interval holds none). s's entry is 2k + (s > bound):
    exact, because bucketize is monotone in s. Reading 2k off s's bits and the comparison off the
    sign of bound - s (exactly the sign of the exact difference) keeps every step a plain
    elementwise operation but for two lookups."""

    bound: torch.Tensor  # fp32, by 2k
    values: torch.Tensor  # fp32: the bucket's table value, by 2k + above
    codes: torch.Tensor  # uint8: the bucket's 4-bit code (the table's order), by 2k + above


@lru_cache(maxsize=2)
def _nearest_tables(quant_type: str) -> _Nearest:
    table = code_table(quant_type)
    order = torch.argsort(table)  # as bitsandbytes sorts it: NF4 is sorted, FP4 is not
    values = table[order]
    midpoints = (values[:-1] + values[1:]) / 2
    top = torch.arange(1 << 16, dtype=torch.int64) << 16
    top = (top - (top >= 1 << 31) * (1 << 32)).to(torch.int32)  # the same bits as signed int32
    ends = torch.stack([top.view(torch.float32), (top | 0xFFFF).view(torch.float32)])
    lowest, highest = ends.amin(dim=0), ends.amax(dim=0)  # negatives run downwards
    first = torch.bucketize(lowest, midpoints, out_int32=True).long()
    span = torch.bucketize(highest, midpoints, out_int32=True) - first
    if not bool((span[~lowest.isnan()] <= 1).all()):
        raise AssertionError(f"two {quant_type} midpoints share a 16-bit key")
    bound = torch.cat([midpoints, torch.tensor([float("inf")])])[first]
    pairs = torch.stack([first, (first + 1).clamp(max=15)], dim=1).view(-1)
    bounds = torch.stack([bound, torch.full_like(bound, float("inf"))], dim=1).view(-1)
    return _Nearest(bounds, values[pairs], order.to(torch.uint8)[pairs])


def _entries(
    bounds: torch.Tensor, scaled: torch.Tensor, key: torch.Tensor, bound: torch.Tensor, above: torch.Tensor
) -> torch.Tensor:
    """Each scaled value's entry in :class:`_Nearest`'s tables, computed in ``key`` (``bound`` and
    ``above`` are scratch of the same length)."""
    torch.bitwise_right_shift(scaled.view(torch.int32), 15, out=key).bitwise_and_(0x1FFFE)  # 2k
    torch.index_select(bounds, 0, key, out=bound)
    torch.bitwise_right_shift(torch.sub(bound, scaled, out=bound).view(torch.int32), 31, out=above)
    return key.sub_(above)  # above is -1 where s > bound, else 0


def _scaled_steps(
    flat: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, emit: Callable[..., None]
) -> None:
    """Scale ``flat`` by its blocks' absmax as bitsandbytes' torch quantizer does (multiplied by the
    reciprocal in whole blocks, divided in the short last one; clamped to [-1, 1]), find each value's
    entry in :class:`_Nearest`'s tables, and hand each piece to ``emit(start, stop, entries, spare)``
    (spare: an fp32 buffer of the piece's size). Pieces run on torch's threads (:func:`in_steps`)."""
    bounds = _nearest_tables(quant_type).bound
    full = flat.numel() // blocksize * blocksize
    inverse = (1.0 / absmax[: full // blocksize].clamp(min=1e-38)).view(-1, 1)

    def make_worker() -> Callable[[int, int], None]:
        scaled, spare = torch.empty(STEP), torch.empty(STEP)
        key, above = torch.empty(STEP, dtype=torch.int32), torch.empty(STEP, dtype=torch.int32)

        def work(start: int, stop: int) -> None:
            n, rows = stop - start, slice(start // blocksize, stop // blocksize)
            # |value × reciprocal| exceeds 1 by an ulp at most, in the last bucket either way: no clamp needed.
            torch.mul(flat[start:stop].view(-1, blocksize), inverse[rows], out=scaled[:n].view(-1, blocksize))
            emit(start, stop, _entries(bounds, scaled[:n], key[:n], spare[:n], above[:n]), spare[:n])

        return work

    in_steps(full, make_worker)
    if full < flat.numel():
        scaled = (flat[full:].float() / absmax[-1].clamp(min=1e-38)).clamp_(-1, 1)
        n = scaled.numel()
        found = _entries(
            bounds, scaled, torch.empty(n, dtype=torch.int32), torch.empty(n), torch.empty(n, dtype=torch.int32)
        )
        emit(full, flat.numel(), found, torch.empty(n))


def _codes_4bit(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str) -> torch.Tensor:
    """Each value's nearest code (:func:`_scaled_steps`), with the code of 0.0 for an odd last nibble."""
    tables = _nearest_tables(quant_type)
    codes = torch.empty(flat.numel() + flat.numel() % 2, dtype=torch.uint8)
    codes[flat.numel() :] = tables.codes[0]  # key 0 holds +0.0, below the first positive midpoint

    def emit(start: int, stop: int, entries: torch.Tensor, spare: torch.Tensor) -> None:
        torch.index_select(tables.codes, 0, entries, out=codes[start:stop])

    _scaled_steps(flat, absmax, blocksize, quant_type, emit)
    return codes


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, high nibble first, as a (bytes, 1) uint8 column (Params4bit's shape)."""
    return ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)


def _absmax_4bit(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """bitsandbytes' 4-bit absmax: a short last block's is clamped to 1e-38, whole blocks' are not."""
    absmax = _blockwise_absmax(flat, blocksize)
    if flat.numel() % blocksize:
        absmax[-1:].clamp_(min=1e-38)
    return absmax


class OutOfRange(SurgeonError):
    """A weight that bitsandbytes' arithmetic cannot quantize (NaN or Inf in it, or scales that over-
    or underflow fp32): bitsandbytes would store NaN, or index with NaN, for it."""


_NON_FINITE = "holds NaN or Inf, which bitsandbytes quantizes to NaN; fix the checkpoint or leave it unquantized."


def _nested(absmax: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    """Double quantization of the absmax: its parts by role and the state fields it adds."""
    if not bool(absmax.isfinite().all()):
        raise OutOfRange(_NON_FINITE)
    offset = absmax.mean()
    if not bool(offset.isfinite()):
        raise OutOfRange(
            f"has block scales up to {float(absmax.max()):.3g}, whose sum (for double quantization's offset, "
            "their mean) overflows fp32, so bitsandbytes would store NaN scales; quantize it without double "
            "quantization."
        )
    codes, nested_absmax, code = _quantize_8bit_blockwise(absmax - offset)
    parts = {"absmax": codes, "nested_absmax": nested_absmax, "nested_quant_map": code}
    return parts, {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": offset.item()}


@on_threads
def quantize_4bit(weight: torch.Tensor, scheme: Scheme) -> tuple[dict[str, torch.Tensor], dict]:
    """The parts bitsandbytes stores for ``weight`` quantized by ``scheme`` (by role: weight,
    absmax, quant_map, nested_absmax, nested_quant_map) and its quant state's JSON."""
    flat = weight.reshape(-1)
    absmax = _absmax_4bit(flat, scheme.blocksize)
    parts = {
        "weight": _pack(_codes_4bit(flat, absmax, scheme.blocksize, scheme.kind)),
        "quant_map": code_table(scheme.kind),
    }
    state = {
        "quant_type": scheme.kind,
        "blocksize": scheme.blocksize,
        "dtype": str(weight.dtype).removeprefix("torch."),
        "shape": list(weight.shape),
    }
    if scheme.double_quant:
        nested, fields = _nested(absmax)
        parts.update(nested)
        state.update(fields)
    else:
        parts["absmax"] = absmax
    return parts, state


def _scales(absmax: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Each block's scale as dequantizing reads it: the absmax, or double quantization's round trip of it."""
    if not scheme.double_quant:
        return absmax
    nested, fields = _nested(absmax)
    return nested_scales(
        nested["absmax"], nested["nested_quant_map"], nested["nested_absmax"], NESTED_BLOCKSIZE, fields["nested_offset"]
    )


@on_threads
def _roundtrip_4bit(weight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """dequantize(quantize(weight)) without the packed bytes: each bucket's table value times its
    block's scale as dequantizing computes it (fp32, then the weight's dtype)."""
    flat = weight.reshape(-1)
    absmax = _absmax_4bit(flat, scheme.blocksize)
    if not bool(torch.isfinite(absmax).all()):  # bitsandbytes' own arithmetic for Inf and NaN, op for op
        return dequantize_parts(*quantize_4bit(weight, scheme), scheme, tuple(weight.shape))
    scales, out = _scales(absmax, scheme), torch.empty(flat.shape, dtype=weight.dtype)
    rows = _lookup_rows(flat, absmax, scheme.blocksize)
    if rows is None:
        _computed(flat, absmax, scales, scheme, out)
    else:
        _looked_up(flat, rows, scales, scheme, out)
    return out.view(weight.shape)


def _computed(
    flat: torch.Tensor, absmax: torch.Tensor, scales: torch.Tensor, scheme: Scheme, out: torch.Tensor
) -> None:
    """The round trip into ``out``, each value scaled and its bucket found (:func:`_scaled_steps`)."""
    values, bs = _nearest_tables(scheme.kind).values, scheme.blocksize

    def emit(start: int, stop: int, entries: torch.Tensor, spare: torch.Tensor) -> None:
        rows = slice(start // bs, -(-stop // bs))
        torch.index_select(values, 0, entries, out=spare)
        torch.mul(
            spare.view(-1, min(bs, stop - start)),
            scales[rows].view(-1, 1),
            out=out[start:stop].view(-1, min(bs, stop - start)),
        )

    _scaled_steps(flat, absmax, bs, scheme.kind, emit)


# The bf16 lookup. A bf16 weight w and its block's absmax a differ in exponent by d (|w| <= a), and
# bitsandbytes' scaled value fl(w * fl(1/a)) depends only on w's sign and 7 mantissa bits, a's 7
# mantissa bits and d: scaling both by powers of two changes no rounding while every value stays
# normal. Past a gap of _EXACT_GAPS binades every scaled value lands in the bucket of zero. So one
# table, a row per absmax mantissa, holds every bucket value: row m's column _MIDDLE - 128 d + w's
# mantissa (less 32768 for a negative w) is the value, which is the block's row offset
# (m * _ROW - 128 * a's exponent + _MIDDLE) plus w's bits read as int16. One add, one lookup and the
# scale's multiply per value replace scaling, two lookups and the comparisons between them.
_MIDDLE, _EXACT_GAPS = 1 << 16, 32
_ROW = _MIDDLE + 128
_EXPONENTS = (_EXACT_GAPS + 1, 250)  # the absmax exponents (bf16 bits) for which every step above is exact


@lru_cache(maxsize=2)
def _bf16_lookup(quant_type: str) -> torch.Tensor:
    """Every bucket value by (absmax mantissa, exponent gap, weight mantissa, sign), laid out for
    :func:`_lookup_rows`; the scaled values computed as bitsandbytes computes them, a in [1, 2)."""
    absmax = ((127 << 7) | torch.arange(128, dtype=torch.int32)).to(torch.int16).view(torch.bfloat16).float()
    inverse = (1.0 / absmax).view(128, 1, 1)
    gaps, mantissas = torch.arange(_EXACT_GAPS, dtype=torch.int32).view(-1, 1), torch.arange(128, dtype=torch.int32)
    table, nearest = torch.empty(128, _ROW), _nearest_tables(quant_type)
    for sign, middle in ((0, _MIDDLE), (1, _MIDDLE - 32768)):
        bits = ((sign << 15) | ((127 - gaps) << 7) | mantissas) - (sign << 16)  # as int16 holds it
        scaled = (bits.to(torch.int16).view(torch.bfloat16).float() * inverse).reshape(-1)
        found = [torch.empty(scaled.numel(), dtype=d) for d in (torch.int32, torch.float32, torch.int32)]
        values = nearest.values[_entries(nearest.bound, scaled, *found).long()].view(128, _EXACT_GAPS, 128)
        widest = values[:, -1]  # every wider gap falls in the same bucket as this one
        if not bool((widest.view(torch.int32) == widest.view(torch.int32)[0, 0]).all()):
            raise AssertionError(f"{quant_type}: a gap of {_EXACT_GAPS} binades is not always the bucket of zero")
        table[:, middle - 255 * 128 : middle - (_EXACT_GAPS - 1) * 128] = widest[0, 0]
        table[:, middle - (_EXACT_GAPS - 1) * 128 : middle + 128] = values.flip(1).reshape(128, -1)
    return table.view(-1)


def _lookup_rows(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor | None:
    """Each block's row offset into :func:`_bf16_lookup`, or None where the lookup does not apply
    (not bf16, a short last block, or a nonzero absmax so small or large that a value could leave the
    normals)."""
    if flat.dtype != torch.bfloat16 or flat.numel() % blocksize:
        return None
    bits = absmax.to(torch.bfloat16).view(torch.int16).int()
    bits.masked_fill_(bits == 0, 127 << 7)  # an all-zero block's ±0s land in the bucket of zero under any row
    exponent = bits >> 7
    low, high = _EXPONENTS
    if not bool(((exponent >= low) & (exponent <= high)).all()):
        return None
    return (bits & 127) * _ROW + _MIDDLE - (exponent << 7)


def _looked_up(flat: torch.Tensor, rows: torch.Tensor, scales: torch.Tensor, scheme: Scheme, out: torch.Tensor) -> None:
    """The round trip into ``out`` through :func:`_bf16_lookup`, in steps on torch's threads."""
    table, bs = _bf16_lookup(scheme.kind), scheme.blocksize
    bits, rows, scales = flat.view(torch.int16), rows.view(-1, 1), scales.view(-1, 1)

    def make_worker() -> Callable[[int, int], None]:
        index, values = torch.empty(STEP, dtype=torch.int32), torch.empty(STEP)

        def work(start: int, stop: int) -> None:
            n, blocks = stop - start, slice(start // bs, stop // bs)
            torch.add(bits[start:stop].view(-1, bs), rows[blocks], out=index[:n].view(-1, bs))
            torch.index_select(table, 0, index[:n], out=values[:n])
            torch.mul(values[:n].view(-1, bs), scales[blocks], out=out[start:stop].view(-1, bs))

        return work

    in_steps(flat.numel(), make_worker)


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """LLM.int8's row-wise quantization of ``weight`` (bitsandbytes casts it to fp16 first): the
    int8 weight and each row's absmax (``SCB``)."""
    half = weight.to(torch.float16)
    scb = half.abs().amax(dim=1).float()
    if not bool(scb.isfinite().all()):  # a row's amax is NaN or Inf where the row holds one, or overflows fp16
        if not bool(weight.isfinite().all()):
            raise OutOfRange(_NON_FINITE)
        raise OutOfRange(
            f"has values up to {float(weight.abs().max()):.3g}, beyond fp16's range, which LLM.int8 quantizes "
            "through (bitsandbytes would store NaN); write it as bf16, nf4 or fp4."
        )
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
    if scheme.bits == 8:
        return dequantize_parts(*quantize(source, scheme), scheme, tuple(weight.shape), conv1d)
    result = _roundtrip_4bit(source, scheme)
    return result.t().contiguous() if conv1d else result


def shapes_of(checkpoint) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in ``checkpoint`` (anything with ``keys`` and ``info``), by key."""
    return {key: tuple(checkpoint.info(key).shape) for key in checkpoint.keys()}


def bnb_linear_weights(config: dict, shapes: Mapping[str, tuple[int, ...]], where: object) -> dict[str, bool]:
    """The weights among ``shapes``' keys that transformers quantizes when it loads this model with
    bitsandbytes, each mapped to whether it is a Conv1D; decided by transformers' own rules
    (``replace_with_bnb_linear``: ``nn.Linear`` and ``Conv1D`` modules outside
    ``get_modules_to_not_convert``). In the architectures whose layout surgeon knows
    (:mod:`surgeon.architectures`) those rules name every Linear but the output embedding (tied
    weights, the last parameter and the output head are all ``lm_head`` or the input embedding, and
    they keep no module in fp32), which the names tell without transformers' seconds of imports;
    tests/test_qlora.py holds the two answers equal. Any other model is built without weights."""
    known = known_module_types(config, shapes)
    if known is not None:
        types, embeddings, _, _ = known
        return {k: False for k, kind in types.items() if kind == "linear" and k not in embeddings}
    return _built_linear_weights(config, list(shapes), where)


def _built_linear_weights(config: dict, keys: list[str], where: object) -> dict[str, bool]:
    """:func:`bnb_linear_weights` as transformers decides it on the model built on the meta device."""
    try:
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.base import HfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        raise SurgeonError("a quantized base is quantized by transformers' rules; install transformers.") from None
    model = causal_lm(config, where, torch.device("meta"), as_saved=True)
    skipped = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    prefix = model.base_model_prefix + "."
    found = {}
    for name, module in model.named_modules():
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skipped):
            key = next((k for k in (f"{name}.weight", f"{name}.weight".removeprefix(prefix)) if k in keys), None)
            if key is not None:
                found[key] = isinstance(module, Conv1D)
    return found


def causal_lm(config: dict, where: object, device: torch.device, as_saved: bool = False) -> torch.nn.Module:
    """The causal LM ``config`` describes, built by transformers on ``device`` (on meta: no memory,
    no weights; elsewhere: fp32, randomly initialised). ``as_saved``: the class config.json's
    ``architectures`` names where transformers has it (a bare ``BertModel`` has a pooler, its causal
    LM none), as loading the checkpoint with that class, or ``AutoModel``, builds it."""
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
        named = getattr(transformers, (config.get("architectures") or [""])[0], None) if as_saved else None
        with torch.device(device):
            if isinstance(named, type) and issubclass(named, transformers.PreTrainedModel):
                return named(built).float()
            return transformers.AutoModelForCausalLM.from_config(built, dtype=torch.float32)
    except (ValueError, KeyError, TypeError) as error:
        raise SurgeonError(
            f"{where}: transformers cannot build this model from its config.json ({error}); "
            "use a model transformers knows."
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
