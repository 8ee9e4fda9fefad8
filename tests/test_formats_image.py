"""Image-model adapter formats (kohya, diffusers, LyCORIS), checked against their producers and
consumers: diffusers' own kohya↔PEFT conversions and loaders, and LyCORIS networks' forward pass.
Every adapter file is written by the producer itself, into a temporary directory."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from fixtures import make_image_fixtures as fx
from surgeon import formats
from surgeon.checkpoint import Checkpoint
from surgeon.cli import main
from surgeon.errors import SurgeonError
from surgeon.formats import diffusers as diffusers_format
from surgeon.formats import kohya, layouts
from surgeon.ops.apply import apply_deltas

pytest.importorskip("diffusers")
pytest.importorskip("lycoris")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with fx.single_thread():
        yield


def _max_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(expected)
    return max(
        float((got[k].reshape(expected[k].shape) - expected[k]).abs().max() / expected[k].abs().max()) for k in expected
    )


def _materialised(adapter) -> dict[str, torch.Tensor]:
    return {key: sum(d.materialize() for d in deltas) for key, deltas in adapter.items()}


def _low_rank_product(state: dict[str, torch.Tensor], down: str, up: str) -> dict[str, torch.Tensor]:
    """B@A (no scale) per module of a PEFT-layout state dict, keyed by the weight's name."""
    found = {}
    for key, a in state.items():
        if key.endswith(down):
            module = key[: -len(down)]
            b = state[module + up]
            found[module + ".weight"] = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
    return found


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD 1.x pipeline's U-Net and text encoder, their bases, and PEFT LoRAs on both with
    per-module ranks (conv1), alphas (ff.net.2) and rsLoRA (text encoder), as diffusers trains them."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("sd")
    unet, text_encoder = fx.tiny_unet(), fx.tiny_text_encoder()
    combined = fx.save_combined(root / "base.safetensors", unet=unet, text_encoder=text_encoder)
    unet.save_pretrained(root / "unet")
    fx.add_lora(unet, target_modules=fx.UNET_LORA_TARGETS, rank_pattern={"conv1": 2}, alpha_pattern={"ff.net.2": 3})
    fx.add_lora(text_encoder, target_modules=fx.TEXT_LORA_TARGETS, use_rslora=True)
    StableDiffusionPipeline.save_lora_weights(
        str(root / "diffusers_lora"),
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict(),
    )
    return {
        "root": root,
        "base": combined,
        "unet_dir": root / "unet",
        "diffusers": root / "diffusers_lora" / "pytorch_lora_weights.safetensors",
        "peft_state": {**fx.peft_state_dict(unet, "unet"), **fx.peft_state_dict(text_encoder, "text_encoder")},
        "truth": {**fx.lora_deltas(unet, "unet."), **fx.lora_deltas(text_encoder, "text_encoder.")},
    }


def _load_in_diffusers(path, metadata: bool = False) -> dict[str, torch.Tensor]:
    """What diffusers' SD loader makes of a LoRA file: each patched layer's ΔW."""
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    state, alphas, meta = loaded
    unet, text_encoder = fx.tiny_unet(), fx.tiny_text_encoder()
    StableDiffusionPipeline.load_lora_into_unet(
        state, alphas, unet, adapter_name="default", metadata=meta if metadata else None
    )
    StableDiffusionPipeline.load_lora_into_text_encoder(
        state, alphas, text_encoder, adapter_name="default", metadata=meta if metadata else None
    )
    return {**fx.lora_deltas(unet, "unet."), **fx.lora_deltas(text_encoder, "text_encoder.")}


# --- diffusers ---------------------------------------------------------------------------------


def test_diffusers_file_saved_by_diffusers_reads_as_peft_computes(sd):
    assert formats.detect(sd["diffusers"]).name == "diffusers"
    assert formats.detect(sd["diffusers"].parent).name == "diffusers"
    adapter = formats.read_adapter(sd["diffusers"])
    assert _max_error(_materialised(adapter), sd["truth"]) < 1e-6


def test_diffusers_writer_is_loaded_by_diffusers_with_the_same_scales(sd, tmp_path):
    adapter = formats.read_adapter(sd["diffusers"])
    diffusers_format.write(adapter, tmp_path / "out.safetensors")
    assert _max_error(_load_in_diffusers(tmp_path / "out.safetensors", metadata=True), sd["truth"]) < 1e-6
    again = formats.read_adapter(tmp_path / "out.safetensors")
    assert _max_error(_materialised(again), sd["truth"]) < 1e-6


