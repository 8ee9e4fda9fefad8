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
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


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


def _shift_last(raw: bytes, by: int) -> bytes:
    """The last tensor's offsets moved by ``by`` bytes: sizes still fit, the layout does not."""
    header, data = header_of(raw)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    header[last]["data_offsets"] = [o + by for o in header[last]["data_offsets"]]
    return with_header(header, data)


CORRUPTIONS = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "empty": lambda raw: b"",
    "header too large": lambda raw: b"\xff" * 8 + raw[8:],
    "header not json": lambda raw: raw[:8] + b"#" + raw[9:],
    "header not utf-8": lambda raw: raw[:9] + b"\xff" + raw[10:],
    "offsets out of range": _edit_entry("data_offsets", lambda o: [o[0], o[1] + 10**6]),
    "shape beyond the data": _edit_entry("shape", lambda s: [10**6, 10**6]),
    "bytes left over": lambda raw: raw + b"\0" * 8,
    "tensors overlap": lambda raw: _shift_last(raw, -4),
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


@pytest.mark.parametrize("corruption", ["truncated", "offsets out of range", "bytes left over", "tensors overlap"])
@pytest.mark.parametrize("command", ["inspect", "merge"])
def test_corrupt_base_file_gets_the_same_error(base, adapter, tmp_path, corruption, command):
    """``inspect`` reads a checkpoint's header alone, merge reads its tensors: one check, one error."""
    copy = Path(shutil.copytree(base, tmp_path / "base"))
    file = copy / "model.safetensors"
    file.write_bytes(CORRUPTIONS[corruption](file.read_bytes()))
    args = ["inspect", copy] if command == "inspect" else ["merge", copy, adapter, "-o", tmp_path / "out"]
    assert_refused(run(*args), f"{file}: not a valid safetensors file")


#: Bytes per element of each dtype a test writes in place of F32 (Q7 is no safetensors dtype at all).
_WIDTHS = {"U16": 2, "C64": 8, "Q7": 4}


def _retype(file: Path, key: str, dtype: str) -> None:
    """``key`` stored as ``dtype`` over the same bytes (the last dimension rescaled): a valid file
    but for the dtype."""
    header, data = header_of(file.read_bytes())
    entry = header[key]
    entry["dtype"], entry["shape"][-1] = dtype, entry["shape"][-1] * 4 // _WIDTHS[dtype]
    file.write_bytes(with_header(header, data))


@pytest.mark.parametrize("dtype", _WIDTHS)
@pytest.mark.parametrize("where", ["checkpoint", "adapter"])
@pytest.mark.parametrize("command", ["inspect", "merge"])
def test_a_dtype_surgeon_does_not_read_has_one_wording_on_every_path(base, adapter, tmp_path, dtype, where, command):
    """One rule (surgeon/header.py): a dtype surgeon does not read is named as such, whether the
    safetensors library knows it (U16, C64) or not (Q7), by header-only inspect and by the readers."""
    if where == "checkpoint":
        target = Path(shutil.copytree(base, tmp_path / "base"))
        file, key = target / "model.safetensors", "model.norm.weight"
    else:
        target, file = adapter, adapter / "adapter_model.safetensors"
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _retype(file, key, dtype)
    pair = [target, adapter] if where == "checkpoint" else [base, target]
    args = ["inspect", target] if command == "inspect" else ["merge", *pair, "-o", tmp_path / "out"]
    assert_refused(run(*args), f"{file}: tensor {key!r} has dtype {dtype}, which surgeon does not handle")


def test_the_reader_and_the_header_list_the_same_dtypes():
    from surgeon.checkpoint import _DTYPES_BY_NAME
    from surgeon.header import ITEM_SIZES

    assert {name: dtype.itemsize for name, dtype in _DTYPES_BY_NAME.items()} == ITEM_SIZES


# -- item 5: nothing non-finite is ever written with exit 0 --------------------------------------------


