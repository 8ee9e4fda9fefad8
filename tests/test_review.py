"""Bugs found by a user's-eye review of issues 11, 12 and 15: each test fails on the code before its fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from surgeon.cli import main
from tests.test_output_safety import assert_one_line_error, run


@pytest.mark.parametrize("name", ["notes.txt", "train"])
def test_force_does_not_replace_a_file_surgeon_did_not_write(fixtures_dir, tmp_path, name):
    mine = tmp_path / name
    mine.write_text("my notes\n")
    result = run("convert", fixtures_dir / "tiny-llama-lora", "--to", "ort", "-o", mine, "--force")
    assert_one_line_error(result, name, "--force replaces only")
    assert mine.read_text() == "my notes\n"


def test_force_replaces_its_own_single_file_output_even_without_a_suffix(fixtures_dir, tmp_path):
    out = tmp_path / "adapter"
    command = ["convert", fixtures_dir / "tiny-llama-lora", "--to", "ort", "-o", out]
    assert run(*command).exit_code == 0
    assert run(*command, "--force").exit_code == 0, run(*command, "--force").output


def test_a_plain_pickle_is_refused_in_one_line_without_torch_warnings(tmp_path, recwarn):
    import pickle
    import warnings

    warnings.simplefilter("always")
    path = tmp_path / "weights.bin"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    assert_one_line_error(run("inspect", path), "not a readable PyTorch checkpoint")
    assert not [str(w.message) for w in recwarn.list if "pickle protocol" in str(w.message)]


def test_a_truncated_onnx_runtime_adapter_is_one_line(fixtures_dir, tmp_path):
    adapter = tmp_path / "adapter.onnx_adapter"
    assert run("convert", fixtures_dir / "tiny-llama-lora", "--to", "ort", "-o", adapter).exit_code == 0
    adapter.write_bytes(adapter.read_bytes()[:500])
    assert_one_line_error(run("inspect", adapter), "not a readable ONNX Runtime adapter")


def test_compose_does_not_call_a_non_model_file_a_full_checkpoint(fixtures_dir, tmp_path):
    result = run(
        "compose",
        fixtures_dir / "tiny-llama-lora",
        fixtures_dir / "make_fixtures.py",
        "--base",
        fixtures_dir / "tiny-llama",
        "-o",
        tmp_path / "out",
    )
    assert_one_line_error(result, "make_fixtures.py: a .py file", "not an adapter")


def test_compose_of_full_fine_tunes_without_base_points_at_base(fixtures_dir, tmp_path):
    result = run("compose", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama", "-o", tmp_path / "out")
    assert_one_line_error(result, "tiny-llama: a full model checkpoint", "--base")


@pytest.mark.parametrize("target", ["kohya", "diffusers"])
def test_convert_refuses_a_file_name_that_surgeon_would_not_recognise(fixtures_dir, tmp_path, target):
    out = tmp_path / "adapter"
    result = run(
        "convert", fixtures_dir / "tiny-llama-lora", "--to", target, "-o", out, "--base", fixtures_dir / "tiny-llama"
    )
    assert_one_line_error(result, ".safetensors", "adapter.safetensors")
    assert not out.exists()


def test_extract_with_an_adapter_as_base_does_not_ask_about_an_adapter_argument_it_lacks(fixtures_dir, tmp_path):
    lora, base = fixtures_dir / "tiny-llama-lora", fixtures_dir / "tiny-llama"
    result = run("extract", lora, base, "--rank", "2", "-o", tmp_path / "e")
    assert_one_line_error(result, "BASE is a full", "surgeon merge BASE")
    assert "ADAPTER?" not in result.output


def test_convert_publishes_nothing_when_reading_back_fails_for_a_format_that_needs_no_base(
    fixtures_dir, tmp_path, monkeypatch
):
    import surgeon.formats.ort as ort
    from surgeon.errors import SurgeonError

    def broken(path, base=None):
        raise SurgeonError(f"{path}: not a readable ONNX Runtime adapter (a writer bug).")

    monkeypatch.setattr(ort, "read", broken)
    out = tmp_path / "a.onnx_adapter"
    result = run("convert", fixtures_dir / "tiny-llama-lora", "--to", "ort", "-o", out)
    assert_one_line_error(result, "not a readable ONNX Runtime adapter")
    assert not out.exists()


def _broken_lora(fixtures_dir: Path, tmp_path: Path, change) -> Path:
    import json

    import torch
    from safetensors.torch import load_file, save_file

    adapter = Path(shutil.copytree(fixtures_dir / "tiny-llama-lora", tmp_path / "adapter"))
    tensors = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    change(tensors, config, torch)
    save_file(tensors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


def _wider_lora_b(tensors, config, torch):
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)


def _dora_magnitude_too_long(tensors, config, torch):
    for key in [k for k in tensors if "lora_B" in k]:
        tensors[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.ones(tensors[key].shape[0] + 1)
    config["use_dora"] = True


@pytest.mark.parametrize("change", [_wider_lora_b, _dora_magnitude_too_long])
def test_header_only_inspect_refuses_factor_shapes_the_reader_refuses(fixtures_dir, tmp_path, change):
    adapter = _broken_lora(fixtures_dir, tmp_path, change)
    header = run("inspect", adapter)
    full = run("inspect", adapter, "--base", fixtures_dir / "tiny-llama")
    assert_one_line_error(full, str(adapter), "the file is damaged")
    assert header.output == full.output


def test_a_detection_failure_says_where_the_full_rules_are(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    short = run("inspect", tmp_path / "notes.txt")
    assert_one_line_error(short, "surgeon --verbose")
    assert "What each format looks like" in run("--verbose", "inspect", tmp_path / "notes.txt").output


@pytest.mark.parametrize("command", ["inspect", "resize"])
def test_base_help_names_gguf_which_cannot_be_read_without_it(command):
    assert "GGUF" in " ".join(run(command, "--help").output.split())


def _nan_in_lora_b(tensors, config, torch):
    tensors[next(k for k in tensors if "lora_B" in k)][0, 0] = float("nan")


@pytest.mark.parametrize(
    "command",
    [
        ["resize", "--rank", "2"],
        ["compose"],
        ["compose", "--method", "svd", "--rank", "2"],
        ["convert", "--to", "mlx"],
    ],
)
def test_commands_without_allow_nonfinite_refuse_a_nan_adapter(fixtures_dir, tmp_path, command):
    adapter = _broken_lora(fixtures_dir, tmp_path, _nan_in_lora_b)
    result = run(command[0], adapter, *command[1:], "-o", tmp_path / "out")
    assert_one_line_error(result, "holds NaN or Inf")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tuned(fixtures_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "merged"
    assert run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", out).exit_code == 0
    return out


@pytest.mark.parametrize("files", [["--plot", "spectra.xyz"], ["--report", "same.json", "--plot", "same.json"]])
def test_extract_refuses_a_plot_it_cannot_write_before_any_work(fixtures_dir, tuned, tmp_path, monkeypatch, files):
    monkeypatch.chdir(tmp_path)
    result = run("extract", fixtures_dir / "tiny-llama", tuned, "--rank", "2", "-o", "adapter", *files)
    assert_one_line_error(result, files[-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", [".", "sub"])
def test_unmerge_never_writes_over_or_into_its_check_base(fixtures_dir, tuned, tmp_path, where):
    check = Path(shutil.copytree(fixtures_dir / "tiny-llama", tmp_path / "base"))
    before = (check / "model.safetensors").read_bytes()
    result = run("unmerge", tuned, fixtures_dir / "tiny-llama-lora", "-o", check / where, "--check", check, "--force")
    assert_one_line_error(result, "the input")
    assert (check / "model.safetensors").read_bytes() == before and not (check / "sub").exists()


def test_pull_never_writes_into_the_hub_cache_it_reads(tmp_path):
    from test_hub import FIXTURES, folder_files, hub_env, surgeon, write_cache

    write_cache(tmp_path / "hf-home" / "hub", "org/lora", folder_files(FIXTURES / "tiny-llama-lora"), "b" * 40)
    snapshot = tmp_path / "hf-home" / "hub" / "models--org--lora" / "snapshots" / ("b" * 40)
    done = surgeon(hub_env(tmp_path, HF_HUB_OFFLINE="1"), "pull", "hf://org/lora", "-o", str(snapshot / "copy"))
    assert done.returncode == 1 and "inside the input" in done.stderr, done.stderr
    assert not (snapshot / "copy").exists()


def test_an_output_under_a_file_says_the_file_is_no_folder(fixtures_dir, tmp_path):
    (tmp_path / "notes").write_text("mine")
    out = tmp_path / "notes" / "out"
    result = run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", out)
    assert_one_line_error(result, f"{tmp_path / 'notes'} is a file, not a folder")


def test_extract_writes_nothing_when_its_report_cannot_be_written(fixtures_dir, tuned, tmp_path):
    (tmp_path / "notes").write_text("mine")
    result = run(
        "extract",
        fixtures_dir / "tiny-llama",
        tuned,
        "--rank",
        "2",
        "-o",
        tmp_path / "adapter",
        "--report",
        tmp_path / "notes" / "report.json",
    )
    assert_one_line_error(result, "notes")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["merge", "fixtures/tiny-llama-lora", "fixtures/tiny-llama", "-o", "x"],  # swapped BASE and ADAPTER
        ["unmerge", "fixtures/tiny-llama", "fixtures/tiny-llama", "-o", "x"],  # a checkpoint as ADAPTER
        ["extract", "fixtures/tiny-llama", "fixtures/tiny-llama-lora", "--rank", "2", "-o", "x"],  # an adapter as TUNED
        ["merge", "fixtures/tiny-llama", "fixtures/tiny-llama-lora", "-o", "x", "--shard-size", "0"],
        ["convert", "fixtures/tiny-llama-lora", "--to", "kohya", "-o", "x"],  # a name kohya files are not known by
    ],
)
def test_argument_and_detection_errors_import_no_torch(args):
    from test_fast_cli import run_fresh

    found = run_fresh(*args)
    assert found["code"] == 1 and found["heavy"] == [], found


@pytest.mark.parametrize(
    "command",
    [
        ["merge", "tiny-llama", "tiny-llama-lora", "-o", ""],
        ["convert", "tiny-llama-lora", "--to", "kohya", "-o", " "],
        ["extract", "tiny-llama", "tiny-llama", "-o", "OUT", "--rank", "2", "--report", ""],
        ["export-onnx", "tiny-llama", "-o", ""],
    ],
)
def test_an_empty_output_path_is_refused_rather_than_read_as_the_current_folder(fixtures_dir, tmp_path, command):
    arguments = [str(fixtures_dir / a) if a.startswith("tiny-") else a for a in command]
    arguments = [str(tmp_path / "out") if a == "OUT" else a for a in arguments]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2 and "is empty; name the output to write" in result.output
    assert list(tmp_path.iterdir()) == []