def test_diffusers_older_layouts_read_like_diffusers_converts_them(sd, tmp_path):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft

    peft_state = sd["peft_state"]
    expected = _low_rank_product(peft_state, ".lora_A.weight", ".lora_B.weight")
    # The "diffusers" layout (lora.down / lora_linear_layer.down), by diffusers' own converter.
    save_file(convert_state_dict_to_diffusers(peft_state), tmp_path / "new.safetensors")
    # The attention-processor layout: U-Net attention as processor.to_q_lora, checked by
    # diffusers' converter mapping it back to the PEFT names.
    renames = {".to_q.": "to_q", ".to_k.": "to_k", ".to_v.": "to_v", ".to_out.0.": "to_out"}
    old = {}
    for key, tensor in peft_state.items():
        if key.startswith("unet.") and any(r in key for r in renames):
            projection = next(r for r in renames if r in key)
            side = "down" if ".lora_A." in key else "up"
            key = key.split(projection)[0] + f".processor.{renames[projection]}_lora.{side}.weight"
        old[key] = tensor
    unet_old = {k[5:]: v for k, v in old.items() if k.startswith("unet.")}
    assert set(convert_unet_state_dict_to_peft(unet_old)) == {k[5:] for k in peft_state if k.startswith("unet.")}
    save_file(old, tmp_path / "old.safetensors")
    for name in ("new", "old"):
        adapter = formats.read_adapter(tmp_path / f"{name}.safetensors")
        assert adapter.source_format == "diffusers"
        assert _max_error(_materialised(adapter), expected) < 1e-6


# --- kohya -------------------------------------------------------------------------------------


def test_kohya_file_from_diffusers_converter_resolves_against_the_base(sd, tmp_path):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    converted = convert_state_dict_to_kohya(sd["peft_state"])
    save_file({k: v.contiguous() for k, v in converted.items()}, tmp_path / "k.safetensors")
    assert formats.detect(tmp_path / "k.safetensors").name == "kohya"
    base = Checkpoint(sd["base"])
    adapter = formats.read_adapter(tmp_path / "k.safetensors", base=base)
    # diffusers writes alpha = rank, so the file means B@A whatever PEFT's alpha was.
    expected = _low_rank_product(sd["peft_state"], ".lora_A.weight", ".lora_B.weight")
    assert _max_error(_materialised(adapter), expected) < 1e-6
    assert all(tuple(d.shape) == base.info(k).shape for k, ds in adapter.items() for d in ds)


def test_kohya_writer_is_loaded_by_diffusers_with_the_same_scales(sd, tmp_path):
    # Per-module alphas on to_q/k/v/out are not exercised: diffusers 0.42's SD kohya loader keys
    # their network alphas as ...processor.to_k_lora.down.weight, which matches no module, and falls
    # back to the most common alpha. ff.net.2 and the rsLoRA text encoder carry the variety.
    adapter = formats.read_adapter(sd["diffusers"])
    notes = kohya.write(adapter, tmp_path / "k.safetensors")
    assert any("lora_adapter_metadata" in n for n in notes)
    assert _max_error(_load_in_diffusers(tmp_path / "k.safetensors"), sd["truth"]) < 1e-6
    with safe_open(tmp_path / "k.safetensors", "pt") as handle:
        metadata = handle.metadata()
        conv_down = handle.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (
        "4",
        "Dynamic",
    )  # linear ranks are one, alphas several
    assert json.loads(metadata["ss_network_args"])["conv_dim"] == "Dynamic"  # conv1 has rank 2, conv2 rank 4
    assert conv_down.shape == (2, 8, 3, 3)


def test_kohya_round_trip_keeps_factors_alphas_and_metadata(sd, tmp_path):
    adapter = formats.read_adapter(sd["diffusers"])
    kohya.write(adapter, tmp_path / "a.safetensors")
    with safe_open(tmp_path / "a.safetensors", "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    metadata = {
        "ss_training_comment": "hello",
        "modelspec.title": "tiny",
        "ss_network_dim": "8",
        "sshs_model_hash": "0xstale",
    }
    save_file(tensors, tmp_path / "b.safetensors", metadata=metadata)
    base = Checkpoint(sd["base"])
    first = formats.read_adapter(tmp_path / "b.safetensors", base=base)
    kohya.write(first, tmp_path / "c.safetensors")
    second = formats.read_adapter(tmp_path / "c.safetensors", base=base)
    assert _max_error(_materialised(second), _materialised(first)) == 0
    assert {k: d[0].scale for k, d in second.items()} == {k: d[0].scale for k, d in first.items()}
    with safe_open(tmp_path / "c.safetensors", "pt") as handle:
        assert {k for k in handle.keys()} == set(tensors)
        written = handle.metadata()
    assert written["ss_training_comment"] == "hello" and written["modelspec.title"] == "tiny"
    assert "sshs_model_hash" not in written and written["ss_network_dim"] == "4"


