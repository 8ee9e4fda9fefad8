"""Reading checkpoints one tensor at a time, and writing them as a stream.

A safetensors file is opened afresh for every tensor read: a handle kept open keeps every page
it has touched mapped into the process, so reading a whole model through one handle grows the
resident set to the model's size. Writing plans every shard's header up front from the tensors'
shapes and dtypes, so each tensor goes to disk as soon as it is computed and nothing accumulates.
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from surgeon.checkpoint_files import SAFETENSORS_INDEX, WEIGHT_SUFFIXES, model_config, parse_size  # noqa: F401
from surgeon.checkpoint_files import weight_files as _weight_files
from surgeon.errors import SurgeonError
from surgeon.header import read_header
from surgeon.quantized import QuantizedWeight, dequantize, find_quantized, stored_parts

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


# What a corrupt file makes the safetensors library (and torch, decoding its buffers) raise.
_CORRUPT = (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError)


@contextmanager
def open_safetensors(file: Path) -> Iterator:
    """A ``safe_open`` handle on ``file``, the one way surgeon reads safetensors: whatever the library
    raises for a truncated file, a bad header or offsets out of range, inside the ``with`` block
    too, becomes ``FILE: not a valid safetensors file (...)`` instead of a traceback."""
    try:
        with safe_open(file, framework="pt") as handle:
            yield handle
    except _CORRUPT as error:
        raise SurgeonError(f"{file}: not a valid safetensors file ({error}); re-download or re-create it.") from None


def read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file and its header metadata (adapters are small enough),
    the header checked first as every safetensors input is (:mod:`surgeon.header`)."""
    read_header(file)
    with open_safetensors(file) as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Checkpoint:
    """A model checkpoint on disk: a safetensors file, a sharded set with its index, a directory,
    or a legacy ``.bin`` pickle read with ``weights_only``. Tensors are read only when asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise SurgeonError(f"{self.path}: no such file or directory.")
        self.files = _weight_files(self.path)
        self._where: dict[str, Path] = {}
        self._info: dict[str, TensorInfo] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self.metadata: dict[str, str] = {}
        for file in self.files:
            if file.suffix == ".safetensors":
                self._index_safetensors(file)
            else:
                self._index_pickle(file)
        self.quantized = self._take_quantized()

    @property
    def directory(self) -> Path | None:
        return self.path if self.path.is_dir() else None

    def _add(self, key: str, file: Path, info: TensorInfo) -> None:
        if key in self._where:
            raise SurgeonError(
                f"{file}: tensor {key!r} is also in {self._where[key]}; a checkpoint must hold each key once."
            )
        self._where[key] = file
        self._info[key] = info

    def _index_safetensors(self, file: Path) -> None:
        """Names, shapes and dtypes from the header alone (:mod:`surgeon.header`, which refuses a bad
        file before any tensor is read), in the sorted order the safetensors library lists them."""
        header = read_header(file)
        self.metadata.update(header.metadata)
        for key in sorted(header.entries):
            entry = header.entries[key]
            self._add(key, file, TensorInfo(entry.shape, _DTYPES_BY_NAME[entry.dtype]))

    def _index_pickle(self, file: Path) -> None:
        state = load_pickle_weights(file)
        self._pickled[file] = state
        for key, tensor in state.items():
            self._add(key, file, TensorInfo(tuple(tensor.shape), tensor.dtype))

    def _take_quantized(self) -> dict[str, QuantizedWeight]:
        """A bitsandbytes checkpoint is shown as the float weights it stands for: its quantized parts
        leave the listing, and each weight's info becomes the dequantized one (surgeon/quantized.py)."""
        entries = {key: (_DTYPE_NAMES[info.dtype], info.shape) for key, info in self._info.items()}
        found = find_quantized(entries, self._read_bytes, self.config, self.path)
        for key in stored_parts(found):
            del self._info[key]
        for key, weight in found.items():
            self._info[key] = TensorInfo(weight.shape, getattr(torch, weight.dtype))
        return found

    def _read_bytes(self, keys: list[str]) -> dict[str, bytes]:
        """The stored bytes, whatever the dtype says (numpy has no float8), as surgeon.header reads them."""
        return {key: self._read(key).reshape(-1).view(torch.uint8).numpy().tobytes() for key in keys}

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def __len__(self) -> int:
        return len(self._info)

    def info(self, key: str) -> TensorInfo:
        return self._info[key]

    def get(self, key: str) -> torch.Tensor:
        if key in self.quantized:
            return dequantize(self.quantized[key], self._read, self.path)
        return self._read(key)

    def _read(self, key: str) -> torch.Tensor:
        """One tensor as stored."""
        file = self._where[key]
        if file in self._pickled:
            return self._pickled[file][key]
        with open_safetensors(file) as handle:
            return handle.get_tensor(key)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._info:
            yield key, self.get(key)

    def num_params(self) -> int:
        return sum(math.prod(i.shape) for i in self._info.values())

    def num_bytes(self) -> int:
        return sum(i.num_bytes for i in self._info.values())

    def largest_tensor_bytes(self) -> int:
        return max((i.num_bytes for i in self._info.values()), default=0)

    def extra_files(self) -> list[Path]:
        """Files beside the weights that a model needs (config, tokenizer), copied along untouched."""
        if self.directory is None:
            return []
        return sorted(
            p
            for p in self.directory.iterdir()
            if p.is_file()
            and not p.name.startswith(".")
            and p not in self.files
            and not p.name.endswith(WEIGHT_SUFFIXES)
            and not p.name.endswith(".index.json")
        )

    def config(self) -> dict:
        """The checkpoint's ``config.json``, or an empty dict where it has none; the fields every
        reader of it relies on (``architectures``, ``model_type``, ``text_config``) have their types."""
        return model_config(self.directory)


