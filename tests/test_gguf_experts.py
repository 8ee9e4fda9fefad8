"""GGUF LoRA on MoE experts, as llama.cpp holds it: PEFT LoRA on transformers 5's stacked expert
parameters (``target_parameters``) written as ``blk.N.ffn_{gate,up,down}_exps.weight.lora_a`` (experts ×
r × in) and ``.lora_b`` (experts × out × r), the router as a plain ``ffn_gate_inp`` pair.

Checked with gguf-py's reader alone against PEFT itself: the names are what gguf-py's TensorNameMap
gives the tensors llama.cpp's converter stacks (``convert_hf_to_gguf.py``: Mixtral's
``layers.{bid}.feed_forward.experts.{wid}``, Qwen-MoE and OLMoE's ``model.layers.{bid}.mlp.experts.{w_name}``),
each expert's ΔW by llama.cpp's ``build_lora_mm_id`` rule (alpha / lora_b.ne[0] · lora_b[e] @ lora_a[e]) is
that expert's rows of PEFT's merged parameter minus the base's (gate rows first in ``gate_up_proj``, as the
converter splits it), and the file read back into a PEFT adapter runs PEFT's own forward."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gguf_archs import FAMILIES, gguf_pairs, refused, run
from test_moe import _mixtral, _qwen3_moe, load, logits, peft_adapter

from deploy_variants import assert_close_relative

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers.conversion_mapping")  # the stacked experts are transformers 5's


def _family(name: str):
    """A builder for one of test_gguf_archs' tiny MoE families."""

    def build():
        config_class, fields, *_ = FAMILIES[name]
        return transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**fields))

    return build


# name: (model builder, gguf architecture, the name convert_hf_to_gguf.py gives a stacked expert tensor, its
# w1/w3/w2 names where they are not gate_proj/up_proj/down_proj, the PEFT targets of test_moe.CONFIGS: "all-linear"
# puts LoRA on the router and the stacked experts of these; on Qwen2-MoE and DeepSeek only on modules)
MOE = {
    "mixtral": (_mixtral, "llama", "layers.{layer}.feed_forward.experts.{w}", dict(gate="w1", up="w3", down="w2")),
    "qwen3_moe": (_qwen3_moe, "qwen3moe", "model.layers.{layer}.mlp.experts.{w}", None),
    "olmoe": (_family("olmoe"), "olmoe", "model.layers.{layer}.mlp.experts.{w}", None),
    "qwen2_moe": (_family("qwen2_moe"), "qwen2moe", "model.layers.{layer}.mlp.experts.{w}", None, "parameters"),
    "deepseek_v3": (_family("deepseek_v3"), "deepseek2", "model.layers.{layer}.mlp.experts.{w}", None, "experts only"),
}


def _base(name: str, root: Path) -> Path:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MOE[name][0]().save_pretrained(root / "base")
    return root / "base"


def _expected_stems(name: str, layers: int, merged: dict, base: dict) -> dict[str, tuple[str, slice | None]]:
    """GGUF stem → (the model parameter whose rows it is, those rows) for every tensor PEFT changed."""
    _, arch_name, stacked, wids, *_ = MOE[name]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, layers)
    stems = {}
    for key in (k for k in merged if not torch.equal(merged[k], base[k])):
        if key.endswith("experts.gate_up_proj"):
            layer, rows = int(key.split(".")[2]), merged[key].shape[1] // 2
            for proj, part in (("gate", slice(0, rows)), ("up", slice(rows, None))):
                w = wids[proj] if wids else f"{proj}_proj"
                stems[names.get_name(stacked.format(layer=layer, w=w) + ".weight", try_suffixes=(".weight",))] = (
                    key,
                    part,
                )
        elif key.endswith("experts.down_proj"):
            w = wids["down"] if wids else "down_proj"
            stacked_name = stacked.format(layer=int(key.split(".")[2]), w=w) + ".weight"
            stems[names.get_name(stacked_name, try_suffixes=(".weight",))] = (key, None)
        else:
            stems[names.get_name(key, try_suffixes=(".weight",))] = (key, None)
    return stems