@pytest.mark.parametrize("weight", ["inf", "-inf", "nan", "1e39"])
def test_nonfinite_weight_is_refused_before_any_work(base, adapter, tmp_path, weight):
    assert_refused(
        run("merge", base, adapter, "-o", tmp_path / "out", "-w", weight), f"weight {float(weight)}", "finite"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("alpha", ["Infinity", "NaN"])
def test_nonfinite_alpha_is_refused(base, adapter, tmp_path, alpha):
    text = (adapter / "adapter_config.json").read_text()
    config = json.loads(text)
    (adapter / "adapter_config.json").write_text(
        text.replace(f'"lora_alpha": {config["lora_alpha"]}', f'"lora_alpha": {alpha}')
    )
    assert json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"] != config["lora_alpha"]
    assert_refused(run("merge", base, adapter, "-o", tmp_path / "out"), "lora_alpha", "finite")
    assert not (tmp_path / "out").exists()


def test_weight_times_scale_beyond_fp32_is_refused(base, adapter, tmp_path):
    edit_config(adapter, lora_alpha=1e30)
    result = run("merge", base, adapter, "-o", tmp_path / "out", "-w", "1e20")
    assert_refused(result, "the weight 1e+20 times the delta's scale", "beyond fp32's range")
    edit_config(adapter, lora_alpha=1e300)
    assert_refused(run("merge", base, adapter, "-o", tmp_path / "out"), "within fp32's range")


def test_finite_factors_whose_product_overflows_are_refused(base, adapter, tmp_path):
    def huge(tensors):
        for key in tensors:
            if "layers.0.self_attn.q_proj" in key:
                tensors[key].fill_(1e30)

    edit_tensors(adapter, huge)
    assert_refused(
        run("merge", base, adapter, "-o", tmp_path / "out"), "model.layers.0.self_attn.q_proj.weight", "overflow fp32"
    )
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
    assert_refused(
        run("merge", base, adapter, "-o", tmp_path / "out"), "use_dora is true", "lacks a lora_magnitude_vector"
    )


def test_adapter_with_zero_tensors_is_refused(base, adapter, tmp_path):
    save_file({}, adapter / "adapter_model.safetensors")
    assert_refused(run("merge", base, adapter, "-o", tmp_path / "out"), "holds no tensors")
    assert_refused(run("inspect", adapter), "holds no tensors")


@pytest.mark.parametrize("config", [b"{not json", b"\xff\xfe{}", b"[1, 2]", b'{"r": 8}'])
def test_inspect_names_a_broken_adapter_config(adapter, config):
    (adapter / "adapter_config.json").write_bytes(config)
    assert_refused(run("inspect", adapter), str(adapter / "adapter_config.json"))


# -- item 8: adapter_config.json values are validated up front ----------------------------------------


@pytest.mark.parametrize(
    "changes, fragments",
    [
        ({"r": None}, ["r is None", "positive integer"]),
        ({"r": "8"}, ["r is '8'", "positive integer"]),
        ({"r": 0}, ["r is 0"]),
        ({"lora_alpha": "16"}, ["lora_alpha is '16'", "finite number"]),
        ({"lora_alpha": True}, ["lora_alpha is True"]),
        ({"rank_pattern": {"q_proj(": 4}}, ["rank_pattern key", "not a valid regex"]),
        ({"alpha_pattern": {"[q": 4}}, ["alpha_pattern key", "not a valid regex"]),
        ({"rank_pattern": {"q_proj": "4"}}, ["rank_pattern['q_proj'] is '4'"]),
        ({"alpha_pattern": ["q_proj"]}, ["alpha_pattern is ['q_proj']"]),
        ({"use_rslora": "yes"}, ["use_rslora is 'yes'", "true or false"]),
        ({"target_modules": "(unclosed"}, ["target_modules", "not a valid regex"]),
        ({"target_modules": 3}, ["target_modules is 3"]),
        ({"peft_type": 7}, ["peft_type is 7"]),
    ],
)
def test_bad_config_values_are_named(base, adapter, tmp_path, changes, fragments):
    edit_config(adapter, **changes)
    assert_refused(run("merge", base, adapter, "-o", tmp_path / "out"), "adapter_config.json", *fragments)
    assert_refused(run("inspect", adapter), *fragments)


@pytest.mark.parametrize("shape", [(), (8,)])
def test_factor_that_is_not_a_matrix_is_named(base, adapter, tmp_path, shape):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    edit_tensors(adapter, lambda t: t.update({key: torch.ones(shape)}))
    assert_refused(run("merge", base, adapter, "-o", tmp_path / "out"), key, f"has shape {shape}")


def test_dora_magnitude_of_the_wrong_length_is_refused_before_writing(base, tmp_path):
    from fixtures.make_fixtures import make_lora

    dora = make_lora("llama", base, tmp_path / "dora", use_dora=True)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"
    edit_tensors(dora, lambda t: t.update({key: t[key][:-3]}))
    assert_refused(run("merge", base, dora, "-o", tmp_path / "out"), "DoRA magnitude has shape (61,)")
    assert not (tmp_path / "out").exists()


def test_mlx_config_values_are_named(base, tmp_path):
    from fixtures.make_fixtures import make_lora
    from surgeon.formats import read_adapter, write_adapter

    mlx = tmp_path / "mlx"
    write_adapter(read_adapter(make_lora("llama", base, tmp_path / "peft")), mlx, "mlx")
    config = json.loads((mlx / "adapter_config.json").read_text())
    for field, value, fragment in [
        ("scale", "2", "lora_parameters.scale is '2'"),
        ("scale", float("inf"), "is inf"),
        ("scale", 1e300, "within fp32's range"),
        ("rank", -1, "lora_parameters.rank is -1"),
    ]:
        broken = {**config, "lora_parameters": {**config["lora_parameters"], field: value}}
        (mlx / "adapter_config.json").write_text(json.dumps(broken))
        assert_refused(run("merge", base, mlx, "-o", tmp_path / "out"), fragment)


# -- item 9: base-side metadata -----------------------------------------------------------------------


def _sharded_base(base: Path, tmp_path: Path, weight_map) -> Path:
    copy = Path(shutil.copytree(base, tmp_path / "base"))
    (copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return copy


@pytest.mark.parametrize(
    "weight_map, fragment",
    [
        (["model.safetensors"], "weight_map is not a mapping"),
        ({"model.norm.weight": 3}, "weight_map is not a mapping"),
        ({"model.norm.weight": "/etc/passwd"}, "'/etc/passwd'"),
        ({"model.norm.weight": "../tiny-llama/model.safetensors"}, "'../tiny-llama/model.safetensors'"),
        ({"model.norm.weight": ".."}, "'..'"),
    ],
)
def test_bad_shard_index_is_refused(base, adapter, tmp_path, weight_map, fragment):
    copy = _sharded_base(base, tmp_path, weight_map)
    assert_refused(run("inspect", copy), fragment)
    assert_refused(run("merge", copy, adapter, "-o", tmp_path / "out"), "model.safetensors.index.json", fragment)


@pytest.mark.parametrize("config", [b"{broken", b"\xff", b"[]", b'{"architectures": "LlamaForCausalLM"}'])
def test_broken_base_config_is_named(base, adapter, tmp_path, config):
    copy = Path(shutil.copytree(base, tmp_path / "base"))
    (copy / "config.json").write_bytes(config)
    assert_refused(run("inspect", copy), "config.json")
    assert_refused(run("merge", copy, adapter, "-o", tmp_path / "out", "--dtype", "bf16"), "config.json")
    assert not (tmp_path / "out").exists()
    assert_refused(run("convert", adapter, "--to", "gguf", "--base", copy, "-o", tmp_path / "a.gguf"), "config.json")


@pytest.mark.parametrize(
    "changes",
    [{"num_attention_heads": 0}, {"num_hidden_layers": None}, {"num_key_value_heads": "2"}, {"num_attention_heads": 3}],
)
def test_gguf_needs_sound_head_and_layer_counts(base, adapter, tmp_path, changes):
    copy = Path(shutil.copytree(base, tmp_path / "base"))
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    if config["num_hidden_layers"] is None:
        del config["num_hidden_layers"]
    (copy / "config.json").write_text(json.dumps(config))
    assert_refused(run("convert", adapter, "--to", "gguf", "--base", copy, "-o", tmp_path / "a.gguf"))
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_device_that_cannot_hold_results_is_refused(base, adapter, tmp_path, device):
    assert_refused(
        run("merge", base, adapter, "-o", tmp_path / "out", "--device", device), f"unknown device {device!r}"
    )


# -- item 12: Hub paths stay inside the repository's cache folder ------------------------------------


@pytest.fixture
def hub_cache(tmp_path, fixtures_dir, monkeypatch) -> Path:
    """org/lora in an offline Hub cache under tmp_path, and a credentials file beside the cache."""
    from huggingface_hub import constants
    from test_hub import folder_files, write_cache

    cache = tmp_path / "hf-home" / "hub"
    write_cache(cache, "org/lora", folder_files(fixtures_dir / "tiny-llama-lora"), "b" * 40)
    (tmp_path / "hf-home" / "credentials.json").write_text('{"token": "secret"}')
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize(
    "uri", ["hf://org/lora/../../..", "hf://org/lora@../../x/y", "hf://org/lora@main/..", "hf://org/lora/a\\..\\b"]
)
def test_hub_path_that_climbs_out_is_refused(hub_cache, tmp_path, uri):
    for args in (["pull", uri, "-o", tmp_path / "out"], ["inspect", uri], ["merge", uri, uri, "-o", tmp_path / "out"]):
        result = run(*args)
        assert result.exit_code != 0 and "climbs out of the repository" in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert not (tmp_path / "out").exists()


def test_hub_snapshot_link_leading_outside_the_cache_is_refused(hub_cache, tmp_path):
    assert run("pull", "hf://org/lora", "-o", tmp_path / "fine").exit_code == 0
    secret = tmp_path / "credentials.json"
    secret.write_text('{"token": "secret"}')
    (hub_cache / "models--org--lora" / "snapshots" / ("b" * 40) / "credentials.json").symlink_to(secret)
    assert_refused(run("pull", "hf://org/lora", "-o", tmp_path / "out"), "leads outside the repository's cache folder")
    assert not (tmp_path / "out").exists()


# -- item 11 (part): messages say what is actually wrong -----------------------------------------------


def test_random_bytes_in_a_bin_are_not_called_a_pickle_needing_unpickling(adapter, base, tmp_path):
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(bytes(range(256)) * 8)
    result = run("merge", base, adapter, "-o", tmp_path / "out")
    assert_refused(result, "adapter_model.bin: not a readable PyTorch checkpoint")
    assert "full unpickling" not in result.output


def test_a_pickle_with_foreign_globals_still_needs_full_unpickling(adapter, base, tmp_path):
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"weights": Path("x")}, adapter / "adapter_model.bin")
    assert_refused(run("merge", base, adapter, "-o", tmp_path / "out"), "needs full unpickling")


