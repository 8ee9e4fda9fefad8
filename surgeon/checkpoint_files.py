"""Which files of a checkpoint hold its weights: a file, a sharded set named by its index, or a
directory's usual names. Apart from the tensors, so that ``inspect`` can list them without torch."""

from __future__ import annotations

import json
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
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise SurgeonError(f"{index}: not a valid shard index ({error}); regenerate it or remove it.") from None
            files = sorted({path / name for name in weight_map.values()})
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
