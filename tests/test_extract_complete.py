"""extract's defaults give a complete adapter: every changed tensor is carried (embeddings and
heads as LoRA, norms and biases whole as modules_to_save), checked against PEFT on the common
BERT sequence-classification set-up; what cannot be carried (an embedding tied to the output
head) is left out with its reason and its share of the change in the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgeon.cli import main
from surgeon.delta import Adapter, LowRank, Replace
from surgeon.errors import SurgeonError
from surgeon.formats import peft as peft_format

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tune(base: Path, out: Path, select=lambda key: True) -> None:
    """A full fine-tune: selected 2-D weights move by a rank-2 delta, selected 1-D ones by noise."""
    shutil.copytree(base, out)
    state = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(2)
    for key, value in state.items():
        if not (value.is_floating_point() and select(key)):
            continue
        if value.dim() == 2:
            m, n = value.shape
            state[key] = value + 0.2 * torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)
        elif value.dim() == 1:
            state[key] = value + 0.1 * torch.randn(value.shape, generator=gen)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})


def extract(base: Path, tuned: Path, out: Path, *extra: str) -> dict:
    result = CliRunner().invoke(
        main, ["extract", str(base), str(tuned), "-o", str(out), "--rank", "2", "--json", *extra]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_defaults_carry_a_bert_classifier_fine_tune_completely(tmp_path):
    config = transformers.BertConfig(
        vocab_size=96,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    tune(tmp_path / "base", tmp_path / "tuned")
    report = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "adapter")
    ids = {"input_ids": torch.tensor([[2, 7, 11, 40, 3]]), "token_type_ids": torch.tensor([[0, 0, 1, 1, 1]])}
    load = transformers.BertForSequenceClassification.from_pretrained
    with torch.no_grad():
        expected = load(tmp_path / "tuned").eval()(**ids).logits
        model = peft.PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "adapter").eval()
        assert not torch.allclose(load(tmp_path / "base").eval()(**ids).logits, expected, atol=1e-3)
        torch.testing.assert_close(model(**ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert report["left_out"] == [] and report["left_out_share"] == 0.0


def save_tied_llama(path: Path) -> None:
    """A one-layer llama whose output head is tied to its input embedding, saved by transformers."""
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def test_a_tied_embedding_is_left_out_with_its_reason_and_cost(tmp_path):
    save_tied_llama(tmp_path / "base")
    tune(tmp_path / "base", tmp_path / "tuned", lambda key: key.endswith(("embed_tokens.weight", "q_proj.weight")))
    report = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "adapter")
    (left,) = report["left_out"]
    assert left["key"] == "model.embed_tokens.weight" and "tied to the output head" in left["reason"]
    rows = {r["key"]: r for r in report["modules"]}
    total = sum(r["delta_norm"] ** 2 for r in rows.values())
    assert report["left_out_share"] == pytest.approx(left["delta_norm"] ** 2 / total) and report["left_out_share"] > 0
    forced = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "forced", "--embeddings", "lora")
    assert forced["left_out"] == []
    # left out on request: the reason is the request (it was the tie, with advice to force it)
    (asked,) = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "skip", "--embeddings", "skip")["left_out"]
    assert asked["reason"] == "embedding or lm_head, left out by --embeddings skip"


@pytest.fixture
def tied_llama(tmp_path) -> tuple[Path, Path]:
    """A tied-embedding llama and a PEFT LoRA on its embedding (and q_proj), with non-zero B."""
    save_tied_llama(tmp_path / "base")
    lora = peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), lora).save_pretrained(
        tmp_path / "adapter"
    )
    return tmp_path / "base", tmp_path / "adapter"


def llama_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([[1, 5, 9, 17, 33]])).logits


def test_merging_a_tied_embedding_warns_and_untie_keeps_the_head(tied_llama, tmp_path):
    base, adapter = tied_llama
    load = transformers.LlamaForCausalLM.from_pretrained
    unmerged = llama_logits(peft.PeftModel.from_pretrained(load(base), adapter))
    merged_by_peft = llama_logits(peft.PeftModel.from_pretrained(load(base), adapter).merge_and_unload())
    assert not torch.allclose(unmerged, merged_by_peft, atol=1e-3)  # PEFT's merge moves the tied head too
    result = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "tied"), "--json"])
    assert result.exit_code == 0, result.output
    (note,) = json.loads(result.stdout)["notes"]
    assert "'model.embed_tokens.weight'" in note and "lm_head" in note and "untie" in note
    torch.testing.assert_close(llama_logits(load(tmp_path / "tied")), merged_by_peft, atol=1e-5, rtol=1e-5)
    result = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "untied"), "--untie"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "untied" / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(llama_logits(load(tmp_path / "untied")), unmerged, atol=1e-5, rtol=1e-5)


def test_unmerge_of_an_untied_merge_checks_against_the_tied_base(tied_llama, tmp_path):
    """The untied output stores lm_head, which the tied base only implies: --check called them different models."""
    base, adapter = tied_llama
    assert (
        CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "m"), "--untie"]).exit_code
        == 0
    )
    result = CliRunner().invoke(
        main,
        ["unmerge", str(tmp_path / "m"), str(adapter), "-o", str(tmp_path / "back"), "--check", str(base), "--json"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["check"]["max_relative_error"] < 1e-5


def test_a_lora_target_inside_a_whole_copied_module_is_refused(tmp_path):
    """A changed parameter of a module that is not a leaf (a gate, an attention sink) makes PEFT copy that
    module whole, which would silently drop the LoRA of the layers inside it."""
    adapter = Adapter(source_format="extract")
    adapter.add("layers.0.attn.sinks", Replace(torch.ones(4)), "other")
    adapter.add("layers.0.attn.q_proj.weight", LowRank(down=torch.ones(2, 8), up=torch.ones(8, 2)), "linear")
    with pytest.raises(SurgeonError, match="'layers.0.attn.q_proj' lies inside 'layers.0.attn'"):
        peft_format.write(adapter, tmp_path / "out")


def test_a_norm_whose_weight_alone_changed_loads_in_peft(tmp_path):
    """modules_to_save loads a module whole: a LayerNorm whose weight changed but whose bias did not
    was written without the bias, and PEFT refused the adapter (KeyError on the bias)."""
    base = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-gpt2"
    tune(base, tmp_path / "tuned", lambda key: key.endswith(("h.0.ln_1.weight", "h.1.attn.c_attn.weight")))
    extract(base, tmp_path / "tuned", tmp_path / "adapter")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload().state_dict()
    tuned = load_file(tmp_path / "tuned" / "model.safetensors")
    for key, value in tuned.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-5, msg=key)
