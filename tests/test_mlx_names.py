"""mlx-lm names modules by its own model definitions (GPT-NeoX's ``gpt_neox.layers.0`` is ``model.h.0``,
GPT-J's ``transformer.h.0`` is ``model.h.0``, Qwen2.5-VL's language model is ``language_model.model``,
GPT-2's Conv1D weights are transposed Linears). Against the real consumer: a PEFT adapter converted to
mlx with the base is loaded by mlx-lm's ``load_adapters`` into mlx-lm's model for that base and gives
PEFT's logits; converted back to PEFT it gives them again; what mlx-lm has no module for is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import refused

from surgeon.convert import convert_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
mx = pytest.importorskip("mlx.core")

TOKENS = [[1, 5, 9, 17, 33, 60, 2, 7]]
TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)


def _qwen2_5_vl():
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=2)
    vision.update(fullatt_block_indexes=[0], spatial_merge_size=1, temporal_patch_size=1, window_size=4)
    text = {**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, "bos_token_id": 1}
    config = transformers.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=61, video_token_id=62, vision_start_token_id=63
    )
    return transformers.Qwen2_5_VLForConditionalGeneration(config)


GPT = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
# Each family: (the tiny model, config fields its Hub checkpoints have that mlx-lm 0.32 reads and
# transformers 5 no longer writes, the PEFT target_modules).
FAMILIES = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)), {}, "all-linear"),
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TEXT)), {}, "all-linear"),
    "gemma": (lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**TEXT, head_dim=8)), {}, "all-linear"),
    "phi3": (lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**TEXT)), {}, "all-linear"),
    "gpt_neox": (
        lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**TEXT, "intermediate_size": 128})),
        {"rotary_emb_base": 10000.0, "rotary_pct": 0.25},
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "embed_in"],
    ),
    "gptj": (
        lambda: transformers.GPTJForCausalLM(transformers.GPTJConfig(**GPT, rotary_dim=4)),
        {},
        "all-linear",
    ),
    "qwen2_5_vl": (
        _qwen2_5_vl,
        {"tie_word_embeddings": False},
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    ),  # the vision tower's are qkv/proj
    # GPT2Model, as the Hub's gpt2 checkpoint stores it (no transformer. prefix, which mlx-lm expects)
    "gpt2": (lambda: transformers.GPT2Model(transformers.GPT2Config(**GPT)), {"n_ctx": 64}, ["c_attn", "c_fc"]),
}


def _as_on_the_hub(config: dict, fields: dict) -> None:
    """Add what the Hub's configs, written by transformers 4, hold and mlx-lm reads: ``rope_theta`` at
    the top (transformers 5 moved it into ``rope_parameters``) and each family's ``fields``."""
    for part in (config, config.get("text_config")):
        if part is not None:
            part.update(fields)
            part.setdefault("rope_theta", (part.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def _base(name: str, root: Path) -> Path:
    build, fields, _ = FAMILIES[name]
    torch.manual_seed(0)
    build().save_pretrained(root / name)
    config = json.loads((root / name / "config.json").read_text())
    _as_on_the_hub(config, fields)
    (root / name / "config.json").write_text(json.dumps(config))
    return root / name


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mlx-bases")
    transformers.logging.set_verbosity_error()
    return {name: _base(name, root) for name in FAMILIES}


def _hf(base: Path):
    architecture = json.loads((base / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture).from_pretrained(base).eval()


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(TOKENS))
    if hasattr(out, "logits"):
        return out.logits
    return out.last_hidden_state @ model.get_input_embeddings().weight.T  # GPT2Model: mlx-lm's head is wte


def peft_adapter(name: str, base: Path, out: Path) -> torch.Tensor:
    """A PEFT LoRA with non-zero B on ``base``, saved to ``out``; returns PEFT's logits with it."""
    torch.manual_seed(3)
    targets = FAMILIES[name][2]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft.get_peft_model(_hf(base), config).save_pretrained(out)
    return hf_logits(peft.PeftModel.from_pretrained(_hf(base), out).eval())


def mlx_logits(base: Path, adapter: Path | None) -> torch.Tensor:
    from mlx_lm.tuner.utils import load_adapters

    model, _ = mlx_lm_utils.load_model(base)
    if adapter is not None:
        load_adapters(model, str(adapter))
    return torch.from_numpy(np.array(model(mx.array(TOKENS)).astype(mx.float32)))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_mlx_lm_loads_the_converted_adapter_and_gives_peft_logits(name, bases, tmp_path):
    """mlx-lm's kernels round differently from torch's (1e-4 on these logits): the adapter's effect on
    the logits is compared, relative to its size."""
    expected = peft_adapter(name, bases[name], tmp_path / "peft") - hf_logits(_hf(bases[name]))
    convert_adapter(tmp_path / "peft", "mlx", tmp_path / "mlx", base_path=bases[name])
    got = mlx_logits(bases[name], tmp_path / "mlx") - mlx_logits(bases[name], None)
    assert expected.abs().max() > 0.1  # the adapter changes the logits
    assert (got - expected).abs().max() < 1e-2 * expected.abs().max(), (got - expected).abs().max()


@pytest.mark.parametrize("name", ["gpt_neox", "gpt2", "qwen2_5_vl"])
def test_mlx_back_to_peft_round_trips(name, bases, tmp_path):
    expected = peft_adapter(name, bases[name], tmp_path / "peft")
    convert_adapter(tmp_path / "peft", "mlx", tmp_path / "mlx", base_path=bases[name])
    convert_adapter(tmp_path / "mlx", "peft", tmp_path / "again", base_path=bases[name])
    model = peft.PeftModel.from_pretrained(_hf(bases[name]), tmp_path / "again").eval()
    torch.testing.assert_close(hf_logits(model), expected, atol=1e-5, rtol=1e-5)


def test_an_adapter_mlx_lm_made_reads_as_checkpoint_keys_and_loads_in_peft(bases, tmp_path):
    """mlx-lm's own LoRA layers on GPT-NeoX (``model.h.N…``), converted to PEFT, change PEFT's logits as
    they change mlx-lm's."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    base = bases["gpt_neox"]
    model, _ = mlx_lm_utils.load_model(base)
    parameters = {"rank": 2, "scale": 3.0, "dropout": 0.0, "keys": ["attention.query_key_value", "mlp.dense_4h_to_h"]}
    model.freeze()
    linear_to_lora_layers(model, 2, parameters)
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = mx.random.normal(module.lora_b.shape, key=mx.random.key(1))
    out = tmp_path / "made-by-mlx"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (out / "adapter_config.json").write_text(json.dumps({"num_layers": 2, "lora_parameters": parameters}))
    convert_adapter(out, "peft", tmp_path / "peft", base_path=base)
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {m.rsplit(".", 1)[-1] for m in written["target_modules"]} == {"dense_4h_to_h", "query_key_value"}
    expected = mlx_logits(base, out) - mlx_logits(base, None)
    got = hf_logits(peft.PeftModel.from_pretrained(_hf(base), tmp_path / "peft").eval()) - hf_logits(_hf(base))
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() < 1e-2 * expected.abs().max()


def test_a_delta_mlx_lm_has_no_module_for_is_refused(bases, tmp_path):
    """mlx-lm's Qwen2.5-VL is its language model: it drops the vision tower, so LoRA there cannot go."""
    torch.manual_seed(3)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "qkv"], init_lora_weights=False)
    peft.get_peft_model(_hf(bases["qwen2_5_vl"]), config).save_pretrained(tmp_path / "peft")
    args = ["convert", tmp_path / "peft", "--to", "mlx", "--base", bases["qwen2_5_vl"], "-o", tmp_path / "mlx"]
    output = refused(*args)
    assert "qwen2_5_vl" in output and "visual." in output and "drops" in output
    assert not (tmp_path / "mlx").exists()


