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
TASKS = {"llama": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION", "gpt2": "CAUSAL_LM"}


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


def make_prompt_adapter(arch: str, out: Path, kind: str = "prompt", seed: int = 3, **extra) -> tuple[Path, object]:
    """A PEFT prompt-learning adapter on the tiny ``arch`` model, saved by PEFT; and the PEFT model."""
    import peft

    config = {
        "prompt": peft.PromptTuningConfig,
        "p-tuning": peft.PromptEncoderConfig,
        "prefix": peft.PrefixTuningConfig,
        "multitask": peft.MultitaskPromptTuningConfig,
    }[kind]
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        load_base(arch, FIXTURES / f"tiny-{arch}"), config(task_type=TASKS[arch], num_virtual_tokens=VIRTUAL, **extra)
    ).eval()
    model.save_pretrained(out)
    return out, model


def _output(result) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.mark.parametrize(
    "arch,kind", [("llama", "prompt"), ("bert", "prompt"), ("llama", "p-tuning"), ("llama", "multitask")]
)
def test_merged_vocabulary_reproduces_peft(tmp_path, arch, kind):
    extra = {"num_tasks": 1} if kind == "multitask" else {}
    adapter, peft_model = make_prompt_adapter(arch, tmp_path / "adapter", kind, **extra)
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
        task = {"task_ids": torch.tensor([0])} if kind == "multitask" else {}
        expected = _output(peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), **task))[:, VIRTUAL:]
        got = _output(merged(input_ids=torch.cat([torch.tensor([prefix]), ids], dim=1)))
    got = got[:, VIRTUAL:, : expected.shape[-1]]  # the real vocabulary's logits at the real positions
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


def test_multitask_prompt_of_several_tasks_refused(tmp_path):
    adapter, _ = make_prompt_adapter("llama", tmp_path / "adapter", "multitask", num_tasks=2)
    result = run("merge", FIXTURES / "tiny-llama", adapter, "-o", tmp_path / "merged")
    assert result.exit_code == 1 and "holds 2 tasks" in result.output and "Traceback" not in result.output


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
    assert result.exit_code == 1 and "cannot merge or convert it" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "merged").exists()


# AdapterHub (the adapters library) is not installed beside transformers 5, so its files are written
# here as its loading.py saves them: build_full_config's JSON, and the module names of its layers.
def make_adapterhub(out: Path, config: dict, tensors: dict[str, torch.Tensor], pickle: bool = False) -> Path:
    from safetensors.torch import save_file

    out.mkdir()
    full = {
        "config": config,
        "hidden_size": 64,
        "model_class": "BertModel",
        "model_name": "tiny-bert",
        "model_type": "bert",
        "name": "demo",
        "version": "adapters.1.3.0",
    }
    (out / "adapter_config.json").write_text(json.dumps(full, indent=2, sort_keys=True))
    if pickle:
        torch.save(tensors, out / "pytorch_adapter.bin")
    else:
        save_file(tensors, out / "adapter.safetensors")
    return out


def bottleneck_tensors(positions: tuple[str, ...], size: int = 4) -> dict[str, torch.Tensor]:
    tensors = {}
    for layer in range(2):
        for where in positions:
            stem = f"encoder.layer.{layer}.{where}.adapters.demo"
            tensors |= {
                f"{stem}.adapter_down.0.weight": torch.randn(size, 64),
                f"{stem}.adapter_down.0.bias": torch.randn(size),
                f"{stem}.adapter_up.weight": torch.randn(64, size),
                f"{stem}.adapter_up.bias": torch.randn(64),
            }
    return tensors


PFEIFFER = {
    "mh_adapter": False,
    "output_adapter": True,
    "reduction_factor": 16,
    "non_linearity": "relu",
    "original_ln_before": True,
    "is_parallel": False,
    "scaling": 1.0,
    "phm_layer": False,
}
HOULSBY = {**PFEIFFER, "mh_adapter": True, "non_linearity": "swish", "original_ln_before": False}


