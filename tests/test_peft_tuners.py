"""PEFT's LoHa, LoKr, IA3 and VeRA adapters: surgeon's merge of each, from the saved files,
against PEFT's own ``merge_and_unload`` of the same adapter."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from fixtures import make_image_fixtures as fx
from fixtures.make_fixtures import load_base
from surgeon import formats
from surgeon.checkpoint import Checkpoint
from surgeon.cli import main
from surgeon.errors import SurgeonError
from surgeon.ops.apply import apply_deltas

peft = pytest.importorskip("peft")
TARGETS = ["fc1", "fc2", "conv", "pw"]

CASES = {
    "loha-effective-conv-patterns": lambda: peft.LoHaConfig(
        r=2,
        alpha=3,
        target_modules=TARGETS,
        use_effective_conv2d=True,
        rank_pattern={"fc2": 3},
        alpha_pattern={"conv": 5},
    ),
    "loha-flat-conv": lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=TARGETS),
    "lokr-both-decomposed": lambda: peft.LoKrConfig(
        r=2, alpha=3, target_modules=TARGETS, decompose_both=True, decompose_factor=2, use_effective_conv2d=True
    ),
    "lokr-whole-halves": lambda: peft.LoKrConfig(r=8, alpha=3, target_modules=TARGETS),
    "ia3-feedforward": lambda: peft.IA3Config(target_modules=TARGETS, feedforward_modules=["fc2", "pw"]),
    "vera-saved-projection": lambda: peft.VeraConfig(r=4, target_modules=["fc1", "fc2"]),
    "vera-regenerated-projection": lambda: peft.VeraConfig(
        r=4, target_modules=["fc1", "fc2"], save_projection=False, projection_prng_key=7
    ),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with fx.single_thread():
        yield


def _merged_by_surgeon(base: Checkpoint, adapter) -> dict[str, torch.Tensor]:
    merged = {}
    for key in base.keys():
        weight = base.get(key).float()
        merged[key] = apply_deltas(weight, [(d, 1.0) for d in adapter.deltas[key]]) if key in adapter.deltas else weight
    return merged


def _worst(merged: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert set(merged) == set(reference)
    return max(float((merged[k] - reference[k]).abs().max() / reference[k].abs().max()) for k in reference)


@pytest.mark.parametrize("case", list(CASES))
def test_tuner_merges_as_peft_merge_and_unload(tmp_path, case):
    model = fx.TinyNet()
    base = Checkpoint(fx.save_module(model, tmp_path / "base"))
    peft_model = fx.peft_tuner(CASES[case](), model, tmp_path / "adapter")
    reference = peft_model.merge_and_unload().state_dict()
    assert formats.detect(tmp_path / "adapter").name == "peft"
    adapter = formats.read_adapter(tmp_path / "adapter", base=base)
    assert adapter.source_format == "peft-" + case.split("-")[0]
    assert _worst(_merged_by_surgeon(base, adapter), reference) < 1e-6


def test_gpt2_conv1d_targets_follow_fan_in_fan_out(tmp_path, fixtures_dir):
    base = Checkpoint(fixtures_dir / "tiny-gpt2")
    for name, config in {
        "ia3": peft.IA3Config(
            target_modules=["c_attn", "c_fc", "c_proj"], feedforward_modules=["c_fc"], fan_in_fan_out=True
        ),
        "vera": peft.VeraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    }.items():
        model = load_base("gpt2", fixtures_dir / "tiny-gpt2")
        peft_model = fx.peft_tuner(config, model, tmp_path / name)
        reference = peft_model.merge_and_unload().state_dict()
        adapter = formats.read_adapter(tmp_path / name, base=base)
        result = CliRunner().invoke(
            main,
            ["merge", str(fixtures_dir / "tiny-gpt2"), str(tmp_path / name), "-o", str(tmp_path / f"{name}-merged")],
        )
        assert result.exit_code == 0, result.output
        merged = Checkpoint(tmp_path / f"{name}-merged")
        for key in adapter.deltas:
            expected = reference[key] if key in reference else reference[key.replace("transformer.", "", 1)]
            assert torch.allclose(merged.get(key), expected, rtol=1e-5, atol=1e-6), (name, key)


def test_merge_cli_applies_ia3_and_unmerge_refuses_it(tmp_path):
    model = fx.TinyNet()
    fx.save_module(model, tmp_path / "base")
    peft_model = fx.peft_tuner(CASES["ia3-feedforward"](), model, tmp_path / "ia3")
    reference = peft_model.merge_and_unload().state_dict()
    runner = CliRunner()
    result = runner.invoke(
        main, ["merge", str(tmp_path / "base"), str(tmp_path / "ia3"), "-o", str(tmp_path / "merged")]
    )
    assert result.exit_code == 0, result.output
    merged = Checkpoint(tmp_path / "merged")
    assert max(float((merged.get(k) - v).abs().max()) for k, v in reference.items()) < 1e-6
    result = runner.invoke(
        main, ["unmerge", str(tmp_path / "merged"), str(tmp_path / "ia3"), "-o", str(tmp_path / "restored")]
    )
    assert result.exit_code != 0 and "cannot unmerge" in result.output


def test_ia3_without_base_says_to_pass_it(tmp_path):
    model = fx.TinyNet()
    fx.peft_tuner(CASES["ia3-feedforward"](), model, tmp_path / "ia3")
    with pytest.raises(SurgeonError, match="--base"):
        formats.read_adapter(tmp_path / "ia3")