def _llama_permute(delta: torch.Tensor, key: str, config: dict) -> torch.Tensor:
    """convert_hf_to_gguf.py ``LlamaModel.permute`` of q and k (Mixtral is converted as llama)."""
    heads = config["num_attention_heads"] if "q_proj" in key else config["num_key_value_heads"]
    if config["model_type"] != "mixtral" or not key.endswith(("q_proj.weight", "k_proj.weight")):
        return delta
    return delta.reshape(heads, 2, delta.shape[0] // heads // 2, delta.shape[1]).swapaxes(1, 2).reshape(delta.shape)


@pytest.mark.parametrize("name", sorted(MOE))
def test_expert_lora_is_stacked_as_llama_cpp_applies_it_and_reads_back_to_peft(name, tmp_path):
    base, targets = _base(name, tmp_path), (*MOE[name][4:], "all-linear")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft_adapter(base, tmp_path / "peft", targets)
        expected_logits = logits(lora)
        merged = {k: v.detach().clone() for k, v in lora.merge_and_unload().state_dict().items()}
        original = load(base).state_dict()
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_parameters"]
    run("convert", tmp_path / "peft", "--to", "gguf", "--base", base, "-o", tmp_path / "a.gguf")

    fields, pairs = gguf_pairs(tmp_path / "a.gguf")
    config = json.loads((base / "config.json").read_text())
    stems = _expected_stems(name, config["num_hidden_layers"], merged, original)
    assert None not in stems and sorted(pairs) == sorted(stems)
    assert any("_exps." in stem for stem in stems)
    assert targets != "all-linear" or any("ffn_gate_inp." in stem for stem in stems)  # the router: build_lora_mm
    alpha = float(fields["adapter.lora.alpha"])
    for stem, pair in pairs.items():
        key, rows = stems[stem]
        a, b = torch.from_numpy(pair["lora_a"]), torch.from_numpy(pair["lora_b"])
        want = merged[key] - original[key]
        if "_exps." in stem:  # build_lora_mm_id: scale = alpha / lora_b.ne[0], expert e: lora_b[e] @ lora_a[e]
            assert a.dim() == b.dim() == 3 and a.shape[0] == b.shape[0] == want.shape[0]
            delta = (alpha / b.shape[-1]) * torch.bmm(b, a)
            want = want if rows is None else want[:, rows]
        else:  # build_lora_mm
            delta = (alpha / b.shape[-1]) * b @ a
            want = _llama_permute(want, key, config)
        assert_close_relative(delta, want, f"{name} {stem}", tolerance=1e-4)

    run("convert", tmp_path / "a.gguf", "--from", "gguf", "--base", base, "--to", "peft", "-o", tmp_path / "back")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(load(base), tmp_path / "back")
    torch.testing.assert_close(logits(back), expected_logits, rtol=1e-4, atol=1e-5)


def test_a_dense_update_on_one_expert_is_refused_in_one_sentence(tmp_path):
    """llama.cpp holds one low-rank pair per stacked tensor: a dense ΔW on an expert cannot be written."""
    from surgeon import formats
    from surgeon.checkpoint import Checkpoint
    from surgeon.delta import Adapter, Dense, LowRank
    from surgeon.errors import SurgeonError

    base = _base("qwen3_moe", tmp_path)
    adapter = Adapter(source_format="peft")
    adapter.add("model.layers.0.mlp.experts.0.up_proj.weight", LowRank(torch.ones(2, 16), torch.ones(12, 2)))
    adapter.add("model.layers.0.mlp.experts.1.up_proj.weight", Dense(torch.ones(12, 16)), "MoE expert")
    with pytest.raises(SurgeonError) as error:
        formats.write_adapter(adapter, tmp_path / "a.gguf", "gguf", base=Checkpoint(base))
    message = str(error.value)
    assert "blk.0.ffn_up_exps" in message and "dense" in message and message.count(". ") == 0, message
    assert not (tmp_path / "a.gguf").exists()


def test_damaged_expert_factors_are_refused_by_name(tmp_path):
    """A stacked pair whose expert count is not the base's: llama.cpp would index past it."""
    base = _base("qwen3_moe", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_adapter(base, tmp_path / "peft", "experts only")
    run("convert", tmp_path / "peft", "--to", "gguf", "--base", base, "-o", tmp_path / "a.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    writer = gguf.GGUFWriter(str(tmp_path / "cut.gguf"), "qwen3moe")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 6.0)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data)[:3].copy())  # 3 of the 4 experts
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    output = refused("convert", tmp_path / "cut.gguf", "--base", base, "--to", "peft", "-o", tmp_path / "back")
    assert "blk.0.ffn_down_exps.weight" in output and "4 experts" in output
