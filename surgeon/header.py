"""A safetensors file's header, read as the JSON it is: names, dtypes, shapes and sizes without
importing torch or touching the tensor data, so that ``inspect`` and format detection are fast.

Layout (safetensors' own spec): 8 bytes little-endian N, then N bytes of JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data that
follows), plus an optional ``"__metadata__"`` object of strings.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from surgeon.errors import SurgeonError

#: Bytes per element of each safetensors dtype surgeon handles (those :mod:`surgeon.checkpoint` reads).
ITEM_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class Entry:
    """One tensor as the header describes it."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_bytes(self) -> int:
        return self.numel * ITEM_SIZES[self.dtype]


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]
    metadata: dict[str, str]


def _invalid(path: Path, reason: str) -> SurgeonError:
    return SurgeonError(f"{path}: not a valid safetensors file ({reason}).")


def _raw_header(path: Path) -> tuple[dict, int]:
    """The header's JSON object, and how many bytes of tensor data follow it."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        size = len(prefix) == 8 and int.from_bytes(prefix, "little")
        if not size or size > _MAX_HEADER or size > path.stat().st_size - 8:
            raise _invalid(path, "the header length is out of range")
        raw = handle.read(size)
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _invalid(path, "the header is not JSON") from None
    if not isinstance(value, dict):
        raise _invalid(path, "the header is not a JSON object")
    return value, path.stat().st_size - 8 - size


def _entry(path: Path, name: str, value, data_size: int) -> Entry:
    try:
        dtype, shape, (begin, end) = value["dtype"], tuple(value["shape"]), value["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise _invalid(path, f"tensor {name!r} is described wrongly") from None
    if isinstance(dtype, str) and dtype not in ITEM_SIZES:  # the message Checkpoint gives for it
        raise SurgeonError(f"{path}: tensor {name!r} has dtype {dtype}, which surgeon does not handle.")
    try:
        entry = Entry(dtype, shape)
        valid = all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)) and end - begin == entry.num_bytes
    except (KeyError, TypeError, ValueError):
        raise _invalid(path, f"tensor {name!r} is described wrongly") from None
    if not valid or end > data_size:
        raise _invalid(path, f"tensor {name!r} has offsets that do not fit its shape or the file")
    return entry


def read_header(path: str | Path) -> Header:
    """The parsed header, checked against the file's size; a bad file raises one sentence."""
    path = Path(path)
    raw, data_size = _raw_header(path)
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid(path, "__metadata__ is not a mapping of strings")
    return Header({name: _entry(path, name, value, data_size) for name, value in raw.items()}, metadata)


def header_or_none(path: Path) -> dict[str, Entry] | None:
    """The tensor entries, or None where ``path`` is not a valid safetensors file (for detection)."""
    try:
        return read_header(path).entries
    except (SurgeonError, OSError):
        return None


def read_tensor_bytes(path: Path, names: list[str]) -> dict[str, bytes]:
    """The stored bytes of a few small tensors, without torch: producers keep JSON in uint8 tensors
    (bitsandbytes' quant states), and ``inspect`` needs it."""
    raw, data_size = _raw_header(path)
    start = path.stat().st_size - data_size
    found = {}
    with open(path, "rb") as handle:
        for name in names:
            entry = _entry(path, name, raw.get(name), data_size)
            begin = raw[name]["data_offsets"][0]
            handle.seek(start + begin)
            found[name] = handle.read(entry.num_bytes)
    return found