@pytest.mark.parametrize(
    "config,positions,pickle,family",
    [
        (PFEIFFER, ("output",), False, "Pfeiffer bottleneck adapter"),
        (HOULSBY, ("attention.output", "output"), True, "Houlsby bottleneck adapter"),
        ({**PFEIFFER, "is_parallel": True, "scaling": 4.0}, ("output",), False, "parallel bottleneck adapter"),
    ],
)
def test_adapterhub_bottleneck_inspected_and_refused(tmp_path, config, positions, pickle, family):
    adapter = make_adapterhub(tmp_path / "hub", config, bottleneck_tensors(positions), pickle)
    result = run("inspect", adapter, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["format"] == "adapterhub" and summary["family"].startswith(f"AdapterHub {family}")
    assert summary["layers"] == [0, 1] and summary["bottleneck_size"] == [4] and summary["hidden_size"] == 64
    assert summary["params"] == 2 * len(positions) * (4 * 64 + 4 + 64 * 4 + 64)
    assert summary["config"] == config and summary["base_model"] == "tiny-bert"
    result = run("merge", FIXTURES / "tiny-bert", adapter, "-o", tmp_path / "merged")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and family in lines[0] and "non-linearity" in lines[0]
    assert not (tmp_path / "merged").exists()


def test_adapterhub_prompt_and_prefix_say_what_they_are(tmp_path):
    # the adapters library's own prompt tuning (fixtures/make_adapterhub_lora_fixtures.py)
    result = run("merge", FIXTURES / "tiny-bert", FIXTURES / "adapterhub" / "bert-prompt", "-o", tmp_path / "merged")
    assert result.exit_code == 1 and "AdapterHub prompt tuning adapter prepends its prompt" in result.output
    prefix = make_adapterhub(
        tmp_path / "prefix",
        {"architecture": "prefix_tuning", "prefix_length": 10},
        {"prefix_tunings.demo.wte.weight": torch.randn(10, 64)},
    )
    summary = json.loads(run("inspect", prefix, "--json").output)
    assert summary["family"] == "AdapterHub prefix tuning adapter" and summary["prefix_length"] == 10
    assert "learned keys and values" in summary["merge"]


def test_a_lora_after_appended_rows_is_refused_before_writing(tmp_path):
    from fixtures.make_fixtures import make_lora

    prompt, _ = make_prompt_adapter("llama", tmp_path / "prompt")
    lora = make_lora("llama", FIXTURES / "tiny-llama", tmp_path / "lora", target_modules=["embed_tokens"], r=2)
    result = run("merge", FIXTURES / "tiny-llama", prompt, lora, "-o", tmp_path / "merged")
    assert result.exit_code == 1 and "the one that appends rows given last" in result.output, result.output
    assert not (tmp_path / "merged").exists()
    assert run("merge", FIXTURES / "tiny-llama", lora, prompt, "-o", tmp_path / "merged").exit_code == 0
    result = run(
        "unmerge", tmp_path / "merged", lora, prompt, "-o", tmp_path / "restored", "--check", FIXTURES / "tiny-llama"
    )
    assert result.exit_code == 0, result.output
    assert Checkpoint(tmp_path / "restored").info("lm_head.weight").shape == (256, 64)


def test_tokenizer_of_another_size_is_left_alone_with_a_note(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    adapter, _ = make_prompt_adapter("llama", tmp_path / "adapter")
    base = shutil.copytree(FIXTURES / "tiny-llama", tmp_path / "base")
    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(200)}, unk_token="w0"))
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0").save_pretrained(base)
    result = run("merge", base, adapter, "-o", tmp_path / "merged")
    assert result.exit_code == 0 and "note: the tokenizer has 200 tokens but the embedding 256 rows" in result.output
    assert (tmp_path / "merged" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert "ids 256…259" in (tmp_path / "merged" / "README.md").read_text()


def test_a_prompt_merged_twice_is_refused_before_writing_naming_the_base(tmp_path):
    """Two prompt adapters append the same virtual tokens: refused before any tensor is written, and
    a base that already holds them is named (the refusal named the hidden temporary output)."""
    adapter, _ = make_prompt_adapter("llama", tmp_path / "adapter")
    base = with_tokenizer("llama", tmp_path / "base")
    result = run("merge", base, adapter, adapter, "-o", tmp_path / "twice")
    assert result.exit_code == 1 and "one prompt adapter at a time" in result.output, result.output
    assert run("merge", base, adapter, "-o", tmp_path / "merged").exit_code == 0
    result = run("merge", tmp_path / "merged", adapter, "-o", tmp_path / "again")
    assert result.exit_code == 1 and result.output.startswith(f"Error: {tmp_path / 'merged'}: "), result.output
    assert ".surgeon-" not in result.output and not list(tmp_path.glob("*again*"))


@pytest.mark.parametrize("untie", [False, True])
def test_tied_gpt2_keeps_its_vocabulary_wide_feed_forward_and_loads(tmp_path, untie):
    """tiny-gpt2's MLP is as wide as its vocabulary (256): only the embedding (and an untied head)
    may grow, and --untie must give the head the virtual tokens' rows too (it kept 256 rows beside a
    260-row embedding, and the MLP grew: transformers refused both checkpoints)."""
    from transformers import AutoModelForCausalLM

    adapter, peft_model = make_prompt_adapter("gpt2", tmp_path / "adapter")
    untied = ["--untie"] if untie else []
    result = run("merge", FIXTURES / "tiny-gpt2", adapter, "-o", tmp_path / "merged", *untied)
    assert result.exit_code == 0, result.output
    assert Checkpoint(tmp_path / "merged").info("transformer.h.0.mlp.c_fc.bias").shape == (256,)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.lm_head.weight.shape == (256 + VIRTUAL, 64)
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits[:, VIRTUAL:]
        got = merged(input_ids=torch.cat([torch.arange(256, 256 + VIRTUAL)[None], ids], dim=1)).logits
    torch.testing.assert_close(got[:, VIRTUAL:, :256], expected, rtol=1e-5, atol=1e-5)


def test_unmerge_from_a_model_it_was_never_merged_into_is_refused(tmp_path):
    """Dropping the last rows of a base that never had the prompt cut real vocabulary entries, exit 0."""
    adapter, _ = make_prompt_adapter("llama", tmp_path / "adapter")
    result = run("unmerge", FIXTURES / "tiny-llama", adapter, "-o", tmp_path / "restored")
    assert result.exit_code == 1 and "are not the rows the prompt adapter appended" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "restored").exists()


