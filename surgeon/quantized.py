"""bitsandbytes-quantized checkpoints, read as the float weights they stand for.

transformers saves a model loaded with bitsandbytes as the quantized parts of each linear weight:

- 4-bit (NF4 or FP4): ``W.weight`` holds two 4-bit codes per byte, high nibble first (stored as
  uint8, or as another ``bnb_4bit_quant_storage`` dtype whose bytes are the same);
  ``W.weight.absmax`` one scale per block of ``blocksize`` values of the flattened weight (the last
  block may be short); ``W.weight.quant_map`` the 16-value code table; and
  ``W.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``) a uint8 tensor holding the JSON rest:
  ``quant_type``, ``blocksize``, ``dtype`` and ``shape``. Value ``i`` is ``table[code_i] *
  absmax[i // blocksize]`` in fp32, cast to ``dtype``. With double quantization ``absmax`` is itself
  8-bit codes into ``W.weight.nested_quant_map``, scaled per ``nested_blocksize`` of them by
  ``W.weight.nested_absmax``, plus the state's ``nested_offset`` (bitsandbytes.functional
  ``dequantize_4bit`` / ``dequantize_blockwise``).
- 8-bit (LLM.int8): ``W.weight`` is int8 rows and ``W.SCB`` each row's absmax; a value is
  ``int8 * SCB[row] / 127`` in fp32 (``int8_vectorwise_dequant``); ``W.weight_format`` is 0 (row).

bitsandbytes turns GPT-2's ``Conv1D`` (in×out) into a Linear (out×in) before quantizing, so those
weights are presented transposed back: the float checkpoint a merge writes must load as GPT-2 again.

The layout half below needs no torch, so that ``inspect`` reads it from headers alone; torch is
imported only to dequantize. bitsandbytes itself is never needed here, only as the tests' oracle.
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from surgeon.errors import SurgeonError
from surgeon.header import ITEM_SIZES

if TYPE_CHECKING:
    import torch

#: bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), indexed by the 4-bit code.
NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
#: get_4bit_type("fp4") before it is divided by its largest magnitude (12): sign, 2 exponent bits, 1 mantissa bit.
FP4_UNSCALED = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_QUANT_STATE = re.compile(r"^(?P<weight>.+)\.quant_state\.bitsandbytes__(?P<type>nf4|fp4)$")
_PARTS_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
#: Leaf names of transformers' Conv1D modules, in the model types built from them.
_CONV1D_NAMES = ("c_attn", "q_attn", "c_proj", "c_fc")
_CONV1D_MODELS = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp")


@dataclass(frozen=True)
class QuantizedWeight:
    """One logical weight and the stored tensors it is made of."""

    key: str
    bits: int
    parts: dict[str, str]  # role ("weight", "absmax", ..., "scb") → stored key
    state: dict  # the 4-bit quant state's JSON; empty for 8-bit
    shape: tuple[int, ...]  # as presented (transposed back for Conv1D)
    dtype: str  # what dequantizing gives: a torch dtype name
    transposed: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


#: name → (safetensors dtype name, shape) of every stored tensor.
Entries = dict[str, tuple[str, tuple[int, ...]]]


def _bad(key: str, where: object, reason: str) -> SurgeonError:
    return SurgeonError(f"{where}: the bitsandbytes weight {key!r} {reason}; the checkpoint is corrupt or was edited.")


def _is_conv1d(weight_key: str, config: dict) -> bool:
    module = weight_key.removesuffix(".weight").rsplit(".", 1)[-1]
    return config.get("model_type") in _CONV1D_MODELS and module in _CONV1D_NAMES


def _state_json(state_key: str, raw: bytes, where: object) -> dict:
    key = _QUANT_STATE.match(state_key)["weight"]
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _bad(key, where, "has a quant_state that is not JSON") from None
    if not isinstance(state, dict):
        raise _bad(key, where, "has a quant_state that is not a JSON object")
    return state


def _check_state(key: str, state: dict, quant_type: str, where: object) -> tuple[int, ...]:
    """The stored shape, once the state's fields are all of the right kind."""
    shape = state.get("shape")
    if state.get("quant_type") != quant_type:
        raise _bad(key, where, f"says quant_type {state.get('quant_type')!r} in a bitsandbytes__{quant_type} state")
    if state.get("blocksize") not in BLOCKSIZES:
        raise _bad(key, where, f"has blocksize {state.get('blocksize')!r}, not one of {BLOCKSIZES}")
    if state.get("dtype") not in FLOAT_DTYPES:
        raise _bad(key, where, f"has dtype {state.get('dtype')!r}, not one of {FLOAT_DTYPES}")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _bad(key, where, f"has shape {shape!r} in its quant_state")
    return tuple(shape)


