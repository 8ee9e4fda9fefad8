"""`surgeon merge` against the real PEFT: `PeftModel.from_pretrained(...).merge_and_unload()` must
give the same weights, for every kind of adapter PEFT saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fixtures.make_fixtures import load_base, make_base, make_lora
from surgeon.checkpoint import Checkpoint
from surgeon.cli import main

peft = pytest.importorskip("peft")


def peft_merged_state(arch: str, base: Path, adapter: Path, dtype=None) -> dict[str, torch.Tensor]:
    model = load_base(arch, base)
    if dtype is not None:
        model = model.to(dtype)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def surgeon_merge(base: Path, adapters: list[Path], out: Path, *extra: str) -> Checkpoint:
    result = CliRunner().invoke(main, ["merge", str(base), *map(str, adapters), "-o", str(out), *extra])
    assert result.exit_code == 0, result.output
    return Checkpoint(out)


def assert_matches_peft(ours: Checkpoint, theirs: dict[str, torch.Tensor], atol: float = 2e-6) -> int:
    """Every tensor of our output equals PEFT's; returns how many differ from the base's."""
    assert set(ours.keys()) <= set(theirs), sorted(set(ours.keys()) - set(theirs))[:5]
    for key in ours.keys():
        torch.testing.assert_close(ours.get(key), theirs[key].to(ours.get(key).dtype), atol=atol, rtol=1e-5, msg=key)
    return len(ours)


def changed_keys(base: Path, merged: Checkpoint) -> set[str]:
    original = Checkpoint(base)
    return {k for k in merged.keys() if not torch.equal(original.get(k), merged.get(k))}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_bundled_fixtures_match_peft(arch, fixtures_dir, tmp_path):
    base, adapter = fixtures_dir / f"tiny-{arch}", fixtures_dir / f"tiny-{arch}-lora"
    ours = surgeon_merge(base, [adapter], tmp_path / "merged")
    assert_matches_peft(ours, peft_merged_state(arch, base, adapter))
    config = json.loads((adapter / "adapter_config.json").read_text())
    targets = config["target_modules"]
    changed = changed_keys(base, ours)
    assert changed and all(any(t in k for t in targets) for k in changed)


VARIANTS = {
    "rslora_patterns": (
        "llama",
        dict(
            use_rslora=True,
            r=8,
            lora_alpha=16,
            rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
            alpha_pattern={"v_proj": 3, "gate_proj": 32},
        ),
    ),
    "dora": ("llama", dict(use_dora=True)),
    "dora_conv1d": ("gpt2", dict(use_dora=True, fan_in_fan_out=True)),
    "embeddings_and_modules_to_save": (
        "llama",
        dict(target_modules=["embed_tokens", "q_proj", "v_proj"], modules_to_save=["lm_head"]),
    ),
    "bias_all": ("bert", dict(bias="all")),
    "lora_bias": ("bert", dict(lora_bias=True, target_modules=["query", "value"])),
    "dora_embedding": ("llama", dict(use_dora=True, target_modules=["embed_tokens", "k_proj"])),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_peft_variants_match_peft(name, fixtures_dir, tmp_path):
    arch, kwargs = VARIANTS[name]
    base = fixtures_dir / f"tiny-{arch}"
    adapter = make_lora(arch, base, tmp_path / "adapter", **kwargs)
    ours = surgeon_merge(base, [adapter], tmp_path / "merged")
    assert_matches_peft(ours, peft_merged_state(arch, base, adapter), atol=1e-5)
    assert changed_keys(base, ours)


def test_bf16_base_stays_bf16_and_is_rounded_once(tmp_path):
    base = make_base("llama", tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_lora("llama", tmp_path / "base", tmp_path / "adapter")
    ours = surgeon_merge(base, [adapter], tmp_path / "merged")
    assert {ours.info(k).dtype for k in ours.keys()} == {torch.bfloat16}
    # PEFT merged in fp32 and rounded to bf16 once is what we compute; PEFT's own bf16 merge rounds twice.
    exact = peft_merged_state("llama", base, adapter, dtype=torch.float32)
    for key in ours.keys():
        torch.testing.assert_close(ours.get(key), exact[key].to(torch.bfloat16), atol=0, rtol=2**-8, msg=key)


def test_sharded_input_and_output(fixtures_dir, tmp_path):
    base = make_base("llama", tmp_path / "base", max_shard_size="100KB")
    assert (base / "model.safetensors.index.json").is_file()
    adapter = fixtures_dir / "tiny-llama-lora"
    out = tmp_path / "merged"
    ours = surgeon_merge(base, [adapter], out, "--shard-size", "120KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == ours.num_bytes()
    for shard in shards:
        assert load_file(out / shard)  # each shard is a valid safetensors file on its own
    assert_matches_peft(ours, peft_merged_state("llama", base, adapter))
    reloaded = load_base("llama", out)  # transformers reads the sharded output
    torch.testing.assert_close(
        reloaded.state_dict()["model.layers.1.self_attn.q_proj.weight"],
        ours.get("model.layers.1.self_attn.q_proj.weight"),
    )


def test_two_adapters_with_weights_match_peft_sequential_merge(fixtures_dir, tmp_path):
    base = fixtures_dir / "tiny-llama"
    first = fixtures_dir / "tiny-llama-lora"
    second = make_lora("llama", base, tmp_path / "second", seed=7, r=4, lora_alpha=4)
    ours = surgeon_merge(base, [first, second], tmp_path / "merged", "-w", "0.5", "-w", "2")
    model = load_base("llama", base)
    model = peft.PeftModel.from_pretrained(model, first, adapter_name="a")
    model.load_adapter(second, adapter_name="b")
    for name, weight in (("a", 0.5), ("b", 2.0)):  # scale each adapter the way --weight does
        for module in model.modules():
            if isinstance(getattr(module, "scaling", None), dict) and name in module.scaling:
                module.scaling[name] *= weight
    model.base_model.set_adapter(["a", "b"])
    merged = model.merge_and_unload()
    assert_matches_peft(ours, merged.state_dict(), atol=1e-5)


def test_conv2d_lora_matches_peft(tmp_path):
    """Conv LoRA (k×k A, 1×1 B) on a plain torch module saved as safetensors."""
    from safetensors.torch import save_file

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.head = torch.nn.Linear(8, 4)

    torch.manual_seed(0)
    net = Net()
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, base / "model.safetensors")
    model = peft.get_peft_model(
        net, peft.LoraConfig(target_modules=["conv", "head"], r=2, lora_alpha=4, init_lora_weights=False)
    )
    model.save_pretrained(tmp_path / "adapter")
    expected = model.merge_and_unload().state_dict()
    ours = surgeon_merge(base, [tmp_path / "adapter"], tmp_path / "merged")
    assert_matches_peft(ours, expected)
    assert changed_keys(base, ours) == {"conv.weight", "head.weight"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unmerge_inverts_merge(arch, fixtures_dir, tmp_path):
    base, adapter = fixtures_dir / f"tiny-{arch}", fixtures_dir / f"tiny-{arch}-lora"
    surgeon_merge(base, [adapter], tmp_path / "merged")
    result = CliRunner().invoke(
        main,
        [
            "unmerge",
            str(tmp_path / "merged"),
            str(adapter),
            "-o",
            str(tmp_path / "restored"),
            "--check",
            str(base),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["check"]["max_abs_error"] < 1e-5
    restored, original = Checkpoint(tmp_path / "restored"), Checkpoint(base)
    for key in original.keys():
        torch.testing.assert_close(restored.get(key), original.get(key), atol=1e-5, rtol=0)