def test_factors_whose_ranks_differ_are_named(base, adapter, tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    edit_tensors(adapter, lambda t: t.update({key: t[key].T.contiguous()}))
    assert_refused(
        run("merge", base, adapter, "-o", tmp_path / "out"), "'model.layers.0.self_attn.q_proj'", "ranks differ"
    )


# -- found by tests/test_fuzz.py ------------------------------------------------------------------


def _delta(adapter: Path, key: str) -> torch.Tensor:
    from surgeon.formats import read_adapter

    return sum(d.materialize() for d in read_adapter(adapter).deltas[key])


def test_svd_of_factors_whose_norms_pass_fp32_is_exact(adapter, tmp_path):
    """A factor row of entries near fp32's largest: its norm overflows fp32 but ΔW does not, so the
    SVD (resize, compose --method svd) is done in fp64 instead of failing to converge."""
    key = "model.layers.0.self_attn.q_proj.weight"
    edit_tensors(adapter, lambda t: t[f"base_model.model.{key[:-7]}.lora_A.weight"][0, :4].fill_(3e38))
    result = run("resize", adapter, "--rank", "8", "-o", tmp_path / "out")
    assert result.exit_code == 0, (result.output, result.exception)
    expected, found = _delta(adapter, key), _delta(tmp_path / "out", key)
    assert torch.isfinite(found).all() and torch.allclose(found, expected, rtol=1e-4, atol=expected.abs().max() * 1e-5)


@pytest.mark.parametrize("method", ["svd", "linear"])
def test_composition_beyond_the_factors_dtype_is_refused(adapter, tmp_path, method):
    """fp16 factors times a weight fp32 holds: the composed factors overflow fp16 and are refused, not
    written as Inf."""
    edit_tensors(adapter, lambda t: t.update({k: v.half() for k, v in t.items()}))
    result = run("compose", adapter, "-w", "1e30", "--method", method, "-o", tmp_path / "out")
    assert_refused(result, "beyond the range of its dtype")
    assert not (tmp_path / "out").exists()


def _edit_json(file: Path, change) -> None:
    config = json.loads(file.read_text())
    change(config)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "kind, field",
    [
        ("peft", "base_model_name_or_path"),
        ("adapterhub", "model_name"),
        ("sparse", "base_model_name_or_path"),
        ("mlx", "model"),
    ],
)
def test_a_recorded_base_model_that_is_not_a_string_is_named(fixtures_dir, base, tmp_path, kind, field):
    """compose compares the recorded base names; a number or an object there is the config's fault."""
    peft, out = fixtures_dir / "tiny-llama-lora", tmp_path / "a"
    made = {
        "peft": lambda: shutil.copytree(peft, out),
        "adapterhub": lambda: shutil.copytree(fixtures_dir / "adapterhub" / "llama-lora", out),
        "sparse": lambda: run("compose", peft, "--method", "ties", "--density", "0.5", "--as", "sparse", "-o", out),
        "mlx": lambda: run("convert", peft, "--to", "mlx", "-o", out),
    }[kind]()
    assert getattr(made, "exit_code", 0) == 0, made.output
    _edit_json(next(out.glob("*config.json")), lambda c: c.update({field: {"name": 1}}))
    assert_refused(run("compose", out, out, "-o", tmp_path / "out"), field, "a string")