def test_quantized_output_keeps_the_grown_vocabulary_and_the_untied_head(tmp_path):
    """--dtype nf4 wrote config.json afresh from the base's: vocab_size 256 beside a 260-row embedding
    (transformers refused it) and, with --untie, tie_word_embeddings back to true."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    adapter, _ = make_prompt_adapter("llama", tmp_path / "adapter")
    assert run("merge", FIXTURES / "tiny-llama", adapter, "-o", tmp_path / "q", "--dtype", "nf4").exit_code == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["vocab_size"] == 256 + VIRTUAL
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert model.get_input_embeddings().weight.shape == (256 + VIRTUAL, 64)
    gpt2_adapter, _ = make_prompt_adapter("gpt2", tmp_path / "gpt2-adapter")
    result = run("merge", FIXTURES / "tiny-gpt2", gpt2_adapter, "-o", tmp_path / "u", "--dtype", "nf4", "--untie")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "u" / "config.json").read_text())["tie_word_embeddings"] is False


def test_export_of_a_prefix_adapter_onto_another_model_is_refused(tmp_path):
    """A llama prefix (2 key-value heads) traced into tiny-gpt2 (4 heads) failed inside attention: a traceback."""
    adapter, _ = make_prompt_adapter("llama", tmp_path / "adapter", "prefix")
    result = run("export-onnx", FIXTURES / "tiny-gpt2", "--adapter", adapter, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 1 and "does not fit this model" in result.output, result.output
    assert not list(tmp_path.glob("m.onnx*"))


def test_a_prompt_for_another_model_of_the_same_width_is_refused(tmp_path):
    """tiny-llama and tiny-bert are both 64 wide with 2 layers and 4 heads: only the model type PEFT
    recorded (base_model_name_or_path's config) tells them apart."""
    adapter, _ = make_prompt_adapter("llama", tmp_path / "adapter")
    result = run("merge", FIXTURES / "tiny-bert", adapter, "-o", tmp_path / "merged")
    assert result.exit_code == 1 and "a llama model" in result.output and "a bert model" in result.output
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["num_layers"] = 3
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = run("merge", FIXTURES / "tiny-llama", adapter, "-o", tmp_path / "merged")
    assert result.exit_code == 1 and "num_layers = 3, and the base has 2" in result.output
    assert not (tmp_path / "merged").exists()
