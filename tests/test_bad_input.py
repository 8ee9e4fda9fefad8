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


# -- item 5: nothing non-finite is ever written with exit 0 --------------------------------------------

@pytest.mark.parametrize("weight", ["inf", "-inf", "nan"])
def test_nonfinite_weight_is_refused_before_any_work(base, adapter, tmp_path, weight):
    assert_refused(run("merge", base, adapter, "-o", tmp_path / "out", "-w", weight), f"--weight {weight}", "finite")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("alpha", ["Infinity", "NaN"])
def test_nonfinite_alpha_is_refused(base, adapter, tmp_path, alpha):
    text = (adapter / "adapter_config.json").read_text()
    config = json.loads(text)
    (adapter / "adapter_config.json").write_text(text.replace(f'"lora_alpha": {config["lora_alpha"]}', f'"lora_alpha": {alpha}'))
    assert json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"] != config["lora_alpha"]
    assert_refused(run("merge", base, adapter, "-o", tmp_path / "out"), "lora_alpha", "finite")
    assert not (tmp_path / "out").exists()


def test_finite_factors_whose_product_overflows_are_refused(base, adapter, tmp_path):
    def huge(tensors):
        for key in tensors:
            if "layers.0.self_attn.q_proj" in key:
                tensors[key].fill_(1e30)
    edit_tensors(adapter, huge)
    assert_refused(run("merge", base, adapter, "-o", tmp_path / "out"), "model.layers.0.self_attn.q_proj.weight", "overflow fp32")
    assert not (tmp_path / "out").exists()


def test_overflow_on_the_cast_to_fp16_is_refused(base, adapter, tmp_path):
    result = run("merge", base, adapter, "-o", tmp_path / "out", "-w", "1e6", "--dtype", "fp16")
    assert_refused(result, "overflows float16 when cast")
    assert not (tmp_path / "out").exists()
    assert run("merge", base, adapter, "-o", tmp_path / "out", "-w", "1e6", "--dtype", "fp32").exit_code == 0


def test_nonfinite_base_is_refused_unless_allowed(base, adapter, tmp_path):
    copy = Path(shutil.copytree(base, tmp_path / "base"))
    tensors = load_file(copy / "model.safetensors")
    tensors["model.norm.weight"][3] = float("inf")
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    assert_refused(run("merge", copy, adapter, "-o", tmp_path / "out"), "'model.norm.weight' already holds NaN or Inf")
    assert not (tmp_path / "out").exists()
    assert run("merge", copy, adapter, "-o", tmp_path / "out", "--allow-nonfinite").exit_code == 0


# -- item 6: factors that are not float, targets that match nothing, DoRA without magnitudes ---------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.float8_e4m3fn])
def test_non_float_factors_are_refused_by_name(base, adapter, tmp_path, dtype):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    edit_tensors(adapter, lambda t: t.update({key: (t[key] * 1000).to(dtype)}))
    assert_refused(run("merge", base, adapter, "-o", tmp_path / "out"), key, str(dtype))
    assert not (tmp_path / "out").exists()


def test_non_float_factors_of_a_kohya_file_are_refused(base, tmp_path):
    from fixtures.make_fixtures import make_lora
    from surgeon.formats import read_adapter, write_adapter

    peft = make_lora("llama", base, tmp_path / "peft")
    file = tmp_path / "k.safetensors"
    write_adapter(read_adapter(peft), file, "kohya")
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key] = (tensors[key] * 1000).to(torch.int32)
    save_file(tensors, file)
    assert_refused(run("merge", base, file, "-o", tmp_path / "out"), "torch.int32", "fp16, bf16, fp32 or fp64")


@pytest.mark.parametrize("targets", [["nothing_like_this"], "no_match_.*"])
def test_target_modules_that_match_nothing_are_refused(base, adapter, tmp_path, targets):
    edit_config(adapter, target_modules=targets)
    assert_refused(run("merge", base, adapter, "-o", tmp_path / "out"), "target_modules", "matches none")


def test_empty_target_modules_are_refused(base, adapter, tmp_path):
    edit_config(adapter, target_modules=[])
    assert_refused(run("merge", base, adapter, "-o", tmp_path / "out"), "target_modules is empty")


def test_use_dora_without_magnitudes_is_refused(base, adapter, tmp_path):
    edit_config(adapter, use_dora=True)
    assert_refused(run("merge", base, adapter, "-o", tmp_path / "out"), "use_dora is true", "lacks a lora_magnitude_vector")


def test_adapter_with_zero_tensors_is_refused(base, adapter, tmp_path):
    save_file({}, adapter / "adapter_model.safetensors")
    assert_refused(run("merge", base, adapter, "-o", tmp_path / "out"), "holds no tensors")
    assert_refused(run("inspect", adapter), "holds no tensors")


@pytest.mark.parametrize("config", [b"{not json", b"\xff\xfe{}", b"[1, 2]", b'{"r": 8}'])
def test_inspect_names_a_broken_adapter_config(adapter, config):
    (adapter / "adapter_config.json").write_bytes(config)
    assert_refused(run("inspect", adapter), str(adapter / "adapter_config.json"))
