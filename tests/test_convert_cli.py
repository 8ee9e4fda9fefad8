"""``surgeon convert`` through click: reports, the notes on what a format could not hold as it was,
refusals that leave nothing behind, and a PEFT → mlx → PEFT trip that PEFT itself loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from deploy_variants import BASE, assert_close_relative, base_state, peft_merged, variant
from surgeon.cli import main


@pytest.fixture(scope="session")
def variants_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-variants")


def convert(*args: str):
    return CliRunner().invoke(main, ["convert", *map(str, args)], catch_exceptions=False)


@pytest.mark.parametrize(
    ("fmt", "output"), [("mlx", "out"), ("gguf", "out.gguf"), ("ort", "out.onnx_adapter"), ("peft", "out")]
)
def test_json_report(fmt, output, variants_root, tmp_path):
    out = tmp_path / output
    result = convert(variant("plain", variants_root), "--to", fmt, "--base", BASE, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["from"] == "peft" and report["to"] == fmt and report["targets"] == 14
    assert report["deltas"] == {"LoRA": 14}  # what the user knows, not a class name
    assert report["check"]["max_relative_error"] < 1e-6
    assert out.is_dir() == (fmt in ("mlx", "peft")) and out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [output]  # no staging left beside it


def test_lossy_layout_changes_are_noted_in_text_and_json(variants_root, tmp_path):
    source = variant("rslora", variants_root)
    result = convert(source, "--to", "mlx", "-o", tmp_path / "mlx")
    assert result.exit_code == 0, result.output
    assert (
        "note:" in result.output and "zero-padded to rank 8" in result.output and "folded into lora_b" in result.output
    )
    report = json.loads(convert(source, "--to", "gguf", "--base", BASE, "-o", tmp_path / "a.gguf", "--json").output)
    assert any("rsLoRA" in note and "folded into their lora_b" in note for note in report["notes"])
    assert any("reordered by rows" in note and "llama.cpp" in note for note in report["notes"])


def test_peft_to_mlx_and_back_loads_in_peft(variants_root, tmp_path):
    from peft import PeftModel

    from fixtures.make_fixtures import load_base

    source = variant("patterns", variants_root)
    assert convert(source, "--to", "mlx", "-o", tmp_path / "mlx").exit_code == 0
    result = convert(tmp_path / "mlx", "--to", "peft", "-o", tmp_path / "peft", "--json")
    assert result.exit_code == 0, result.output
    merged = PeftModel.from_pretrained(load_base("llama", BASE), tmp_path / "peft").merge_and_unload().state_dict()
    expected, base = peft_merged(source), base_state()
    for key, weight in expected.items():
        if torch.equal(weight, base[key]):
            assert torch.equal(merged[key], base[key]), key
        else:
            assert_close_relative(merged[key] - base[key], weight - base[key], key)


def test_refusal_names_the_reason_and_writes_nothing(variants_root, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "convert",
            str(variant("dora", variants_root)),
            "--to",
            "gguf",
            "--base",
            str(BASE),
            "-o",
            str(tmp_path / "a.gguf"),
        ],
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "DoRA" in result.output
    assert list(tmp_path.iterdir()) == []


def test_gguf_without_base_asks_for_it(variants_root, tmp_path):
    result = CliRunner().invoke(
        main, ["convert", str(variant("plain", variants_root)), "--to", "gguf", "-o", str(tmp_path / "a.gguf")]
    )
    assert result.exit_code == 1 and "--base" in result.output


def test_unknown_layout_lists_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("not an adapter")
    result = CliRunner().invoke(
        main, ["convert", str(tmp_path / "notes.txt"), "--to", "peft", "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 1 and "not an adapter" in result.output and len(result.output.splitlines()) == 1
    verbose = CliRunner().invoke(
        main, ["-v", "convert", str(tmp_path / "notes.txt"), "--to", "peft", "-o", str(tmp_path / "out")]
    )
    assert "mlx:" in verbose.output and "gguf:" in verbose.output and "ort:" in verbose.output


def test_existing_output_needs_force_and_from_overrides_detection(variants_root, tmp_path):
    out = tmp_path / "a.onnx_adapter"
    assert convert(variant("plain", variants_root), "--to", "ort", "-o", out).exit_code == 0
    again = CliRunner().invoke(main, ["convert", str(variant("plain", variants_root)), "--to", "ort", "-o", str(out)])
    assert again.exit_code == 1 and "--force" in again.output
    assert convert(variant("plain", variants_root), "--to", "ort", "-o", out, "--force").exit_code == 0
    wrong = CliRunner().invoke(
        main, ["convert", str(out), "--from", "gguf", "--base", str(BASE), "--to", "peft", "-o", str(tmp_path / "p")]
    )
    assert wrong.exit_code == 1 and isinstance(wrong.exception, SystemExit), (
        wrong.exception
    )  # an Error: line, not a crash
