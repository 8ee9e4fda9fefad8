"""Bad input of every kind (issue 11): corrupt files, non-finite values, wrong dtypes, broken configs
and indexes, Hub paths that climb out of the cache. Each is refused with one ``Error:`` sentence
naming the file or tensor, exit code 1, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgeon.cli import main

def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, *fragments: str) -> None:
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.output.startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture
def adapter(fixtures_dir, tmp_path) -> Path:
    return Path(shutil.copytree(fixtures_dir / "tiny-llama-lora", tmp_path / "adapter"))


@pytest.fixture
def base(fixtures_dir) -> Path:
    return fixtures_dir / "tiny-llama"


def edit_config(adapter: Path, **changes) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(adapter: Path, change) -> None:
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file)


def header_of(raw: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _edit_entry(field: str, value):
    def corrupt(raw: bytes) -> bytes:
        header, data = header_of(raw)
        key = next(k for k in header if k != "__metadata__")
        header[key][field] = value(header[key][field])
        return with_header(header, data)
    return corrupt


CORRUPTIONS = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "empty": lambda raw: b"",
    "header too large": lambda raw: b"\xff" * 8 + raw[8:],
    "header not json": lambda raw: raw[:8] + b"#" + raw[9:],
    "header not utf-8": lambda raw: raw[:9] + b"\xff" + raw[10:],
    "offsets out of range": _edit_entry("data_offsets", lambda o: [o[0], o[1] + 10**6]),
    "shape beyond the data": _edit_entry("shape", lambda s: [10**6, 10**6]),
    "unknown dtype": _edit_entry("dtype", lambda d: "Q7"),
}


# -- item 7: a corrupt adapter file is a clean error in every command that reads one ----------------

def _commands(base: Path, adapter: Path, out: Path) -> dict[str, list]:
    return {
        "inspect": ["inspect", adapter],
        "merge": ["merge", base, adapter, "-o", out],
        "unmerge": ["unmerge", base, adapter, "-o", out],
        "convert": ["convert", adapter, "--to", "mlx", "-o", out],
        "resize": ["resize", adapter, "--rank", "2", "-o", out],
        "compose": ["compose", adapter, adapter, "-o", out],
    }


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("command", ["inspect", "merge", "unmerge", "convert", "resize", "compose"])
def test_corrupt_adapter_file_is_not_a_valid_safetensors_file(base, adapter, tmp_path, command, corruption):
    file = adapter / "adapter_model.safetensors"
    file.write_bytes(CORRUPTIONS[corruption](file.read_bytes()))
    result = run(*_commands(base, adapter, tmp_path / "out")[command])
    assert_refused(result, f"{file}: not a valid safetensors file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("corruption", ["truncated", "offsets out of range", "unknown dtype"])
def test_corrupt_base_file_gets_the_same_error(base, adapter, tmp_path, corruption):
    copy = Path(shutil.copytree(base, tmp_path / "base"))
    file = copy / "model.safetensors"
    file.write_bytes(CORRUPTIONS[corruption](file.read_bytes()))
    assert_refused(run("merge", copy, adapter, "-o", tmp_path / "out"), f"{file}: not a valid safetensors file")
