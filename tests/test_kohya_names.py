"""kohya names under transformers 5: kohya tools name a module by the checkpoint's key with '.' turned
into '_', while transformers 5 renames some models' modules on load (ViT's
``vit.encoder.layer.0.attention.attention.query`` is the module ``vit.layers.0.attention.q_proj``), and
PEFT names adapters by the modules. A kohya file named either way maps to the right checkpoint keys
(checked by merging and by PEFT's logits), one written against the base takes the checkpoint's names,
and a name transformers builds from part of a tensor is refused in one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runs import invoke
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny_vision import tiny_swiglu_dinov2, tiny_vit

from surgeon.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers.conversion_mapping")  # the renaming is transformers 5's

PIXELS = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vit") / "base"
    tiny_vit().save_pretrained(path)
    return path


def load(path: Path):
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture).from_pretrained(path).eval()


def logits(model, pixels=PIXELS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**pixels).logits


@pytest.fixture(scope="module")
def adapter(vit, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A PEFT LoRA on the ViT (named by transformers 5's modules) and PEFT's logits with it."""
    out = tmp_path_factory.mktemp("vit-lora") / "peft"
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False)
    peft.get_peft_model(load(vit), config).save_pretrained(out)
    return out, logits(peft.PeftModel.from_pretrained(load(vit), out))


def test_written_against_the_base_kohya_names_are_the_checkpoints(vit, adapter, tmp_path):
    invoke("convert", adapter[0], "--to", "kohya", "--base", vit, "-o", tmp_path / "k.safetensors")
    stems = {key.split(".")[0] for key in load_file(tmp_path / "k.safetensors")}
    assert "lora_unet_vit_encoder_layer_0_attention_attention_query" in stems
    assert not any("q_proj" in stem for stem in stems)
    invoke("convert", tmp_path / "k.safetensors", "--to", "peft", "--base", vit, "-o", tmp_path / "again")
    model = peft.PeftModel.from_pretrained(load(vit), tmp_path / "again")
    torch.testing.assert_close(logits(model), adapter[1], atol=1e-5, rtol=1e-5)


def test_kohya_names_of_the_models_modules_map_to_the_checkpoints_keys(vit, adapter, tmp_path):
    """Written without the base, the names are transformers 5's module names (and a note says so);
    read against the base they land on the checkpoint tensors the modules are loaded from."""
    output = invoke("convert", adapter[0], "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert "kohya names were built from the adapter's own module names" in output
    assert "lora_unet_vit_layers_0_attention_q_proj.lora_up.weight" in load_file(tmp_path / "k.safetensors")
    invoke("merge", vit, tmp_path / "k.safetensors", "-o", tmp_path / "merged")
    assert not torch.allclose(logits(load(vit)), adapter[1], atol=1e-3)
    torch.testing.assert_close(logits(load(tmp_path / "merged")), adapter[1], atol=1e-4, rtol=1e-4)


def test_a_kohya_name_transformers_cuts_from_a_tensor_is_refused(tmp_path):
    """Dinov2's checkpoint ``mlp.weights_in`` is cut into the modules gate_proj and up_proj."""
    tiny_swiglu_dinov2().save_pretrained(tmp_path / "base")
    stem = "lora_unet_dinov2_encoder_layer_0_mlp_gate_proj"  # a module transformers 5 has, no checkpoint tensor
    rank, hidden = 2, 16
    save_file(
        {
            f"{stem}.lora_down.weight": torch.randn(rank, hidden),
            f"{stem}.lora_up.weight": torch.randn(hidden, rank),
            f"{stem}.alpha": torch.tensor(2.0),
        },
        tmp_path / "k.safetensors",
    )
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "base"), str(tmp_path / "k.safetensors"), "-o", "x"])
    assert result.exit_code == 1 and result.output.startswith("Error: "), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "part of a checkpoint tensor" in result.output and "gate_proj" in result.output
