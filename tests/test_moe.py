"""MoE experts under transformers 5 and PEFT 0.21: ``all-linear`` on Mixtral, Qwen3-MoE or OLMoE puts
LoRA on the stacked expert tensors (``target_parameters``, PEFT's ``ParamWrapper``) and on the router's
weight, while the checkpoint on disk keeps one tensor per expert (``experts.N.w1.weight``). Against the
real producers: what surgeon merges is what PEFT's ``merge_and_unload`` saves, unmerge takes it back off,
and what extract writes PEFT loads and runs as the tuned model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from surgeon.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers.conversion_mapping")  # the expert fusion is transformers 5's

SIZES = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
IDS = {"input_ids": torch.tensor([[1, 5, 9, 17, 33, 60, 2, 7]])}


def _mixtral():
    config = transformers.MixtralConfig(**SIZES, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(config)


def _qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        **SIZES, intermediate_size=24, moe_intermediate_size=12, num_experts=4, num_experts_per_tok=2, head_dim=8
    )
    return transformers.Qwen3MoeForCausalLM(config)


MODELS = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    for name, build in MODELS.items():
        torch.manual_seed(0)
        build().save_pretrained(root / name)
    return {name: root / name for name in MODELS}


def load(path: Path):
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture).from_pretrained(path)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**IDS).logits


def invoke(*args) -> str:
    result = CliRunner().invoke(main, [*map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args) -> str:
    result = CliRunner().invoke(main, [*map(str, args)])
    assert result.exit_code == 1 and result.output.startswith("Error: "), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


CONFIGS = {
    "all-linear": dict(target_modules="all-linear"),
    "parameters": dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
}


def peft_adapter(base: Path, out: Path, targets: str = "all-linear"):
    """A PEFT LoRA made and saved by PEFT itself, every lora_B random; returns the PeftModel it saved."""
    torch.manual_seed(3)
    config = peft.LoraConfig(r=2, lora_alpha=6, init_lora_weights=False, **CONFIGS[targets])
    model = peft.get_peft_model(load(base), config)
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("targets", list(CONFIGS))
@pytest.mark.parametrize("name", list(MODELS))
def test_merge_is_what_peft_merges_and_unmerge_takes_it_off(name, targets, bases, tmp_path):
    model = peft_adapter(bases[name], tmp_path / "adapter", targets)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_parameters"], saved  # the adapter is the kind this test is about
    expected = logits(model)
    model.merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    invoke("merge", bases[name], tmp_path / "adapter", "-o", tmp_path / "merged")
    ours, theirs = (
        load_file(tmp_path / "merged" / "model.safetensors"),
        load_file(tmp_path / "peft-merged" / "model.safetensors"),
    )
    base = load_file(bases[name] / "model.safetensors")
    assert set(ours) == set(theirs) == set(base)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=1e-5, msg=key)
    assert any(".experts.3." in k and not torch.equal(base[k], ours[k]) for k in base)
    torch.testing.assert_close(logits(load(tmp_path / "merged")), expected, atol=1e-5, rtol=1e-5)

    invoke("unmerge", tmp_path / "merged", tmp_path / "adapter", "-o", tmp_path / "unmerged")
    back = load_file(tmp_path / "unmerged" / "model.safetensors")
    for key in base:
        torch.testing.assert_close(back[key], base[key], atol=1e-6, rtol=1e-5, msg=key)
