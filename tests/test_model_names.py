"""transformers 5 renames some models' parameters on load (ViT's ``encoder.layer.0.attention.attention.query``
is ``layers.0.attention.q_proj``; Qwen2.5-VL's ``model.layers`` is ``model.language_model.layers``), and PEFT
names adapter tensors by the renamed modules. Against the real consumer: PEFT loads what extract writes and
reproduces the tuned model, surgeon merges what PEFT saved into the weights PEFT computes, and a delta
transformers fuses into another parameter is refused, never dropped."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import invoke
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny_vision import tiny_swiglu_dinov2, tiny_vit

from surgeon.checkpoint import Checkpoint
from surgeon.cli import main
from surgeon.errors import SurgeonError
from surgeon.model_names import model_names

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers.conversion_mapping")  # the renaming is transformers 5's


def _qwen_vl():
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
        max_position_embeddings=64,
        rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},
        bos_token_id=0,
        eos_token_id=1,
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        fullatt_block_indexes=[0],
        patch_size=2,
        spatial_merge_size=1,
        temporal_patch_size=1,
        window_size=4,
    )
    config = transformers.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        vocab_size=128,
        image_token_id=120,
        video_token_id=121,
        vision_start_token_id=122,
    )
    return transformers.Qwen2_5_VLForConditionalGeneration(config)


MODELS = {
    "vit": (tiny_vit, lambda: {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}),
    "qwen2_5_vl": (_qwen_vl, lambda: {"input_ids": torch.tensor([[1, 5, 9, 17, 33, 60]])}),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("renamed")
    made = {}
    for name, (build, _) in MODELS.items():
        torch.manual_seed(0)
        build().save_pretrained(root / name)
        made[name] = root / name
    return made


def logits(name: str, model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**MODELS[name][1]()).logits


def load(path: Path):
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture).from_pretrained(path)


def tune(base: Path, out: Path, select) -> None:
    """A full 'fine-tune': every selected 2-D weight plus a rank-2 delta."""
    shutil.copytree(base, out)
    state = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(2)
    for key, value in state.items():
        if value.dim() == 2 and select(key):
            m, n = value.shape
            state[key] = value + 0.2 * torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})


SELECT = {"vit": lambda key: True, "qwen2_5_vl": lambda key: key.startswith("model.layers.")}


@pytest.mark.parametrize("name", list(MODELS))
def test_peft_loads_extracted_adapter_as_the_tuned_model(name, bases, tmp_path):
    tune(bases[name], tmp_path / "tuned", SELECT[name])
    invoke("extract", bases[name], tmp_path / "tuned", "-o", tmp_path / "adapter", "--rank", "2")
    with_adapter = peft.PeftModel.from_pretrained(load(bases[name]), tmp_path / "adapter")
    expected = logits(name, load(tmp_path / "tuned"))
    assert not torch.allclose(logits(name, load(bases[name])), expected, atol=1e-3)
    torch.testing.assert_close(logits(name, with_adapter), expected, atol=1e-4, rtol=1e-4)
    model_keys = {k for k, _ in load(bases[name]).named_parameters()}
    for key in load_file(tmp_path / "adapter" / "adapter_model.safetensors"):  # named as the model names modules
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        assert module + ".weight" in model_keys, key


TARGETS = {"vit": ["q_proj", "v_proj", "fc1", "classifier"], "qwen2_5_vl": ["q_proj", "v_proj", "down_proj"]}


def peft_adapter(name: str, base: Path, out: Path) -> torch.Tensor:
    """A PEFT LoRA with non-zero B saved to ``out``; returns PEFT's logits with it applied."""
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name], init_lora_weights=False)
    model = peft.get_peft_model(load(base), config)
    model.save_pretrained(out)
    return logits(name, peft.PeftModel.from_pretrained(load(base), out))


@pytest.mark.parametrize("name", list(MODELS))
def test_merge_of_a_peft_adapter_gives_peft_result(name, bases, tmp_path):
    expected = peft_adapter(name, bases[name], tmp_path / "adapter")
    invoke("merge", bases[name], tmp_path / "adapter", "-o", tmp_path / "merged")
    assert not torch.allclose(logits(name, load(bases[name])), expected, atol=1e-3)
    torch.testing.assert_close(logits(name, load(tmp_path / "merged")), expected, atol=1e-4, rtol=1e-4)


