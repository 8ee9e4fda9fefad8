"""MoE experts under transformers 5 and PEFT 0.21: ``all-linear`` on Mixtral, Qwen3-MoE or OLMoE puts
LoRA on the stacked expert tensors (``target_parameters``, PEFT's ``ParamWrapper``) and on the router's
weight, while the checkpoint on disk keeps one tensor per expert (``experts.N.w1.weight``). Against the
real producers: what surgeon merges is what PEFT's ``merge_and_unload`` saves, unmerge takes it back off,
and what extract writes PEFT loads and runs as the tuned model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_runs import invoke, refused
from safetensors.torch import load_file, save_file

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


def _gpt_oss():
    """Experts stored fused and transposed (experts × in × out, ``is_transposed``), in the checkpoint too."""
    config = transformers.GptOssConfig(
        **SIZES, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=None
    )
    return transformers.GptOssForCausalLM(config)


MODELS = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    for name, build in {**MODELS, "gpt_oss": _gpt_oss}.items():
        torch.manual_seed(0)
        build().save_pretrained(root / name)
    return {name: root / name for name in [*MODELS, "gpt_oss"]}


def load(path: Path):
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture).from_pretrained(path)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**IDS).logits


CONFIGS = {
    "all-linear": dict(target_modules="all-linear"),
    "parameters": dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
    "experts only": dict(target_parameters=["experts.down_proj"]),
}


def peft_adapter(base: Path, out: Path, targets: str = "all-linear"):
    """A PEFT LoRA made and saved by PEFT itself, every lora_B random; returns the PeftModel it saved."""
    torch.manual_seed(3)
    config = peft.LoraConfig(r=2, lora_alpha=6, init_lora_weights=False, **CONFIGS[targets])
    model = peft.get_peft_model(load(base), config)
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize(
    "name, targets",
    [(name, targets) for name in MODELS for targets in ("all-linear", "parameters")]
    + [("mixtral", "experts only"), ("gpt_oss", "parameters")],
)
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
    assert any(".experts." in k and not torch.equal(base[k], ours[k]) for k in base)
    torch.testing.assert_close(logits(load(tmp_path / "merged")), expected, atol=1e-5, rtol=1e-5)

    invoke("unmerge", tmp_path / "merged", tmp_path / "adapter", "-o", tmp_path / "unmerged")
    back = load_file(tmp_path / "unmerged" / "model.safetensors")
    for key in base:
        torch.testing.assert_close(back[key], base[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize(
    "name, targets",
    [("mixtral", "all-linear"), ("qwen3_moe", "all-linear"), ("mixtral", "experts only"), ("gpt_oss", "parameters")],
)
def test_convert_to_peft_writes_what_peft_loads(name, targets, bases, tmp_path):
    """Through the canonical per-checkpoint-tensor deltas and back: PEFT loads the written adapter
    (stacked experts and the router as target_parameters) and runs the same forward."""
    expected = logits(peft_adapter(bases[name], tmp_path / "adapter", targets))
    invoke("convert", tmp_path / "adapter", "--to", "peft", "--base", bases[name], "-o", tmp_path / "again")
    model = peft.PeftModel.from_pretrained(load(bases[name]), tmp_path / "again")
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)


def tune(base: Path, out: Path) -> None:
    """A full 'fine-tune' whose change has a different rank per tensor (1 to 3), the 4-row routers changed whole."""
    shutil.copytree(base, out)
    state = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(2)
    for i, (key, value) in enumerate(sorted(state.items())):
        if value.dim() == 2 and ".layers." in key:
            m, n = value.shape
            rank = m if m == 4 else 1 + i % 3
            state[key] = value + 0.3 * torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("budget", [["--rank", "5"], ["--energy", "0.99999"]])
def test_extracted_adapter_loads_in_peft_as_the_tuned_model(budget, bases, tmp_path):
    """Ranks differ per module (the router's 4 rows cap it at 4): PEFT must find each rank under the
    name it gives the module or parameter, and the experts as it stacks them."""
    base = bases["mixtral"]
    tune(base, tmp_path / "tuned")
    invoke("extract", base, tmp_path / "tuned", "-o", tmp_path / "adapter", *budget)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and "model.layers.0.mlp.gate.weight" in config["target_parameters"], config
    model = peft.PeftModel.from_pretrained(load(base), tmp_path / "adapter")
    expected = logits(load(tmp_path / "tuned"))
    assert not torch.allclose(logits(load(base)), expected, atol=1e-3)
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=1e-4)


def test_mlx_lm_runs_expert_lora_as_peft_does(bases, tmp_path):
    """Stacked experts become mlx-lm's LoRASwitchLinear on switch_mlp (named by mlx-lm's own sanitize).
    Mixtral only: mlx-lm 0.32 cannot build Qwen3-MoE from the config transformers 5 saves (no rope_theta)."""
    name = "mixtral"
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tuner.utils import load_adapters

    expected = logits(peft_adapter(bases[name], tmp_path / "adapter"))
    invoke("convert", tmp_path / "adapter", "--to", "mlx", "--base", bases[name], "-o", tmp_path / "mlx")
    model, _ = mlx_lm_utils.load_model(bases[name])
    load_adapters(model, str(tmp_path / "mlx"))
    assert any(".switch_mlp." in k for k in load_file(tmp_path / "mlx" / "adapters.safetensors"))
    ours = torch.from_numpy(np.array(model(mx.array(IDS["input_ids"].tolist()))))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_inspect_describes_expert_lora_against_the_base(bases, tmp_path, monkeypatch):
    """With --base, or without it from the base PEFT recorded: the local folder it loaded the model
    from, or a Hub id whose config.json alone the Hub cache holds; where the recorded base is nowhere
    at hand, --base is asked for."""
    from huggingface_hub import constants
    from test_hub import write_cache

    peft_adapter(bases["mixtral"], tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    assert config["base_model_name_or_path"] == str(bases["mixtral"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    write_cache(
        tmp_path / "cache", "org/mixtral", {"config.json": (bases["mixtral"] / "config.json").read_bytes()}, "c" * 40
    )
    for recorded, base in [(None, ["--base", bases["mixtral"]]), (None, []), ("org/mixtral", [])]:
        if recorded:
            config_file.write_text(json.dumps({**config, "base_model_name_or_path": recorded}))
        out = invoke("inspect", tmp_path / "adapter", *base)
        assert "LoRA r=4 scale=3 on each of 4 experts" in out and "mlp.experts.down_proj" in out, out
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": "org/elsewhere"}))
    assert "--base" in refused("inspect", tmp_path / "adapter")


def test_merge_of_an_mlx_lm_switch_adapter_is_what_mlx_lm_fuses(bases, tmp_path):
    """An adapter mlx-lm itself made on Mixtral's switch_mlp: surgeon merges each expert's rows into
    its own checkpoint tensor as mlx-lm's LoRASwitchLinear.fuse computes them."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm_utils.load_model(bases["mixtral"])
    parameters = {"rank": 2, "scale": 1.5, "dropout": 0.0, "keys": ["block_sparse_moe.switch_mlp.gate_proj"]}
    model.freeze()
    linear_to_lora_layers(model, 1, parameters)
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = mx.random.normal(module.lora_b.shape)
    (tmp_path / "mlx").mkdir()
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(tmp_path / "mlx" / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": parameters}
    (tmp_path / "mlx" / "adapter_config.json").write_text(json.dumps(config))
    fused = np.array(model.model.layers[1].block_sparse_moe.switch_mlp.gate_proj.fuse().weight)
    invoke("merge", bases["mixtral"], tmp_path / "mlx", "-o", tmp_path / "merged")
    merged, base = (
        load_file(tmp_path / "merged" / "model.safetensors"),
        load_file(bases["mixtral"] / "model.safetensors"),
    )
    for expert in range(4):
        key = f"model.layers.1.block_sparse_moe.experts.{expert}.w1.weight"
        assert not torch.equal(merged[key], base[key])
        torch.testing.assert_close(merged[key], torch.from_numpy(fused[expert]), atol=1e-5, rtol=1e-5)