@pytest.mark.parametrize("saved", [1, "lm_head", [None]])
def test_modules_to_save_that_is_not_a_list_of_names_is_named(adapter, tmp_path, saved):
    edit_config(adapter, modules_to_save=saved)
    assert_refused(run("convert", adapter, "--to", "peft", "-o", tmp_path / "out"), "modules_to_save", "a list")


@pytest.mark.parametrize("field, value", [("r", "4"), ("r", None), ("alpha", float("inf")), ("alpha", [2])])
def test_adapterhub_rank_and_alpha_are_checked(fixtures_dir, base, tmp_path, field, value):
    adapter = Path(shutil.copytree(fixtures_dir / "adapterhub" / "llama-lora", tmp_path / "a"))
    _edit_json(adapter / "adapter_config.json", lambda c: c["config"].update({field: value}))
    assert_refused(run("merge", base, adapter, "-o", tmp_path / "out"), f"config.{field}")


def test_a_bnb_quant_state_stored_under_another_dtype_is_read_as_its_bytes(base, tmp_path):
    """A quant state is JSON in a byte tensor; the header-only inspect reads its bytes whatever the
    dtype says, and so does the reader (numpy has no float8)."""
    pytest.importorskip("bitsandbytes")
    import transformers

    options = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=options, device_map="cpu")
    model.save_pretrained(tmp_path / "bnb")
    file = tmp_path / "bnb" / "model.safetensors"
    header, data = header_of(file.read_bytes())
    state = next(k for k in header if ".quant_state." in k)
    header[state]["dtype"] = "F8_E5M2"
    file.write_bytes(with_header(header, data))
    assert run("inspect", tmp_path / "bnb").exit_code == 0
    result = run("extract", base, tmp_path / "bnb", "--rank", "2", "-o", tmp_path / "out")
    assert result.exit_code == 0, (result.output, result.exception)


@pytest.mark.parametrize("field,value", [("architecture", {"a": None}), ("configs", 3), ("configs", ["lora"])])
def test_adapterhub_method_fields_are_checked(fixtures_dir, base, tmp_path, field, value):
    """An architecture that is a JSON object was a TypeError (unhashable) in inspect and merge (fuzz seed 2)."""
    adapter = Path(shutil.copytree(fixtures_dir / "adapterhub" / "llama-ia3", tmp_path / "a"))
    _edit_json(adapter / "adapter_config.json", lambda c: c["config"].update({field: value}))
    for command in (("inspect", adapter), ("merge", base, adapter, "-o", tmp_path / "out")):
        assert_refused(run(*command), f'"{field}" is')
