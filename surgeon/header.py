"""A safetensors file's header, read as the JSON it is: names, dtypes, shapes and sizes without
importing torch or touching the tensor data, so that ``inspect`` and format detection are fast.

Layout (safetensors' own spec): 8 bytes little-endian N, then N bytes of JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data that
follows), plus an optional ``"__metadata__"`` object of strings.

This is surgeon's one check of a safetensors file, as strict as the safetensors library's own
(tensors lie end to end and cover the data exactly): :class:`surgeon.checkpoint.Checkpoint` and
every adapter reader index through it, so a file is refused in the same words by ``inspect``
(header only) and by the commands that read tensors. A dtype surgeon does not read, whether the
library knows it (U16, C64, F4) or not (a corrupt name), is :func:`unhandled_dtype`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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
_MAX_HEADER = 100_000_000  # safetensors' own limit


class Entry(NamedTuple):
    """One tensor as the header describes it (a tuple: a header may list tens of thousands)."""

    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int] = (0, 0)  # [begin, end) in the data after the header

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
    return SurgeonError(f"{path}: not a valid safetensors file ({reason}); re-download or re-create it.")


def unhandled_dtype(path: Path, name: str, dtype: str) -> SurgeonError:
    """The one sentence for a tensor whose dtype surgeon does not read."""
    return SurgeonError(
        f"{path}: tensor {name!r} has dtype {dtype}, which surgeon does not handle (it reads {', '.join(ITEM_SIZES)})."
    )


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
    numbers = (*shape, begin, end)
    if type(dtype) is not str or not all(type(d) is int for d in numbers) or min(numbers) < 0:  # JSON true is no int
        raise _invalid(path, f"tensor {name!r} is described wrongly")
    if dtype not in ITEM_SIZES:
        raise unhandled_dtype(path, name, dtype)
    if end - begin != math.prod(shape) * ITEM_SIZES[dtype] or end > data_size:
        raise _invalid(path, f"tensor {name!r} has offsets that do not fit its shape or the file")
    return Entry(dtype, shape, (begin, end))


def _check_layout(path: Path, entries: dict[str, Entry], data_size: int) -> None:
    """The tensors lie end to end from the start of the data to the end of the file, as safetensors
    requires (no gaps, no overlaps, no bytes left over)."""
    end = 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1].offsets):
        if entry.offsets[0] != end:
            raise _invalid(path, f"tensor {name!r} does not start where the one before it ends")
        end = entry.offsets[1]
    if end != data_size:
        raise _invalid(path, f"the tensors cover {end} of the {data_size} bytes of data")


def read_header(path: str | Path) -> Header:
    """The parsed header, checked against the file's size; a bad file raises one sentence."""
    path = Path(path)
    raw, data_size = _raw_header(path)
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid(path, "__metadata__ is not a mapping of strings")
    entries = {name: _entry(path, name, value, data_size) for name, value in raw.items()}
    _check_layout(path, entries, data_size)
    return Header(entries, metadata)


def header_or_none(path: Path) -> dict[str, Entry] | None:
    """The tensor entries, or None where ``path`` is not a valid safetensors file (for detection)."""
    try:
        return read_header(path).entries
    except (SurgeonError, OSError):
        return None


def read_tensor_bytes(path: Path, names: list[str]) -> dict[str, bytes]:
    """The stored bytes of a few small tensors, without torch: producers keep JSON in uint8 tensors
    (bitsandbytes' quant states), and ``inspect`` needs it. (``path`` has passed :func:`read_header`.)"""
    raw, data_size = _raw_header(path)
    start = path.stat().st_size - data_size
    found = {}
    with open(path, "rb") as handle:
        for name in names:
            entry = _entry(path, name, raw.get(name), data_size)
            handle.seek(start + entry.offsets[0])
            found[name] = handle.read(entry.num_bytes)
    return found