def _expect(entries: Entries, key: str, part: str, dtypes: tuple[str, ...], count: int, where: object) -> None:
    name = f"{key}.{part}"
    if name not in entries:
        raise _bad(key, where, f"has no {name!r}")
    dtype, shape = entries[name]
    if dtype not in dtypes or math.prod(shape) != count:
        raise _bad(key, where, f"has {name!r} of {dtype} {list(shape)}, not {count} values of {'/'.join(dtypes)}")


def _check_nested(key: str, entries: Entries, state: dict, blocks: int, where: object) -> None:
    nested_size = state.get("nested_blocksize")
    if not isinstance(nested_size, int) or nested_size <= 0 or state.get("nested_dtype") != "float32":
        raise _bad(key, where, "has a nested quant state without a valid nested_blocksize and nested_dtype float32")
    if not isinstance(state.get("nested_offset"), (int, float)):
        raise _bad(key, where, "has a nested quant state without a nested_offset")
    _expect(entries, key, "nested_absmax", ("F32",), -(-blocks // nested_size), where)
    _expect(entries, key, "nested_quant_map", ("F32",), 256, where)


def _four_bit(state_key: str, state: dict, entries: Entries, config: dict, where: object) -> QuantizedWeight:
    key, quant_type = _QUANT_STATE.match(state_key).group("weight", "type")
    shape = _check_state(key, state, quant_type, where)
    numel = math.prod(shape)
    blocks = -(-numel // state["blocksize"])
    nested = f"{key}.nested_absmax" in entries
    packed_dtype, packed_shape = entries.get(key, ("", ()))
    if key not in entries or math.prod(packed_shape) * ITEM_SIZES.get(packed_dtype, 0) != -(-numel // 2):
        raise _bad(
            key,
            where,
            f"holds {math.prod(packed_shape)} {packed_dtype or 'missing'} values, not the "
            f"{-(-numel // 2)} bytes that pack {shape}",
        )
    _expect(entries, key, "absmax", ("U8",) if nested else ("F32",), blocks, where)
    _expect(entries, key, "quant_map", ("F32",), 16, where)
    if nested:
        _check_nested(key, entries, state, blocks, where)
    parts = {"weight": key, "state": state_key, **{p: f"{key}.{p}" for p in _PARTS_4BIT if f"{key}.{p}" in entries}}
    return _presented(key, 4, parts, state, shape, state["dtype"], config)


def _eight_bit(module: str, entries: Entries, config: dict, where: object) -> QuantizedWeight:
    key = module + ".weight"
    dtype, shape = entries.get(key, ("", ()))
    if dtype != "I8" or len(shape) != 2:
        raise _bad(
            key, where, f"is {dtype or 'missing'} {list(shape)} beside {module + '.SCB'!r}, not a 2-D int8 weight"
        )
    _expect(entries, module, "SCB", ("F32",), shape[0], where)
    parts = {"weight": key, "scb": module + ".SCB"}
    if module + ".weight_format" in entries:
        parts["format"] = module + ".weight_format"
    return _presented(key, 8, parts, {}, shape, "float32", config)


def _presented(
    key: str, bits: int, parts: dict, state: dict, shape: tuple, dtype: str, config: dict
) -> QuantizedWeight:
    transposed = len(shape) == 2 and _is_conv1d(key, config)
    shown = (shape[1], shape[0]) if transposed else tuple(shape)
    return QuantizedWeight(key, bits, parts, state, shown, dtype, transposed)


def _orphans(entries: Entries, found: dict[str, QuantizedWeight], where: object) -> None:
    """A part whose weight has no quant state would otherwise pass for a tensor of its own."""
    claimed = {part for weight in found.values() for part in weight.parts.values()}
    for name in entries:
        base, _, part = name.rpartition(".")
        if part in _PARTS_4BIT and name not in claimed and base in entries:
            raise _bad(base, where, f"has {name!r} but no quant_state.bitsandbytes__nf4/fp4 to read it with")
        if part == "weight_format" and name not in claimed and f"{base}.weight" in entries:
            raise _bad(f"{base}.weight", where, f"has {name!r} but no {base + '.SCB'!r} to scale its int8 values")


def find_quantized(
    entries: Entries, read_bytes: Callable[[list[str]], dict[str, bytes]], config_of: Callable[[], dict], where: object
) -> dict[str, QuantizedWeight]:
    """Every bitsandbytes-quantized weight among ``entries`` by its logical key, checked for a
    consistent layout; ``read_bytes`` reads the (small) quant-state tensors, ``config_of`` the
    model's config (read only for a quantized checkpoint). Empty for a float checkpoint."""
    states = [name for name in entries if _QUANT_STATE.match(name)]
    if not states and not any(name.endswith(".SCB") for name in entries):
        _orphans(entries, {}, where)
        return {}
    raw, config = read_bytes(states), config_of()
    found = {}
    for name in states:
        weight = _four_bit(name, _state_json(name, raw[name], where), entries, config, where)
        found[weight.key] = weight
    for name in entries:
        if name.endswith(".SCB"):
            weight = _eight_bit(name.removesuffix(".SCB"), entries, config, where)
            found[weight.key] = weight
    _orphans(entries, found, where)
    return found


def stored_parts(found: dict[str, QuantizedWeight]) -> set[str]:
    """The stored tensors that are parts of a quantized weight, other than the weights themselves."""
    return {part for weight in found.values() for role, part in weight.parts.items() if role != "weight"}


def describe_quantization(found: dict[str, QuantizedWeight], config: dict) -> dict | None:
    """What ``inspect`` shows of the quantization, or None for a float checkpoint."""
    if not found:
        return None
    settings = _settings(config)
    four = [w for w in found.values() if w.bits == 4]
    summary = {
        "method": f"bitsandbytes {'4' if four else '8'}-bit",
        "quantized_tensors": len(found),
    }
    if four:
        summary["type"] = _one_or_all(w.state["quant_type"] for w in four)
        summary["blocksize"] = _one_or_all(w.state["blocksize"] for w in four)
        summary["double_quant"] = _one_or_all("nested_absmax" in w.parts for w in four)
        summary["compute_dtype"] = settings.get("bnb_4bit_compute_dtype")
        summary["dequantized_dtype"] = _one_or_all(w.dtype for w in four)
    return summary


def _one_or_all(values) -> object:
    """The value all weights share, or the distinct values joined by '/' where they differ."""
    found = sorted(set(values))
    return found[0] if len(found) == 1 else "/".join(map(str, found))


def _settings(config: dict) -> dict:
    """config.json's ``quantization_config`` (transformers' BitsAndBytesConfig), or {}."""
    settings = config.get("quantization_config")
    return settings if isinstance(settings, dict) else {}


def dequantized_dtype(config: dict) -> str:
    """The dtype to write a dequantized model in: the one its 4-bit layers computed in
    (``bnb_4bit_compute_dtype``), else bfloat16, the usual dtype of the models people quantize."""
    settings = _settings(config)
    value = settings.get("bnb_4bit_compute_dtype")
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    return name if name in FLOAT_DTYPES and settings.get("load_in_4bit", True) else "bfloat16"


# --- dequantizing (torch) -------------------------------------------------------------------------


def code_table(quant_type: str) -> "torch.Tensor":
    import torch

    if quant_type == "nf4":
        return torch.tensor(NF4, dtype=torch.float32)
    table = torch.tensor(FP4_UNSCALED, dtype=torch.float32)
    return table.div_(table.abs().max())  # as bitsandbytes computes it, so the fp32 values are the same


#: Elements per step of the blockwise arithmetic: a multiple of every blocksize, small enough that a
#: step's temporaries stay in cache, large enough that torch's per-call overhead (and the handing of
#: the GIL between threads it needs) is a small part: on the 2-core machine a QLoRA merge took 5-10%
#: less time at 262144 than at 65536.
STEP = 262144


class _Grant:
    """Which threads are inside :func:`on_threads`, and the torch thread count they found: torch's is
    one setting for the whole process, so the first thread in lowers it and the last one out restores
    it (a merge's reader and writer threads both round-trip weights at once)."""

    def __init__(self):
        self.lock, self.inside, self.threads, self.local = threading.Lock(), 0, 1, threading.local()

    def enter(self, torch) -> None:
        with self.lock:
            if not self.inside:
                self.threads = torch.get_num_threads()
                torch.set_num_threads(1)
            self.inside += 1
            self.local.workers = self.threads

    def leave(self, torch) -> None:
        with self.lock:
            self.local.workers = 0
            self.inside -= 1
            if not self.inside:
                torch.set_num_threads(self.threads)

    def workers(self) -> int:
        """The threads this thread's steps may spread over (0 outside :func:`on_threads`)."""
        return getattr(self.local, "workers", 0)


_grant = _Grant()


def on_threads(function: Callable) -> Callable:
    """Run ``function`` with its steps (:func:`in_steps`) spread over torch's threads and every torch
    operation on one core: torch's own threads, on the short operations between and within steps,
    spin more than they work on a busy machine and would compete with the steps. Re-entrant, and
    safe from several threads at once."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        import torch

        if _grant.workers():
            return function(*args, **kwargs)
        _grant.enter(torch)
        try:
            return function(*args, **kwargs)
        finally:
            _grant.leave(torch)

    return wrapper


def in_steps(full: int, make_worker: Callable[[], Callable[[int, int], None]]) -> None:
    """Call a worker on each STEP-long piece ``(start, stop)`` of ``[0, full)``, on the threads
    :func:`on_threads` grants (one outside it), each thread making its own worker (its own
    buffers). Pieces never overlap, so the order they run in changes no result."""
    workers = max(1, min(_grant.workers() or 1, -(-full // STEP)))

    def run(first: int) -> None:
        worker = make_worker()
        for start in range(first * STEP, full, workers * STEP):
            worker(start, min(start + STEP, full))

    if workers == 1:
        return run(0)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, range(workers)))


def nested_scales(
    codes: "torch.Tensor", table: "torch.Tensor", nested_absmax: "torch.Tensor", blocksize: int, offset: float
) -> "torch.Tensor":
    """Double quantization's 8-bit scales dequantized as bitsandbytes does (``dequantize_blockwise``
    plus the offset), in fp32."""
    import torch

    values = torch.index_select(table, 0, codes.reshape(-1).int())
    full = values.numel() // blocksize * blocksize
    values[:full].view(-1, blocksize).mul_(nested_absmax[: full // blocksize].view(-1, 1))
    values[full:].mul_(nested_absmax[full // blocksize :])
    return values + torch.tensor(float(offset), dtype=torch.float32)


def _absmax(weight: QuantizedWeight, read: Callable[[str], "torch.Tensor"]) -> "torch.Tensor":
    absmax = read(weight.parts["absmax"]).reshape(-1)
    if "nested_absmax" not in weight.parts:
        return absmax.float()
    table, nested = (read(weight.parts[p]).reshape(-1) for p in ("nested_quant_map", "nested_absmax"))
    return nested_scales(absmax, table, nested, weight.state["nested_blocksize"], weight.state["nested_offset"])


def _four_bit_values(weight: QuantizedWeight, read: Callable[[str], "torch.Tensor"], where: object) -> "torch.Tensor":
    import torch

    table = code_table(weight.state["quant_type"])
    if not torch.equal(read(weight.parts["quant_map"]).reshape(-1), table):
        raise _bad(weight.key, where, f"has a quant_map that is not the {weight.state['quant_type']} table")
    # One lookup per byte, in a table of (high nibble, low nibble) value pairs (each pair's 8 bytes
    # read as one int64: torch looks up single values several times faster than rows), scaled in
    # fp32 and rounded to the weight's dtype as it is stored: fp32 (value × absmax), then cast, as bitsandbytes does.
    pairs = torch.stack([table.repeat_interleave(16), table.repeat(16)], dim=1)
    pair_bits = pairs.view(torch.int64).view(-1)
    packed = read(weight.key).reshape(-1).view(torch.uint8)
    scales, blocksize = _absmax(weight, read), weight.state["blocksize"]
    numel = math.prod(weight.state["shape"])
    out = torch.empty(numel, dtype=getattr(torch, weight.dtype))
    full = numel // blocksize * blocksize

    def make_worker() -> Callable[[int, int], None]:
        index, found = torch.empty(STEP // 2, dtype=torch.int32), torch.empty(STEP // 2, dtype=torch.int64)

        def work(start: int, stop: int) -> None:
            count, rows = (stop - start) // 2, slice(start // blocksize, stop // blocksize)
            index[:count].copy_(packed[start // 2 : stop // 2])
            values = torch.index_select(pair_bits, 0, index[:count], out=found[:count]).view(torch.float32)
            torch.mul(values.view(-1, blocksize), scales[rows].view(-1, 1), out=out[start:stop].view(-1, blocksize))

        return work

    in_steps(full, make_worker)
    tail = pairs[packed[full // 2 :].int()].view(-1)[: numel - full]
    out[full:] = tail * scales[full // blocksize :]
    return out.view(weight.state["shape"])


def _eight_bit_values(weight: QuantizedWeight, read: Callable[[str], "torch.Tensor"], where: object) -> "torch.Tensor":
    if "format" in weight.parts and int(read(weight.parts["format"]).reshape(-1)[0]) != 0:
        raise _bad(weight.key, where, "has a weight_format other than 0 (row-major), which surgeon cannot read")
    # bitsandbytes' int8_vectorwise_dequant, operation for operation, so the fp32 rounding is the same.
    return read(weight.key) * read(weight.parts["scb"]).view(-1, 1) * 7.874015718698502e-3


@on_threads
def dequantize(weight: QuantizedWeight, read: Callable[[str], "torch.Tensor"], where: object) -> "torch.Tensor":
    """The float weight, bit for bit what bitsandbytes dequantizes it to (transposed back for Conv1D);
    ``read`` reads one stored tensor, ``where`` names the checkpoint in errors."""
    values = (_four_bit_values if weight.bits == 4 else _eight_bit_values)(weight, read, where)
    return values.t().contiguous() if weight.transposed else values