def test_kohya_names_need_the_base_and_say_which_do_not_match(sd, tmp_path):
    adapter = formats.read_adapter(sd["diffusers"])
    kohya.write(adapter, tmp_path / "k.safetensors")
    with pytest.raises(SurgeonError, match="--base"):
        formats.read_adapter(tmp_path / "k.safetensors")
    with pytest.raises(
        SurgeonError, match=r"lora_te_encoder_layers_0_mlp_fc1.*match no weight|match no weight.*lora_te_"
    ):
        formats.read_adapter(tmp_path / "k.safetensors", base=Checkpoint(sd["unet_dir"]))


def test_kohya_names_that_two_base_modules_share_are_refused(tmp_path):
    save_file({"a_b.c.weight": torch.zeros(2, 2), "a.b_c.weight": torch.zeros(2, 2)}, tmp_path / "base.safetensors")
    save_file(
        {"lora_unet_a_b_c.lora_down.weight": torch.ones(1, 2), "lora_unet_a_b_c.lora_up.weight": torch.ones(2, 1)},
        tmp_path / "k.safetensors",
    )
    with pytest.raises(SurgeonError, match="fits several base modules"):
        formats.read_adapter(tmp_path / "k.safetensors", base=Checkpoint(tmp_path / "base.safetensors"))


def test_merge_cli_applies_a_kohya_unet_lora(sd, tmp_path):
    adapter = formats.read_adapter(sd["diffusers"])
    adapter.deltas = {k: v for k, v in adapter.deltas.items() if k.startswith("unet.")}
    kohya.write(adapter, tmp_path / "unet_lora.safetensors")
    result = CliRunner().invoke(
        main, ["merge", str(sd["unet_dir"]), str(tmp_path / "unet_lora.safetensors"), "-o", str(tmp_path / "merged")]
    )
    assert result.exit_code == 0, result.output
    base, merged = Checkpoint(sd["unet_dir"]), Checkpoint(tmp_path / "merged")
    for key, delta in sd["truth"].items():
        if key.startswith("unet."):
            key = key[len("unet.") :]
            assert torch.allclose(merged.get(key), base.get(key) + delta, atol=1e-6)


def test_convert_cli_kohya_to_peft_and_back(sd, tmp_path):
    kohya.write(formats.read_adapter(sd["diffusers"]), tmp_path / "k.safetensors")
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "convert",
            str(tmp_path / "k.safetensors"),
            "--to",
            "peft",
            "--base",
            str(sd["base"]),
            "-o",
            str(tmp_path / "peft"),
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        [
            "convert",
            str(tmp_path / "peft"),
            "--to",
            "kohya",
            "--base",
            str(sd["base"]),
            "-o",
            str(tmp_path / "back.safetensors"),
        ],
    )
    assert result.exit_code == 0, result.output
    back = formats.read_adapter(tmp_path / "back.safetensors", base=Checkpoint(sd["base"]))
    assert _max_error(_materialised(back), sd["truth"]) < 1e-6


# --- LyCORIS -----------------------------------------------------------------------------------


def _lycoris_agrees(network, adapter, base: Checkpoint) -> float:
    """The largest relative difference between each LyCORIS module's forward output and the
    layer run with surgeon's merged weight (and bias)."""
    by_name = {name: module for module, name in adapter.config["kohya_names"].items()}
    worst = 0.0
    for lora in network.loras:
        layer, module = lora.org_module[0], by_name[lora.lora_name]
        weight = apply_deltas(
            base.get(module + ".weight").float(), [(d, 1.0) for d in adapter.deltas[module + ".weight"]]
        )
        bias = base.get(module + ".bias").float() if module + ".bias" in base else None
        if module + ".bias" in adapter.deltas:
            bias = apply_deltas(bias, [(d, 1.0) for d in adapter.deltas[module + ".bias"]])
        torch.manual_seed(0)
        if isinstance(layer, torch.nn.Linear):
            x = torch.randn(3, layer.in_features)
            expected = F.linear(x, weight, bias)
        else:
            x = torch.randn(2, layer.in_channels, 6, 6)
            expected = F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        with torch.no_grad():
            got = layer(x)
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    return worst


KOHYA_WRAPPER_CASES = [
    ("loha", {}, None),
    ("loha", dict(conv_dim=2, conv_alpha=3, use_tucker=True, preset="unet-convblock-only"), "hada_t1"),
    ("loha", dict(dora_wd=True), "dora_scale"),
    ("lokr", dict(factor=4), "lokr_w2_a"),
    ("lokr", dict(decompose_both=True, factor=4, dim=1), "lokr_w1_a"),
    ("lokr", dict(full_matrix=True), "lokr_w2"),
    ("lokr", dict(conv_dim=2, conv_alpha=1, use_tucker=True, preset="unet-convblock-only", factor=2), "lokr_t2"),
    ("lokr", dict(dora_wd=True, wd_on_output=False, factor=4), "dora_scale"),
    (
        "locon",
        dict(conv_dim=2, conv_alpha=1, use_tucker=True, preset="unet-convblock-only", dora_wd=True),
        "lora_mid.weight",
    ),
]


