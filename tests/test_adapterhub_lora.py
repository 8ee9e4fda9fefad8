"""AdapterHub LoRA and (IA)³ read as weight deltas, against the adapters library itself.

The adapters library pins transformers 4.57 and is not installed here: its adapters and its outputs were
made once by fixtures/make_adapterhub_lora_fixtures.py (fixtures/adapterhub/: the adapters as
``save_adapter`` wrote them, and in oracle/ the library's logits with the adapter active and its merged
weights as projections onto fixed random probes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from fixtures.make_fixtures import load_base
from surgeon.cli import main

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
HUB = FIXTURES / "adapterhub"


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def oracle(name: str) -> dict[str, torch.Tensor]:
    return load_file(HUB / "oracle" / f"{name}.safetensors")


def base_for(arch: str, expected: dict[str, torch.Tensor], tmp_path: Path) -> Path:
    """The tiny model the fixture was made on: for BERT's (IA)³, with the biases the script drew."""
    biases = {k.removeprefix("base."): v for k, v in expected.items() if k.startswith("base.")}
    if not biases:
        return FIXTURES / f"tiny-{arch}"
    base = tmp_path / "base"
    shutil.copytree(FIXTURES / f"tiny-{arch}", base)
    weights = load_file(base / "model.safetensors")
    save_file({**weights, **biases}, base / "model.safetensors", metadata={"format": "pt"})
    return base


def forward(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.mark.parametrize("name", ["bert-lora", "llama-lora", "bert-ia3", "llama-ia3"])
def test_merge_equals_the_library(tmp_path, name):
    arch = name.split("-")[0]
    expected = oracle(name)
    base = base_for(arch, expected, tmp_path)
    result = run("merge", base, HUB / name, "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    # only llama-ia3 keeps the head files save_adapter wrote (LlamaForCausalLM's lm_head)
    assert ("note:" in result.output and "prediction head" in result.output) == (name == "llama-ia3")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    weights = [k for k in expected if k.endswith(".weight")]
    assert len(weights) >= 6
    for key in weights:
        probe = expected[f"probe.{merged[key].shape[1]}"]
        torch.testing.assert_close(merged[key] @ probe, expected[key], rtol=1e-5, atol=1e-5)
    logits = forward(load_base(arch, tmp_path / "merged"), expected["input_ids"])
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected["logits"], expected["base_logits"], atol=1e-2)


def test_ia3_scales_the_bias_as_the_library_runs_it_not_as_it_merges():
    """The library's (IA)³ multiplies a layer's output, bias included; its merge_adapter scales the weight
    alone, so that its own merged model gives other outputs on a layer with a bias (BERT's): surgeon's
    merge follows the forward pass (test above), and this is why it cannot follow the library's merge."""
    expected = oracle("bert-ia3")
    assert (expected["merged_logits"] - expected["logits"]).abs().max() > 0.1
    assert torch.allclose(oracle("llama-ia3")["merged_logits"], oracle("llama-ia3")["logits"], atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_convert_to_peft_runs_in_peft(tmp_path, arch):
    from peft import PeftModel

    expected = oracle(f"{arch}-lora")
    result = run("convert", HUB / f"{arch}-lora", "--to", "peft", "-o", tmp_path / "peft", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["from"] == "adapterhub"
    model = PeftModel.from_pretrained(load_base(arch, FIXTURES / f"tiny-{arch}"), tmp_path / "peft").eval()
    torch.testing.assert_close(forward(model, expected["input_ids"]), expected["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target,output", [("gguf", "adapter.gguf"), ("mlx", "mlx"), ("kohya", "kohya.safetensors")])
def test_convert_round_trips(tmp_path, target, output):
    result = run(
        "convert", HUB / "llama-lora", "--to", target, "--base", FIXTURES / "tiny-llama", "-o", tmp_path / output
    )
    assert result.exit_code == 0, result.output
    merged = [
        run("merge", FIXTURES / "tiny-llama", a, "-o", tmp_path / f"m{i}")
        for i, a in enumerate([HUB / "llama-lora", tmp_path / output])
    ]
    assert all(r.exit_code == 0 for r in merged), [r.output for r in merged]
    first, second = (load_file(tmp_path / f"m{i}" / "model.safetensors") for i in range(2))
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6)


def test_inspect_says_lora_and_ia3_from_adapterhub():
    summary = json.loads(run("inspect", HUB / "bert-lora", "--json").output)
    assert summary["format"] == "adapterhub" and summary["format_description"].startswith("AdapterHub")
    assert summary["deltas"] == {"LoRA": 10} and summary["rank"] == 4 and summary["scale"] == 3.0
    result = run("inspect", HUB / "llama-ia3", "--base", FIXTURES / "tiny-llama", "--json")
    summary = json.loads(result.output)
    assert summary["format"] == "adapterhub-ia3" and summary["targets"] == 6
    assert {m["delta"] for m in summary["modules"]} == {"(IA)³ scaling"}


def edited(tmp_path: Path, name: str, **config) -> Path:
    """A copy of a library-saved adapter with options of its inner config changed."""
    copy = tmp_path / name
    shutil.copytree(HUB / name, copy)
    full = json.loads((copy / "adapter_config.json").read_text())
    full["config"].update(config)
    (copy / "adapter_config.json").write_text(json.dumps(full))
    return copy


@pytest.mark.parametrize(
    "name,config,words",
    [
        ("bert-lora", {"use_gating": True}, "gating (use_gating)"),
        ("llama-lora", {"use_dora": True}, "DoRA (use_dora)"),
        ("bert-lora", {"vera_d": 0.1}, "VeRA (vera_d)"),
        ("bert-lora", {"r": 8}, "for r=8"),
    ],
)
def test_what_no_delta_holds_is_refused(tmp_path, name, config, words):
    arch = name.split("-")[0]
    result = run("merge", FIXTURES / f"tiny-{arch}", edited(tmp_path, name, **config), "-o", tmp_path / "out")
    assert result.exit_code == 1 and words in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_an_adapter_for_another_model_is_refused(tmp_path):
    result = run("merge", FIXTURES / "tiny-llama", HUB / "bert-lora", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "encoder.layer.0.attention.self" in result.output
    summary = json.loads(run("inspect", HUB / "bert-ia3", "--json").output)  # described; merged only with the base
    assert summary["family"] == "AdapterHub (IA)³ adapter" and "pass --base" in summary["merge"]
    result = run("convert", HUB / "bert-ia3", "--to", "peft", "-o", tmp_path / "peft")
    assert result.exit_code == 1 and "pass --base" in result.output and not (tmp_path / "peft").exists()


def test_prompt_tuning_is_refused_with_the_reason():
    summary = json.loads(run("inspect", HUB / "bert-prompt", "--json").output)
    assert summary["family"] == "AdapterHub prompt tuning adapter"
    assert "output of the embedding layer" in summary["merge"]
