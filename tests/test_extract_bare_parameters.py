"""A full fine-tune of a ViT changes ``vit.embeddings.cls_token`` and ``position_embeddings``: bare
parameters of the embeddings module, which no LoRA can sit on. PEFT keeps them only by copying the
module whole (modules_to_save), with every parameter inside it, so extract writes the module whole
(its patch projection's tuned weight included) and PEFT reproduces the tuned model; left out by
choice, they are listed in the report with their change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny_vision import tiny_vit

from surgeon.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PIXELS = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
BARE = ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny ViT and its 'full fine-tune': rank-2 changes on every matrix, random ones on the bare parameters."""
    root = tmp_path_factory.mktemp("vit-tune")
    tiny_vit().save_pretrained(root / "base")
    shutil.copytree(root / "base", root / "tuned")
    state = load_file(root / "tuned" / "model.safetensors")
    gen = torch.Generator().manual_seed(2)
    for key, value in state.items():
        if value.dim() >= 2 and key not in BARE:
            m = value.shape[0]
            state[key] = value + 0.1 * (
                torch.randn(m, 2, generator=gen) @ torch.randn(2, value[0].numel(), generator=gen)
            ).view(value.shape)
        elif key in BARE:
            state[key] = value + 0.5 * torch.randn(value.shape, generator=gen)
    save_file(state, root / "tuned" / "model.safetensors", metadata={"format": "pt"})
    return root / "base", root / "tuned"


def logits(path: Path, adapter: Path | None = None) -> torch.Tensor:
    model = transformers.ViTForImageClassification.from_pretrained(path)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(**PIXELS).logits


def extract(pair, out: Path, *flags) -> dict:
    args = ["extract", *map(str, pair), "-o", str(out), "--rank", "2", "--json", *flags]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_bare_parameters_go_whole_with_their_module_and_peft_gives_the_tuned_logits(pair, tmp_path):
    report = extract(pair, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["vit.embeddings"]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {f"base_model.model.{k}" for k in BARE} <= set(saved)
    rows = {row["key"]: row for row in report["modules"]}
    projection = rows["vit.embeddings.patch_embeddings.projection.weight"]
    assert projection["action"] == "replace" and "vit.embeddings" in projection["reason"]
    expected = logits(pair[1])
    assert not torch.allclose(logits(pair[0]), expected, atol=1e-2)
    torch.testing.assert_close(logits(pair[0], tmp_path / "adapter"), expected, atol=1e-4, rtol=1e-4)


def test_left_out_by_choice_they_are_listed_with_their_change(pair, tmp_path):
    report = extract(pair, tmp_path / "adapter", "--skip-changed-1d")
    left = {row["key"]: row for row in report["left_out"]}
    assert set(BARE) <= set(left) and all(left[k]["delta_norm"] > 0 for k in BARE)
    assert "bare parameter" in left[BARE[0]]["reason"] and report["left_out_share"] > 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not config.get("modules_to_save")


def test_a_parameter_of_the_model_itself_is_left_out_and_listed(tmp_path):
    """CLIP's ``logit_scale`` belongs to no module PEFT could copy whole: it is listed as left out,
    and the adapter PEFT loads holds the rest."""
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    text.update(max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8)
    config = transformers.CLIPConfig(text_config=text, vision_config={**vision, "patch_size": 4}, projection_dim=8)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(tmp_path / "base")
    shutil.copytree(tmp_path / "base", tmp_path / "tuned")
    state = load_file(tmp_path / "tuned" / "model.safetensors")
    state["logit_scale"] = state["logit_scale"] + 0.5
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    state[key] = state[key] + 0.1 * torch.ones(16, 1) @ torch.ones(1, 16)
    save_file(state, tmp_path / "tuned" / "model.safetensors", metadata={"format": "pt"})
    report = extract((tmp_path / "base", tmp_path / "tuned"), tmp_path / "adapter")
    assert [row["key"] for row in report["left_out"]] == ["logit_scale"]
    peft.PeftModel.from_pretrained(transformers.CLIPModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