def test_a_config_mlx_lm_cannot_build_is_refused(bases, tmp_path):
    """transformers 5 writes GPT-NeoX's rotary settings into rope_parameters, which mlx-lm 0.32 does not read."""
    base = tmp_path / "base"
    base.mkdir()
    config = json.loads((bases["gpt_neox"] / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({k: v for k, v in config.items() if not k.startswith("rotary_")}))
    (base / "model.safetensors").symlink_to(bases["gpt_neox"] / "model.safetensors")
    peft_adapter("gpt_neox", bases["gpt_neox"], tmp_path / "peft")
    output = refused("convert", tmp_path / "peft", "--to", "mlx", "--base", base, "-o", tmp_path / "mlx")
    assert "mlx-lm cannot build its gpt_neox model" in output and "rotary_emb_base" in output


def test_without_the_base_the_names_are_said_to_be_unchecked(bases, tmp_path):
    peft_adapter("gpt_neox", bases["gpt_neox"], tmp_path / "peft")
    report = convert_adapter(tmp_path / "peft", "mlx", tmp_path / "mlx")
    assert any("not checked against mlx-lm's model" in note for note in report["notes"])


def test_an_mlx_lm_model_that_exits_on_import_is_refused_not_fatal(tmp_path):
    """mlx-lm's olmo module calls sys.exit when ai2-olmo is not installed: surgeon must say so, not exit."""
    import importlib.util

    if importlib.util.find_spec("hf_olmo") is not None:
        pytest.skip("ai2-olmo is installed, so mlx-lm's olmo imports")
    torch.manual_seed(0)
    transformers.OlmoForCausalLM(transformers.OlmoConfig(**TEXT)).save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    peft.get_peft_model(_hf(tmp_path / "base"), config).save_pretrained(tmp_path / "peft")
    output = refused("convert", tmp_path / "peft", "--to", "mlx", "--base", tmp_path / "base", "-o", tmp_path / "m")
    assert "mlx-lm's olmo model cannot be imported" in output


def test_dora_on_gpt2s_conv1d_is_normalised_per_output_as_mlx_lm_holds_it(bases, tmp_path):
    """GPT-2's Conv1D (in×out) is a transposed Linear in mlx-lm: DoRA's per-output magnitude follows."""
    base = bases["gpt2"]
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False, use_dora=True)
    model = peft.get_peft_model(_hf(base), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "magnitude" in name:
                parameter.mul_(1.3)  # a magnitude that differs from the norm of W + ΔW
    model.save_pretrained(tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(_hf(base), tmp_path / "peft")
    expected = hf_logits(peft_model.eval()) - hf_logits(_hf(base))
    convert_adapter(tmp_path / "peft", "mlx", tmp_path / "mlx", base_path=base)
    got = mlx_logits(base, tmp_path / "mlx") - mlx_logits(base, None)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() < 1e-2 * expected.abs().max()
