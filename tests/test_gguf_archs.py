"""GGUF LoRA for every architecture surgeon writes it for, on tiny random transformers models with
PEFT adapters: names as gguf-py's TensorNameMap gives them for the architecture llama.cpp's
converter registers, ΔW by llama.cpp's runtime rule (scale = alpha/rank, ΔW = lora_b @ lora_a)
equal to the converter's transform of PEFT's merged weight minus that of the base, and the GGUF
read back into a PEFT adapter giving PEFT's own forward.

The converter transforms here are written from llama.cpp's convert_hf_to_gguf.py on whole
weights, independently of surgeon's, which reorders factors."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from deploy_variants import assert_close_relative
from surgeon.cli import main

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, vocab_size=64, max_position_embeddings=64)
DECODER = dict(SMALL, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
GQA = dict(DECODER, num_key_value_heads=2)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def llama_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py ``LlamaModel.permute`` (q with all heads, k with the KV heads)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def per_head_qkv(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """``GPTNeoXModel`` / ``BloomModel.modify_tensors``: per-head [q, k, v] to all q, all k, all v."""
    qkv = weight.reshape(heads, 3, weight.shape[0] // heads // 3, weight.shape[1])
    return torch.cat([qkv[:, part].reshape(-1, weight.shape[1]) for part in range(3)])


def falcon_qkv(weight: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """``FalconModel.modify_tensors``: kv groups of (queries, key, value) to all q, all k, all v."""
    groups = weight.reshape(kv_heads, heads // kv_heads + 2, -1, weight.shape[1])
    q, k, v = groups[:, :-2], groups[:, -2], groups[:, -1]
    return torch.cat([part.reshape(-1, weight.shape[1]) for part in (q, k, v)])


def llama_layout(key: str, weight: torch.Tensor) -> torch.Tensor:
    if key.endswith("q_proj.weight"):
        return llama_permute(weight, 4)
    return llama_permute(weight, 2) if key.endswith("k_proj.weight") else weight


def fused_qkv(transform):
    return lambda key, weight: transform(weight) if key.endswith("query_key_value.weight") else weight


def gpt2_layout(key: str, weight: torch.Tensor) -> torch.Tensor:
    """``GPT2Model.modify_tensors`` transposes the Conv1D weights (.c_attn, .c_proj, .c_fc)."""
    return weight.T if key.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")) else weight


def renamed(key: str, weight: torch.Tensor) -> torch.Tensor:
    return weight


# name: (config class, config, gguf architecture the converter registers, PEFT targets, converter transform)
FAMILIES = {
    "llama": ("LlamaConfig", GQA, "llama", "all-linear", llama_layout),
    "mistral": ("MistralConfig", GQA, "llama", "all-linear", llama_layout),
    "gemma": ("GemmaConfig", dict(GQA, head_dim=8), "gemma", "all-linear", renamed),
    "gemma2": ("Gemma2Config", dict(GQA, head_dim=8), "gemma2", "all-linear", renamed),
    "gemma3": ("Gemma3TextConfig", dict(GQA, head_dim=8), "gemma3", "all-linear", renamed),
    "phi3": ("Phi3Config", GQA, "phi3", "all-linear", renamed),
    "phi2": ("PhiConfig", DECODER, "phi2", "all-linear", renamed),
    "qwen2": ("Qwen2Config", GQA, "qwen2", "all-linear", renamed),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(GQA, **MOE, shared_expert_intermediate_size=24),
        "qwen2moe",
        "all-linear",
        renamed,
    ),
    "qwen3_moe": ("Qwen3MoeConfig", dict(GQA, **MOE, head_dim=8), "qwen3moe", ATTENTION, renamed),
    "olmoe": ("OlmoeConfig", dict(GQA, **MOE), "olmoe", ATTENTION, renamed),
    "starcoder2": ("Starcoder2Config", GQA, "starcoder2", "all-linear", renamed),
    "cohere": ("CohereConfig", GQA, "command-r", "all-linear", renamed),
    "gpt_neox": ("GPTNeoXConfig", DECODER, "gptneox", "all-linear", fused_qkv(lambda w: per_head_qkv(w, 4))),
    "bloom": (
        "BloomConfig",
        dict(SMALL, hidden_size=32, n_layer=2, n_head=4),
        "bloom",
        "all-linear",
        fused_qkv(lambda w: per_head_qkv(w, 4)),
    ),
    "falcon": (
        "FalconConfig",
        dict(
            SMALL,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=True,
            num_kv_heads=2,
        ),
        "falcon",
        "all-linear",
        fused_qkv(lambda w: falcon_qkv(w, 4, 2)),
    ),
    "gpt2": (
        "GPT2Config",
        dict(SMALL, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "gpt2",
        "all-linear",
        gpt2_layout,
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            DECODER,
            num_key_value_heads=4,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
        "deepseek2",
        ["o_proj"],  # PEFT 0.21 turns DeepSeek's gate/up/down_proj targets into expert target_parameters
        renamed,
    ),
}


def run(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def make(family: str, root: Path, targets=None) -> tuple[Path, Path, torch.nn.Module]:
    """A tiny random base and a PEFT LoRA on it with random B (so ΔW is not zero), both saved."""
    config_class, fields, _, default_targets, _ = FAMILIES[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**fields))
        model.save_pretrained(root / "base")
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets or default_targets)
        lora = peft.get_peft_model(model, config)
    for name, parameter in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    lora.save_pretrained(root / "peft")
    return root / "base", root / "peft", lora.eval()


def gguf_pairs(path: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Metadata and lora_a/lora_b per tensor, read with gguf-py alone."""
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    pairs: dict[str, dict] = {}
    for tensor in reader.tensors:
        stem, _, suffix = tensor.name.rpartition(".")
        pairs.setdefault(stem, {})[suffix] = np.array(tensor.data)
    return fields, pairs