def test_convert_peft_to_peft_with_base_keeps_model_names(bases, tmp_path):
    expected = peft_adapter("vit", bases["vit"], tmp_path / "adapter")
    invoke("convert", tmp_path / "adapter", "--to", "peft", "--base", bases["vit"], "-o", tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert set(again) == set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    model = peft.PeftModel.from_pretrained(load(bases["vit"]), tmp_path / "again")
    torch.testing.assert_close(logits("vit", model), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("command", [["resize", "--rank", "4"], ["compose", "--method", "cat"]])
def test_resize_and_compose_against_the_base_write_model_names(command, bases, tmp_path):
    """With --base the adapter is read against the checkpoint's keys; the output is PEFT's names again."""
    expected = peft_adapter("vit", bases["vit"], tmp_path / "adapter")
    invoke(command[0], tmp_path / "adapter", *command[1:], "--base", bases["vit"], "-o", tmp_path / "out")
    model = peft.PeftModel.from_pretrained(load(bases["vit"]), tmp_path / "out")
    torch.testing.assert_close(logits("vit", model), expected, atol=1e-5, rtol=1e-5)


def test_names_come_from_transformers_table(bases):
    names = model_names(Checkpoint(bases["vit"]))
    key = "vit.encoder.layer.0.attention.attention.query.weight"
    assert names.model_name(key, "here") == "vit.layers.0.attention.q_proj.weight"
    assert names.to_checkpoint["vit.layers.1.mlp.fc2.weight"] == "vit.encoder.layer.1.output.dense.weight"
    assert names.to_checkpoint["classifier.weight"] == "classifier.weight"


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory) -> Path:
    """Dinov2 with SwiGLU: its checkpoint's ``mlp.weights_in`` is cut in rows into gate_proj and up_proj on load."""
    path = tmp_path_factory.mktemp("dinov2") / "base"
    tiny_swiglu_dinov2().save_pretrained(path)
    return path


PIXELS = {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))}


def dino_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**PIXELS).logits


def test_a_delta_on_a_tensor_transformers_splits_is_split_for_peft(dinov2, tmp_path):
    tune(dinov2, tmp_path / "tuned", lambda k: "encoder" in k)
    invoke("extract", dinov2, tmp_path / "tuned", "-o", tmp_path / "adapter", "--rank", "2")
    written = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(".mlp.gate_proj.lora_B" in k for k in written) and not any("weights_in" in k for k in written)
    model = peft.PeftModel.from_pretrained(load(dinov2), tmp_path / "adapter")
    torch.testing.assert_close(dino_logits(model), dino_logits(load(tmp_path / "tuned")), atol=1e-4, rtol=1e-4)


def test_peft_deltas_on_split_parameters_merge_into_their_rows(dinov2, tmp_path):
    torch.manual_seed(3)
    config = peft.LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "q_proj"], init_lora_weights=False)
    peft.get_peft_model(load(dinov2), config).save_pretrained(tmp_path / "adapter")
    expected = dino_logits(peft.PeftModel.from_pretrained(load(dinov2), tmp_path / "adapter"))
    invoke("merge", dinov2, tmp_path / "adapter", "-o", tmp_path / "merged")
    assert not torch.allclose(dino_logits(load(dinov2)), expected, atol=1e-3)
    torch.testing.assert_close(dino_logits(load(tmp_path / "merged")), expected, atol=1e-4, rtol=1e-4)


def test_per_expert_deltas_are_written_the_way_peft_converts_them(tmp_path):
    """Mixtral's per-expert w1/w2/w3 are fused on load: the extracted adapter puts their deltas on the
    stacked expert parameters (PEFT's target_parameters) and reproduces the tuned model."""
    config = transformers.MixtralConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "base")
    tune(tmp_path / "base", tmp_path / "tuned", lambda k: ".layers." in k and not k.endswith("gate.weight"))
    invoke("extract", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "adapter", "--rank", "2")
    expert = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    with pytest.raises(SurgeonError, match="fuses or splits"):  # no module of its own: never a silent name
        model_names(Checkpoint(tmp_path / "base")).model_name(expert, "here")
    ids = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]])}
    with torch.no_grad():
        model = peft.PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "adapter").eval()
        torch.testing.assert_close(
            model(**ids).logits, load(tmp_path / "tuned").eval()(**ids).logits, atol=1e-4, rtol=1e-4
        )


def test_without_transformers_the_names_are_refused_not_guessed(bases, tmp_path, monkeypatch):
    peft_adapter("vit", bases["vit"], tmp_path / "adapter")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    args = ["merge", str(bases["vit"]), str(tmp_path / "adapter"), "-o", str(tmp_path / "m")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and result.output.startswith("Error: "), result.output
    assert "ViTForImageClassification" in result.output and "pip install transformers" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "m").exists()
