"""Soft prompts (issue 16): a PEFT prompt-tuning adapter merged into the vocabulary reproduces
PEFT's prompt-tuned model when its virtual token ids are fed first; unmerge takes them back off;
prefix tuning is described by inspect and refused by merge. Adapters and tokenizers are made by
the real producers (peft, tokenizers, transformers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fixtures.make_fixtures import load_base
from surgeon.checkpoint import Checkpoint
from surgeon.cli import main

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
VIRTUAL = 4
TASKS = {"llama": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def with_tokenizer(arch: str, out: Path) -> Path:
    """A copy of the tiny base with a 256-token WordLevel tokenizer saved by transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(FIXTURES / f"tiny-{arch}", out)
    vocab = {f"w{i}": i for i in range(256)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0").save_pretrained(out)
    return out


def make_prompt_adapter(arch: str, out: Path, kind: str = "prompt", seed: int = 3) -> tuple[Path, object]:
    """A PEFT prompt-learning adapter on the tiny ``arch`` model, saved by PEFT; and the PEFT model."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

    config = {"prompt": PromptTuningConfig, "p-tuning": PromptEncoderConfig, "prefix": PrefixTuningConfig}[kind]
    torch.manual_seed(seed)
    model = get_peft_model(load_base(arch, FIXTURES / f"tiny-{arch}"),
                           config(task_type=TASKS[arch], num_virtual_tokens=VIRTUAL)).eval()
    model.save_pretrained(out)
    return out, model


def _output(result) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.mark.parametrize("arch,kind", [("llama", "prompt"), ("bert", "prompt"), ("llama", "p-tuning")])
def test_merged_vocabulary_reproduces_peft(tmp_path, arch, kind):
    adapter, peft_model = make_prompt_adapter(arch, tmp_path / "adapter", kind)
    base = with_tokenizer(arch, tmp_path / "base")
    result = run("merge", base, adapter, "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    loader = AutoModelForCausalLM if arch == "llama" else AutoModel
    merged = loader.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 200]])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    prefix = tokenizer("".join(f"<|prompt_{i}|>" for i in range(VIRTUAL)), add_special_tokens=False)["input_ids"]
    assert prefix == list(range(256, 256 + VIRTUAL)) and len(tokenizer) == 256 + VIRTUAL
    with torch.no_grad():
        expected = _output(peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)))[:, VIRTUAL:]
        got = _output(merged(input_ids=torch.cat([torch.tensor([prefix]), ids], dim=1)))
    got = got[:, VIRTUAL:, :expected.shape[-1]]  # the real vocabulary's logits at the real positions
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["vocab_size"] == 256 + VIRTUAL
    assert f"Prefix every input with these {VIRTUAL} tokens" in (tmp_path / "merged" / "README.md").read_text()


def test_unmerge_removes_the_virtual_tokens(tmp_path):
    adapter, _ = make_prompt_adapter("llama", tmp_path / "adapter")
    base = with_tokenizer("llama", tmp_path / "base")
    assert run("merge", base, adapter, "-o", tmp_path / "merged").exit_code == 0
    merged = Checkpoint(tmp_path / "merged")
    assert merged.info("lm_head.weight").shape == (256 + VIRTUAL, 64)
    assert not merged.get("lm_head.weight")[256:].any()  # an untied head's rows: zeros (documented)
    result = run("unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "restored", "--check", base)
    assert result.exit_code == 0, result.output
    restored, original = Checkpoint(tmp_path / "restored"), Checkpoint(base)
    for key in original.keys():
        assert torch.equal(restored.get(key), original.get(key)), key
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path / "restored")) == 256
    assert json.loads((tmp_path / "restored" / "config.json").read_text())["vocab_size"] == 256
    assert not (tmp_path / "restored" / "README.md").exists()


def test_merge_without_tokenizer_and_weight_refused(tmp_path):
    adapter, _ = make_prompt_adapter("bert", tmp_path / "adapter")
    result = run("merge", FIXTURES / "tiny-bert", adapter, "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert Checkpoint(tmp_path / "merged").info("embeddings.word_embeddings.weight").shape == (256 + VIRTUAL, 64)
    result = run("merge", FIXTURES / "tiny-bert", adapter, "-o", tmp_path / "scaled", "-w", "0.5")
    assert result.exit_code == 1 and "weight other than 1" in result.output and "Traceback" not in result.output


def test_inspect_prompt_tuning(tmp_path):
    adapter, _ = make_prompt_adapter("llama", tmp_path / "adapter")
    result = run("inspect", adapter, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["format"] == "peft-prompt-tuning" and summary["params"] == VIRTUAL * 64
    assert summary["modules"][0]["delta"] == f"{VIRTUAL} appended rows (virtual tokens)"


def test_prefix_tuning_inspected_and_refused(tmp_path):
    adapter, _ = make_prompt_adapter("llama", tmp_path / "adapter", "prefix")
    result = run("inspect", adapter, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["family"] == "PEFT prefix tuning" and summary["num_layers"] == 2
    assert summary["num_virtual_tokens"] == VIRTUAL and summary["token_dim"] == 32  # 2 key-value heads of 16
    assert summary["params"] == VIRTUAL * 2 * 2 * 32  # a key and a value per layer and virtual token
    result = run("merge", FIXTURES / "tiny-llama", adapter, "-o", tmp_path / "merged")
    assert result.exit_code == 1 and "cannot be merged" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "merged").exists()