def _torch_load(file: Path):
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:  # pickles older than the zip format cannot be mapped
        if "mmap" not in str(error):
            raise
        return torch.load(file, map_location="cpu", weights_only=True)


def load_pickle_weights(file: Path) -> dict[str, torch.Tensor]:
    """A legacy PyTorch pickle, loaded without running any code it may carry.

    Zip-format pickles are memory-mapped, so tensors are paged in as they are used; but unlike a
    safetensors file the mapping lasts as long as the checkpoint, so a .bin input can grow the
    resident set towards its size. Convert large .bin models to safetensors first."""
    try:
        with warnings.catch_warnings():  # torch warns about a pickle protocol before refusing it
            warnings.simplefilter("ignore", UserWarning)
            state = _torch_load(file)
    except pickle.UnpicklingError as error:
        # torch says "Weights only load failed" both for a pickle that names a global it does not
        # allow (which only full unpickling could load) and for bytes that are no pickle at all.
        if "Unsupported global" not in str(error):
            reason = (
                str(error).partition("WeightsUnpickler error:")[2].strip().split("\n")[0] or str(error).split("\n")[0]
            )
            raise SurgeonError(
                f"{file}: not a readable PyTorch checkpoint ({reason}); the file is damaged or not a checkpoint."
            ) from None
        raise SurgeonError(
            f"{file}: refusing to load this pickle because it needs full unpickling, which can run arbitrary code; "
            "convert it to safetensors with a tool you trust."
        ) from error
    except Exception as error:
        raise SurgeonError(f"{file}: not a readable PyTorch checkpoint ({error}).") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SurgeonError(f"{file}: holds no plain mapping of names to tensors.")
    return state


def _header_bytes(entries: dict, metadata: dict[str, str]) -> bytes:
    header = {"__metadata__": metadata, **entries}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class StreamingWriter:
    """Writes a (sharded) safetensors checkpoint whose tensors are known in advance by shape and
    dtype, accepting their data one at a time in any order.

    Shards are cut at ``shard_size`` bytes like transformers does; a single shard is called
    ``model.safetensors``, several get ``model-0000i-of-0000N.safetensors`` and an index.
    """

    def __init__(
        self,
        directory: Path,
        tensors: Iterable[tuple[str, TensorInfo]],
        shard_size: int = 5 * 10**9,
        metadata: dict[str, str] | None = None,
        basename: str = "model",
    ):
        self.directory = Path(directory)
        metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, TensorInfo]]] = [[]]
        size = 0
        for key, info in tensors:
            if shards[-1] and size + info.num_bytes > shard_size:
                shards.append([])
                size = 0
            shards[-1].append((key, info))
            size += info.num_bytes
        count = len(shards)
        names = (
            [f"{basename}.safetensors"]
            if count == 1
            else [f"{basename}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._slots: dict[str, tuple[int, int, TensorInfo]] = {}
        self._handles = []
        weight_map = {}
        for shard_number, (name, members) in enumerate(zip(names, shards)):
            entries, offset = {}, 0
            for key, info in members:
                if info.dtype not in _DTYPE_NAMES:
                    raise SurgeonError(f"tensor {key!r} has dtype {info.dtype}, which safetensors cannot store.")
                entries[key] = {
                    "dtype": _DTYPE_NAMES[info.dtype],
                    "shape": list(info.shape),
                    "data_offsets": [offset, offset + info.num_bytes],
                }
                offset += info.num_bytes
                weight_map[key] = name
            header = _header_bytes(entries, metadata)
            handle = open(self.directory / name, "wb")
            handle.write(header)
            handle.truncate(len(header) + offset)
            self._handles.append(handle)
            for key, info in members:
                begin = entries[key]["data_offsets"][0]
                self._slots[key] = (shard_number, len(header) + begin, info)
        self._pending = set(self._slots)
        self.file_names = names
        self.weight_map = weight_map  # key → file, for an index that lists more files than these
        if count > 1:
            index = {
                "metadata": {"total_size": sum(i.num_bytes for _, _, i in self._slots.values())},
                "weight_map": weight_map,
            }
            (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def write(self, key: str, tensor: torch.Tensor) -> None:
        shard_number, position, info = self._slots[key]
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise SurgeonError(
                f"tensor {key!r} is {tuple(tensor.shape)} {tensor.dtype}, but {info.shape} {info.dtype} was planned."
            )
        handle = self._handles[shard_number]
        handle.seek(position)
        if info.num_bytes:
            handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._pending.discard(key)

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        if self._pending:
            missing = ", ".join(sorted(self._pending)[:5])
            raise SurgeonError(
                f"{self.directory}: {len(self._pending)} planned tensors were never written ({missing})."
            )

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            for handle in self._handles:
                handle.close()
