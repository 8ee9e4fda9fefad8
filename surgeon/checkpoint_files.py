"""Which files of a checkpoint hold its weights: a file, a sharded set named by its index, or a
directory's usual names. Apart from the tensors, so that ``inspect`` can list them without torch."""

from __future__ import annotations

import json
import math
from pathlib import Path

from surgeon.errors import SurgeonError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weight_files(path: Path) -> list[Path]:
    """The weight files of the checkpoint at ``path``, or an error saying what was looked for."""
    if path.is_file():
        if not path.name.endswith(WEIGHT_SUFFIXES):
            raise SurgeonError(f"{path}: not a checkpoint file; expected .safetensors or .bin.")
        return [path]
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = path / index_name
        if index.is_file():
            files = _shard_files(index)
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise SurgeonError(f"{index}: lists shards that are not there: {', '.join(missing)}.")
            return files
    for name in ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise SurgeonError(
        f"{path}: no checkpoint here; looked for {SAFETENSORS_INDEX}, model.safetensors, pytorch_model.bin "
        "and *.safetensors."
    )


def _shard_files(index: Path) -> list[Path]:
    """The shards an index names: plain file names in its own directory (a name with a directory,
    ``..`` or an absolute path would read files outside the checkpoint, so it is refused)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SurgeonError(
            f"{index}: weight_map is not a mapping of tensor names to shard file names; regenerate the index or remove "
            "it."
        )
    outside = next((n for n in weight_map.values() if Path(n).name != n or n in ("", ".", "..") or "\\" in n), None)
    if outside is not None:
        raise SurgeonError(
            f"{index}: names the shard {outside!r}, which is not a file in the checkpoint's directory; "
            "an index may name only files beside it."
        )
    return sorted({index.parent / name for name in weight_map.values()})


def read_json(file: Path) -> dict:
    """The JSON object in ``file`` (a config, an index); invalid UTF-8, invalid JSON or a value of
    another kind is one error naming the file, never a traceback."""
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise SurgeonError(f"{file}: not valid JSON ({error}); fix or regenerate it.") from None
    if not isinstance(data, dict):
        raise SurgeonError(
            f"{file}: holds a JSON {type(data).__name__} where an object was expected; fix or regenerate it."
        )
    return data


def model_config(directory: Path | None) -> dict:
    """A checkpoint directory's ``config.json``, or an empty dict where it has none; the fields every
    reader of it relies on (``architectures``, ``model_type``, ``text_config``) have their types."""
    file = directory / "config.json" if directory is not None else None
    if file is None or not file.is_file():
        return {}
    config = read_json(file)
    architectures = config.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise SurgeonError(f"{file}: architectures is {architectures!r}, not a list of class names; fix config.json.")
    for field, kind in (("model_type", str), ("text_config", dict)):
        if config.get(field) is not None and not isinstance(config[field], kind):
            raise SurgeonError(f"{file}: {field} is {config[field]!r}, not a {kind.__name__}; fix config.json.")
    return config


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count, as bytes (decimal units, as transformers uses)."""
    if isinstance(text, int):
        return text
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    raw = text.strip().upper()
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not math.isfinite(value) or value <= 0:
        raise SurgeonError(f"cannot read the size {text!r}; write it like 5GB, 500MB or 2GiB.")
    return int(value * units[unit])