@pytest.mark.parametrize(
    "algo,options,part", KOHYA_WRAPPER_CASES, ids=[f"{a}-{'-'.join(o) or 'plain'}" for a, o, _ in KOHYA_WRAPPER_CASES]
)
def test_lycoris_kohya_networks_read_as_their_forward_computes(tmp_path, algo, options, part):
    unet, text_encoder = fx.tiny_unet(), fx.tiny_text_encoder()
    base = Checkpoint(fx.save_combined(tmp_path / "base.safetensors", unet=unet, text_encoder=text_encoder))
    network = fx.lycoris_kohya_network(unet, text_encoder, tmp_path / "l.safetensors", algo, **dict(options))
    if part:
        assert any(k.endswith("." + part) for k in layouts.header_keys(tmp_path / "l.safetensors"))
    expected_format = "kohya" if algo == "locon" else "lycoris"
    assert formats.detect(tmp_path / "l.safetensors").name == expected_format
    adapter = formats.read_adapter(tmp_path / "l.safetensors", base=base)
    assert len(adapter) == len(network.loras)
    assert adapter.metadata["modelspec.title"] == "fixture"
    assert _lycoris_agrees(network, adapter, base) < 1e-5


STANDALONE_CASES = [
    ("ia3", {}),
    ("full", {}),
    ("locon", dict(rs_lora=True)),
    ("lokr", dict(use_tucker=True, factor=2, dim=2)),
    ("loha", dict(use_tucker=True)),
    ("lokr", dict(dim=8, factor=2)),
]


@pytest.mark.parametrize(
    "algo,options", STANDALONE_CASES, ids=[f"{a}-{'-'.join(o) or 'plain'}" for a, o in STANDALONE_CASES]
)
def test_lycoris_standalone_networks_read_as_their_forward_computes(tmp_path, algo, options):
    model = fx.TinyNet()
    base = Checkpoint(fx.save_module(model, tmp_path / "base"))
    network = fx.lycoris_network(model, tmp_path / "l.safetensors", algo, **dict(options))
    assert formats.detect(tmp_path / "l.safetensors").name == "lycoris"
    adapter = formats.read_adapter(tmp_path / "l.safetensors", base=base)
    assert _lycoris_agrees(network, adapter, base) < 1e-5


def test_lycoris_ia3_on_input_scales_columns(tmp_path):
    from lycoris.modules.ia3 import IA3Module

    model = fx.TinyNet()
    base = Checkpoint(fx.save_module(model, tmp_path / "base"))
    module = IA3Module("lycoris_fc2", model.fc2, 1.0, train_on_input=True)
    module.apply_to()
    with torch.no_grad():
        module.weight.normal_(0, 0.3)
    save_file(
        {f"lycoris_fc2.{k}": v.contiguous() for k, v in module.state_dict().items() if not k.startswith("org")},
        tmp_path / "ia3.safetensors",
    )
    adapter = formats.read_adapter(tmp_path / "ia3.safetensors", base=base)
    x = torch.randn(3, 20)
    weight = apply_deltas(base.get("fc2.weight").float(), [(d, 1.0) for d in adapter.deltas["fc2.weight"]])
    with torch.no_grad():
        assert torch.allclose(model.fc2(x), F.linear(x, weight, base.get("fc2.bias")), atol=1e-6)
    with pytest.raises(SurgeonError, match="cannot unmerge"):
        from surgeon.ops.merge import unmerge

        unmerge(base, [(adapter, "ia3")], tmp_path / "out")


def test_lycoris_algorithms_surgeon_cannot_apply_are_refused(tmp_path):
    model = fx.TinyNet()
    base = Checkpoint(fx.save_module(model, tmp_path / "base"))
    fx.lycoris_network(model, tmp_path / "glora.safetensors", "glora")
    with pytest.raises(SurgeonError, match="GLoRA"):
        formats.read_adapter(tmp_path / "glora.safetensors", base=base)


# --- detection ---------------------------------------------------------------------------------


def test_unknown_layout_is_refused_with_what_was_looked_for(tmp_path):
    save_file({"something.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    assert formats.detect(tmp_path / "x.safetensors") is None
    with pytest.raises(SurgeonError) as error:
        formats.read_adapter(tmp_path / "x.safetensors")
    for name in ("kohya", "lycoris", "diffusers", "peft"):
        assert f"{name}: " in error.value.details
