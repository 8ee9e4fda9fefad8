"""Issue 15's bugs, each with the real producer: PEFT LoKr/IA3/LoHa through resize and compose,
kohya and GGUF adapters composed against a base, several low-rank deltas on one key written as
PEFT, a diffusers adapter converted to PEFT and loaded by PEFT, and extract / unmerge --check on a
fine-tune saved by transformers without its non-persistent buffers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from fixtures import make_image_fixtures as fx
from surgeon import formats
from surgeon.bundle import write_result
from surgeon.checkpoint import Checkpoint
from surgeon.cli import main
from surgeon.delta import Adapter, LowRank
from surgeon.formats import peft as peft_format
from surgeon.ops.compose import compose, read_adapters, resize
from surgeon.ops.rank import RankRule

peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parent.parent
LINEAR, CONV = ["fc1", "fc2"], ["conv", "pw"]
TUNERS = {
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=LINEAR, decompose_both=True, decompose_factor=2),
    "loha-large": lambda: peft.LoHaConfig(r=4, alpha=3, target_modules=LINEAR),  # r²(m+k) > m·k: a dense ΔW
    # a convolution's kernel is not in these files: only the base tells it
    "lokr-conv": lambda: peft.LoKrConfig(
        r=2, alpha=3, target_modules=LINEAR + CONV, decompose_both=True, decompose_factor=2
    ),
    "ia3": lambda: peft.IA3Config(target_modules=LINEAR + CONV, feedforward_modules=["fc2"]),
}


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def dense(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Each target's summed ΔW (the adapters here hold no whole-weight replacements)."""
    return {k: sum(d.materialize(dtype=torch.float64) for d in ds) for k, ds in adapter.items()}


