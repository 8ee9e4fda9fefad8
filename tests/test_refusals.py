"""Every refusal of the core commands: one clear sentence, exit code 1, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from fixtures.make_fixtures import make_base, make_lora
from surgeon.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(map(str, args)))


def assert_refused(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def copy_adapter(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def test_adapter_key_missing_from_base_names_key_and_closest(fixtures_dir, tmp_path):
    adapter = copy_adapter(fixtures_dir / "tiny-llama-lora", tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    renamed = {k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qq_proj"): v for k, v in tensors.items()}
    save_file(renamed, adapter / "adapter_model.safetensors")
    result = run("merge", fixtures_dir / "tiny-llama", adapter, "-o", tmp_path / "out")
    assert_refused(
        result, "model.layers.1.self_attn.qq_proj.weight", "Closest base keys", "model.layers.1.self_attn.q_proj.weight"
    )
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_model_is_refused_on_shape(fixtures_dir, tmp_path):
    other = make_base("llama", tmp_path / "wide", seed=3)
    config = json.loads((other / "config.json").read_text())
    assert config["hidden_size"] == 64
    small = tmp_path / "small"
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(small)
    result = run("merge", small, fixtures_dir / "tiny-llama-lora", "-o", tmp_path / "out")
    assert_refused(result, "has shape", "different model")
    assert not (tmp_path / "out").exists()


def test_nonfinite_delta_refused_unless_allowed(fixtures_dir, tmp_path):
    adapter = copy_adapter(fixtures_dir / "tiny-llama-lora", tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    assert_refused(
        run("merge", fixtures_dir / "tiny-llama", adapter, "-o", tmp_path / "out"), "NaN or Inf", "allow non-finite"
    )
    assert not (tmp_path / "out").exists()
    result = run("merge", fixtures_dir / "tiny-llama", adapter, "-o", tmp_path / "out", "--allow-nonfinite")
    assert result.exit_code == 0, result.output


def test_existing_output_needs_force_and_inputs_are_never_outputs(fixtures_dir, tmp_path):
    base, adapter = fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert_refused(run("merge", base, adapter, "-o", out), "already exists", "--force")
    assert_refused(run("merge", base, adapter, "-o", out, "--force"), "keep.txt", "surgeon does not write")
    assert (out / "keep.txt").read_text() == "old"
    copy = shutil.copytree(base, tmp_path / "base")
    before = (copy / "model.safetensors").read_bytes()
    assert_refused(run("merge", copy, adapter, "-o", copy, "--force"), "overwrite the input")
    assert_refused(run("merge", copy, adapter, "-o", tmp_path, "--force"), "overwrite the input")
    assert (copy / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".*surgeon-*"))


def test_unmerge_refuses_dora_and_modules_to_save(fixtures_dir, tmp_path):
    base = fixtures_dir / "tiny-llama"
    dora = make_lora("llama", base, tmp_path / "dora", use_dora=True, target_modules=["q_proj"])
    assert_refused(run("unmerge", base, dora, "-o", tmp_path / "out"), "DoRA", "cannot unmerge")
    saved = make_lora("llama", base, tmp_path / "mts", target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert_refused(run("unmerge", base, saved, "-o", tmp_path / "out"), "lm_head.weight", "replaced whole")
    assert not (tmp_path / "out").exists()


def test_dora_with_weight_is_refused(fixtures_dir, tmp_path):
    dora = make_lora("llama", fixtures_dir / "tiny-llama", tmp_path / "dora", use_dora=True, target_modules=["q_proj"])
    assert_refused(
        run("merge", fixtures_dir / "tiny-llama", dora, "-w", "0.5", "-o", tmp_path / "out"), "DoRA", "weight 1"
    )


def test_weight_count_must_match_adapters(fixtures_dir, tmp_path):
    result = run(
        "merge",
        fixtures_dir / "tiny-llama",
        fixtures_dir / "tiny-llama-lora",
        "-w",
        "1",
        "-w",
        "2",
        "-o",
        tmp_path / "o",
    )
    assert_refused(result, "2 weights for 1 adapters")


def test_lora_bias_on_a_base_without_bias_is_refused(fixtures_dir, tmp_path):
    adapter = make_lora("llama", fixtures_dir / "tiny-llama", tmp_path / "a", lora_bias=True, target_modules=["q_proj"])
    assert_refused(run("merge", fixtures_dir / "tiny-llama", adapter, "-o", tmp_path / "o"), "q_proj.bias")


class Smuggled:
    """Any class outside torch's allowlist makes a pickle need full unpickling."""


def test_pickle_needing_full_unpickling_is_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    torch.save({"w": torch.zeros(2, 2), "extra": Smuggled()}, base / "pytorch_model.bin")
    assert_refused(run("inspect", base), "arbitrary code", "safetensors")