def tokens() -> torch.Tensor:
    return torch.tensor([[3, 17, 42, 9, 28, 5, 61, 11]])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gguf_is_the_converters_transform_of_peft_and_reads_back_to_peft(family, tmp_path):
    _, _, arch_name, _, layout = FAMILIES[family]
    base, adapter, lora = make(family, tmp_path)
    with torch.no_grad():
        expected_logits = lora(tokens()).logits
    run("convert", adapter, "--to", "gguf", "--base", base, "-o", tmp_path / "a.gguf")

    fields, pairs = gguf_pairs(tmp_path / "a.gguf")
    assert fields["general.architecture"] == arch_name and fields["adapter.type"] == "lora"
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    layers = json.loads((base / "config.json").read_text())
    names = gguf.get_tensor_name_map(arch, layers.get("num_hidden_layers") or layers["n_layer"])
    base_weights = {k: v.detach().clone() for k, v in lora.get_base_model().state_dict().items()}
    merged = {k: v.detach() for k, v in lora.merge_and_unload().state_dict().items()}
    base_weights = {re.sub(r"\.base_layer\.", ".", k): v for k, v in base_weights.items() if "lora_" not in k}
    changed = {k for k in merged if not torch.equal(merged[k], base_weights[k])}
    expected = {names.get_name(k, try_suffixes=(".weight",)): k for k in changed}
    assert None not in expected and sorted(pairs) == sorted(expected)
    alpha = float(fields["adapter.lora.alpha"])
    for stem, pair in pairs.items():
        key, a, b = expected[stem], torch.from_numpy(pair["lora_a"]), torch.from_numpy(pair["lora_b"])
        delta = (alpha / b.shape[1]) * b @ a  # llama.cpp: scale = alpha / lora_b.ne[0], ΔW = lora_b @ lora_a
        want = layout(key, merged[key]) - layout(key, base_weights[key])
        assert_close_relative(delta, want, f"{family} {stem}", tolerance=1e-4)

    run("convert", tmp_path / "a.gguf", "--from", "gguf", "--base", base, "--to", "peft", "-o", tmp_path / "back")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        back = peft.PeftModel.from_pretrained(model, tmp_path / "back").eval()
        with torch.no_grad():
            got = back(tokens()).logits
    torch.testing.assert_close(got, expected_logits, rtol=1e-4, atol=1e-5)


def refused(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1 and result.output.startswith("Error: "), (result.output, result.exception)
    assert "Traceback" not in result.output and result.output.count(". ") == 0, result.output
    return result.output


def test_deepseek_projections_llama_cpp_multiplies_without_adapters_are_refused_by_name(tmp_path):
    """llm_build_deepseek2 multiplies the MLA projections with ggml_mul_mat, not build_lora_mm: a
    GGUF LoRA there would load and never apply."""
    base, adapter, _ = make("deepseek_v3", tmp_path, targets=["q_a_proj", "o_proj"])
    output = refused("convert", adapter, "--to", "gguf", "--base", base, "-o", tmp_path / "a.gguf")
    assert "q_a_proj" in output and "attn_q_a" in output and "without adapters" in output
    assert not (tmp_path / "a.gguf").exists()


def test_stacked_experts_are_refused_by_name(tmp_path):
    from surgeon import formats
    from surgeon.checkpoint import Checkpoint
    from surgeon.delta import Adapter, LowRank
    from surgeon.errors import SurgeonError

    base, _, _ = make("qwen3_moe", tmp_path)
    adapter = Adapter(source_format="peft")
    key = "model.layers.0.mlp.experts.down_proj.weight"
    adapter.add(key, LowRank(down=torch.ones(2, 16), up=torch.ones(32, 2)))
    with pytest.raises(SurgeonError, match=r"experts.down_proj.*ffn_down_exps.*stacked experts"):
        formats.write_adapter(adapter, tmp_path / "a.gguf", "gguf", base=Checkpoint(base))


def test_an_architecture_surgeon_has_not_checked_is_refused_naming_those_it_has(tmp_path):
    root = tmp_path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.OPTConfig(
                **SMALL, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32
            )
        )
        model.save_pretrained(root / "base")
        peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(root / "peft")
    output = refused("convert", root / "peft", "--to", "gguf", "--base", root / "base", "-o", root / "a.gguf")
    assert "model_type 'opt'" in output and "gemma3" in output and "gptneox" in output