def worst(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(expected)
    return max(float((got[k] - expected[k]).norm() / expected[k].norm()) for k in expected)


@pytest.fixture(scope="module")
def tuners(tmp_path_factory):
    """A TinyNet base and, per PEFT tuner, the adapter PEFT saved for it and its reference ΔW."""
    root = tmp_path_factory.mktemp("tuners")
    with fx.single_thread():
        base_path = fx.save_module(fx.TinyNet(), root / "base")
        base = Checkpoint(base_path)
        made = {}
        for name, config in TUNERS.items():
            merged = fx.peft_tuner(config(), fx.TinyNet(), root / name).merge_and_unload().state_dict()
            made[name] = (
                root / name,
                {
                    k: merged[k].double() - base.get(k).double()
                    for k in base.keys()
                    if not torch.equal(merged[k], base.get(k))
                },
            )
        yield base_path, made


@pytest.mark.parametrize("name", ["lokr", "loha-large"])
def test_resize_turns_a_peft_lokr_or_large_loha_into_a_lora_peft_loads(tuners, tmp_path, name):
    base_path, made = tuners
    path, truth = made[name]
    result = run("resize", path, "--rank", 64, "-o", tmp_path / "lora")
    assert result.exit_code == 0, result.output
    assert formats.detect(tmp_path / "lora").name == "peft"
    loaded = peft.PeftModel.from_pretrained(fx.TinyNet(), tmp_path / "lora").merge_and_unload().state_dict()
    base = Checkpoint(base_path)
    assert worst({k: loaded[k].double() - base.get(k).double() for k in truth}, truth) < 1e-5


@pytest.mark.parametrize("name", ["lokr", "loha-large"])
def test_compose_cat_takes_a_peft_lokr_or_large_loha(tuners, tmp_path, name):
    path, truth = tuners[1][name]
    result = run("compose", path, path, "-w", 0.25, "-w", 0.5, "-o", tmp_path / "mix", "--json")
    assert result.exit_code == 0, result.output
    written = json.loads(result.output)["written"]
    adapter = formats.read_adapter(Path(written[-1]))  # dense ΔWs are kept exactly, as a sparse diff
    assert worst(dense(adapter), {k: 0.75 * v for k, v in truth.items()}) < 1e-6


@pytest.mark.parametrize("name", ["ia3", "lokr-conv"])
def test_adapters_that_need_the_base_compose_and_resize_against_it(tuners, tmp_path, name):
    """The library route the CLI takes with --base: read_adapters(paths, base=...), then compose or resize."""
    base_path, made = tuners
    path, truth = made[name]
    base = Checkpoint(base_path)
    ((adapter, where),) = read_adapters([path], base=base)
    composed, _ = compose([(adapter, where)], [2.0])
    assert worst(dense(composed), {k: 2 * v for k, v in truth.items()}) < 1e-6
    resized, _ = resize(adapter, RankRule(rank=64))
    weights = {k: v for k, v in truth.items() if k.endswith(".weight")}
    write_result(
        Adapter(deltas={k: resized.deltas[k] for k in weights}, module_types=resized.module_types),
        tmp_path / "lora",
        tmp_path / "lora",
    )
    loaded = peft.PeftModel.from_pretrained(fx.TinyNet(), tmp_path / "lora").merge_and_unload().state_dict()
    assert worst({k: loaded[k].double() - base.get(k).double() for k in weights}, weights) < 1e-5


def test_inspect_names_kinds_not_classes(tuners):
    result = run("inspect", tuners[1]["lokr"][0], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["deltas"]) == {"dense"}
    assert not any(name in result.output for name in ("LazyDense", "Dense", "LowRank"))


def test_kohya_and_gguf_adapters_compose_against_the_base(tmp_path):
    base_path, lora = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "tiny-llama-lora"
    base = Checkpoint(base_path)
    for fmt, out in (("kohya", "k.safetensors"), ("gguf", "a.gguf")):
        result = run("convert", lora, "--to", fmt, "--base", base_path, "-o", tmp_path / out)
        assert result.exit_code == 0, result.output
    loaded = read_adapters([tmp_path / "k.safetensors", tmp_path / "a.gguf", lora], base=base)
    composed, _ = compose(loaded, [1.0, 1.0, -2.0])
    assert max(float(v.abs().max()) for v in dense(composed).values()) < 1e-5
    assert set(composed.deltas) == set(read_adapters([lora], base=base)[0][0].deltas)


def test_peft_writer_keeps_every_low_rank_delta_on_a_key(tmp_path):
    source = formats.read_adapter(ROOT / "fixtures" / "tiny-llama-lora")
    stacked = Adapter(source_format="compose")
    for key, (low,) in source.items():
        stacked.add(key, low)
        stacked.add(key, LowRank(low.down.flip(0), low.up * 0.5, scale=3.0, shape=low.shape))
    notes = peft_format.write(stacked, tmp_path / "peft")
    back = formats.read_adapter(tmp_path / "peft")
    assert worst(dense(back), dense(stacked)) < 1e-6
    assert any("stacked" in note for note in notes)
    low_ranks = stacked.low_ranks()
    assert worst({k: d.materialize(dtype=torch.float64) for k, d in low_ranks.items()}, dense(stacked)) < 1e-6


def test_a_diffusers_unet_lora_converted_to_peft_loads_into_the_unet(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    with fx.single_thread():
        unet = fx.add_lora(fx.tiny_unet(), target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        truth = fx.lora_deltas(unet)
        StableDiffusionPipeline.save_lora_weights(
            str(tmp_path / "d"),
            unet_lora_layers=get_peft_model_state_dict(unet),
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        )
        result = run("convert", tmp_path / "d", "--to", "peft", "-o", tmp_path / "peft")
        assert result.exit_code == 0, result.output
        merged = peft.PeftModel.from_pretrained(fx.tiny_unet(), tmp_path / "peft").merge_and_unload().state_dict()
        base = fx.tiny_unet().state_dict()
    assert (
        worst({k: merged[k].double() - base[k].double() for k in truth}, {k: v.double() for k, v in truth.items()})
        < 1e-5
    )
    assert "'unet.'" in result.output  # the note says the component prefix was dropped


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    """A BERT base as older transformers (and most Hub files) saved it, with the int64
    ``embeddings.position_ids`` buffer, and a fine-tune of it saved by today's save_pretrained,
    which leaves that non-persistent buffer out."""
    import transformers

    root = tmp_path_factory.mktemp("bert")
    state = load_file(ROOT / "fixtures" / "tiny-bert" / "model.safetensors")
    state["embeddings.position_ids"] = torch.arange(128).reshape(1, -1)
    (root / "base").mkdir()
    save_file(state, root / "base" / "model.safetensors", metadata={"format": "pt"})
    (root / "base" / "config.json").write_bytes((ROOT / "fixtures" / "tiny-bert" / "config.json").read_bytes())
    model = transformers.BertModel.from_pretrained(ROOT / "fixtures" / "tiny-bert")
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("query.weight"):
                param.add_(0.05 * torch.randn(param.shape[0], 2) @ torch.randn(2, param.shape[1]))
    model.save_pretrained(root / "tuned")
    assert "embeddings.position_ids" not in Checkpoint(root / "tuned").keys()
    return root / "base", root / "tuned"


def test_extract_skips_a_buffer_save_pretrained_dropped(bert_pair, tmp_path):
    base, tuned = bert_pair
    result = run("extract", base, tuned, "--rank", 2, "-o", tmp_path / "lora", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    skipped = {r["key"]: r for r in report["modules"] if r["action"] == "skipped"}
    assert "embeddings.position_ids" in skipped and report["one_sided"] == ["embeddings.position_ids"]
    assert report["targets"] == 2 and report["max_relative_error"] < 1e-5


def test_unmerge_check_compares_against_a_base_without_the_buffer(bert_pair, tmp_path):
    base, tuned = bert_pair
    lora = ROOT / "fixtures" / "tiny-bert-lora"
    assert run("merge", base, lora, "-o", tmp_path / "merged").exit_code == 0
    result = run(
        "unmerge",
        tmp_path / "merged",
        lora,
        "-o",
        tmp_path / "restored",
        "--check",
        ROOT / "fixtures" / "tiny-bert",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["check"]["max_abs_error"] < 1e-5


def test_a_float_parameter_on_one_side_only_is_still_refused(bert_pair, tmp_path):
    base, _ = bert_pair
    state = load_file(base / "model.safetensors")
    del state["pooler.dense.bias"]
    (tmp_path / "cut").mkdir()
    save_file(state, tmp_path / "cut" / "model.safetensors")
    result = run("extract", base, tmp_path / "cut", "--rank", 2, "-o", tmp_path / "x")
    assert result.exit_code == 1 and "pooler.dense.bias" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_compose_refuses_two_names_for_one_parameter_without_the_base(tmp_path):
    """A diffusers file names ``unet.model.x`` what a PEFT adapter names ``model.x``: summed as two
    targets they would be silently wrong, so compose asks for the base, which names both alike."""
    lora = ROOT / "fixtures" / "tiny-llama-lora"
    assert run("convert", lora, "--to", "diffusers", "-o", tmp_path / "d.safetensors").exit_code == 0
    result = run("compose", tmp_path / "d.safetensors", lora, "-o", tmp_path / "mix")
    assert result.exit_code == 1 and "base checkpoint" in result.output and len(result.output.strip().splitlines()) == 1
    loaded = read_adapters([tmp_path / "d.safetensors", lora], base=Checkpoint(ROOT / "fixtures" / "tiny-llama"))
    composed, _ = compose(loaded, [1.0, -1.0])
    assert max(float(v.abs().max()) for v in dense(composed).values()) < 1e-6


def test_one_dtype_list_for_every_command():
    """The CLI's torch-free --dtype choices and the library's dtype table name the same dtypes."""
    from surgeon.cli.common import DTYPE_CHOICES
    from surgeon.ops.merge import DTYPES

    assert list(DTYPE_CHOICES) == ["auto", *DTYPES]