def test_plain_bin_checkpoint_is_read_with_weights_only(fixtures_dir, tmp_path):
    state = load_file(fixtures_dir / "tiny-llama" / "model.safetensors")
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(state, binary / "pytorch_model.bin")
    shutil.copy(fixtures_dir / "tiny-llama" / "config.json", binary)
    result = run("merge", binary, fixtures_dir / "tiny-llama-lora", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    reference = run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", tmp_path / "ref")
    assert reference.exit_code == 0
    ours, theirs = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(
    "option, label", [("layer_replication", "layer replication"), ("trainable_token_indices", "trainable tokens")]
)
def test_unsupported_peft_options_are_named(option, label, fixtures_dir, tmp_path):
    adapter = copy_adapter(fixtures_dir / "tiny-llama-lora", tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[option] = [[0, 1]] if option == "layer_replication" else [1, 2]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert_refused(run("merge", fixtures_dir / "tiny-llama", adapter, "-o", tmp_path / "o"), label, option)


def test_non_lora_peft_type_is_refused(fixtures_dir, tmp_path):
    adapter = copy_adapter(fixtures_dir / "tiny-llama-lora", tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = "PREFIX_TUNING"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert_refused(run("inspect", adapter), "PREFIX_TUNING")


def test_unknown_path_lists_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_refused(run("inspect", tmp_path), "a directory of 1 entries", "neither an adapter nor a checkpoint")
    verbose = run("-v", "inspect", tmp_path)
    assert verbose.exit_code == 1 and "adapter_config.json" in verbose.output and "sparse_config.json" in verbose.output


def test_missing_path_is_a_usage_error(tmp_path):
    result = run("merge", tmp_path / "nope", tmp_path / "nada", "-o", tmp_path / "o")
    assert result.exit_code == 2 and "no such file" in result.output


def test_truncated_safetensors_is_named(tmp_path):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert_refused(run("inspect", broken), str(broken), "not a valid safetensors file")


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--device", "gpu"], "unknown device"),
        (["--shard-size", "inf"], "cannot read the size"),
        (["--shard-size", "nan"], "cannot read the size"),
        (["--from", "sparse"], "not in the sparse format"),
    ],
)
def test_bad_options_are_one_line_errors(extra, fragment, fixtures_dir, tmp_path):
    result = run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", tmp_path / "o", *extra)
    assert_refused(result, fragment)
    assert not (tmp_path / "o").exists()


def test_output_inside_an_input_directory_is_refused(fixtures_dir, tmp_path):
    base = shutil.copytree(fixtures_dir / "tiny-llama", tmp_path / "base")
    assert_refused(run("merge", base, fixtures_dir / "tiny-llama-lora", "-o", base / "merged"), "inside the input")
    assert sorted(p.name for p in base.iterdir()) == sorted(p.name for p in (fixtures_dir / "tiny-llama").iterdir())


def test_output_under_a_file_is_refused(fixtures_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_refused(
        run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", tmp_path / "file" / "o"),
        "cannot create the output's folder",
    )


def test_corrupt_shard_index_is_named(fixtures_dir, tmp_path):
    base = shutil.copytree(fixtures_dir / "tiny-llama", tmp_path / "base")
    (base / "model.safetensors.index.json").write_text("{not json")
    assert_refused(run("inspect", base), "model.safetensors.index.json", "not valid JSON")


def test_rank_bounds_are_checked(fixtures_dir, tmp_path):
    result = run("resize", fixtures_dir / "tiny-llama-lora", "--rank", "2", "--max-rank", "-1", "-o", tmp_path / "o")
    assert result.exit_code == 2 and "--max-rank" in result.output and not (tmp_path / "o").exists()
    assert_refused(
        run("resize", fixtures_dir / "tiny-llama-lora", "--rank", "2", "--energy", "0.5", "-o", tmp_path / "o"),
        "exactly one of --rank, --energy, --max-error",
    )


def test_convert_to_diffusers_of_a_bare_model_round_trips(fixtures_dir, tmp_path):
    """diffusers files name a pipeline component; a bare model's keys go under the denoiser's, and
    the read-back check matches them the way merge does."""
    result = run("convert", fixtures_dir / "tiny-llama-lora", "--to", "diffusers", "-o", tmp_path / "d.safetensors")
    assert result.exit_code == 0, result.output
    merged = run("merge", fixtures_dir / "tiny-llama", tmp_path / "d.safetensors", "-o", tmp_path / "m")
    assert merged.exit_code == 0, merged.output
    reference = run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", tmp_path / "r")
    assert reference.exit_code == 0
    ours, theirs = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "r" / "model.safetensors")
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)
