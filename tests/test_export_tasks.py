"""export-onnx beyond text decoders (issue 17, part 4): vision classifiers and encoders, CLIP, T5/BART
and Whisper as encoder + decoder graphs, mixtures of experts; each run in onnxruntime against torch
(against PEFT's own forward pass where a LoRA is merged) on shapes the export never saw. Tiny random
models built here; the legacy exporter, which takes a second where dynamo takes ten."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("peft")

import onnxruntime  # noqa: E402
import transformers  # noqa: E402

from surgeon.cli import main  # noqa: E402

LAYER = dict(num_hidden_layers=1, num_attention_heads=2)
ENCODER_DECODER = dict(
    vocab_size=32,
    d_model=8,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=16,
    decoder_ffn_dim=16,
)
EXPERTS = dict(
    intermediate_size=16, num_key_value_heads=1, vocab_size=32, num_local_experts=4, num_experts_per_tok=2, **LAYER
)
TINY = {
    "vit": lambda t: t.ViTForImageClassification(
        t.ViTConfig(hidden_size=8, intermediate_size=16, image_size=8, patch_size=4, num_labels=3, **LAYER)
    ),
    "deit": lambda t: t.DeiTForImageClassification(
        t.DeiTConfig(hidden_size=8, intermediate_size=16, image_size=8, patch_size=4, num_labels=3, **LAYER)
    ),
    "dinov2": lambda t: t.Dinov2Model(t.Dinov2Config(hidden_size=8, mlp_ratio=2, image_size=8, patch_size=4, **LAYER)),
    "swin": lambda t: t.SwinForImageClassification(
        t.SwinConfig(embed_dim=8, depths=[1], num_heads=[2], image_size=8, patch_size=2, window_size=2, num_labels=3)
    ),
    "clip": lambda t: t.CLIPModel(
        t.CLIPConfig(
            text_config=dict(
                hidden_size=8, intermediate_size=16, vocab_size=32, max_position_embeddings=16, eos_token_id=31, **LAYER
            ),
            vision_config=dict(hidden_size=8, intermediate_size=16, image_size=8, patch_size=4, **LAYER),
            projection_dim=8,
        )
    ),
    "clip-vision": lambda t: t.CLIPVisionModel(
        t.CLIPVisionConfig(hidden_size=8, intermediate_size=16, image_size=8, patch_size=4, **LAYER)
    ),
    "t5": lambda t: t.T5ForConditionalGeneration(
        t.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, decoder_start_token_id=0)
    ),
    "bart": lambda t: t.BartForConditionalGeneration(
        t.BartConfig(
            **ENCODER_DECODER,
            max_position_embeddings=32,
        )
    ),
    "whisper": lambda t: t.WhisperForConditionalGeneration(
        t.WhisperConfig(
            **ENCODER_DECODER,
            num_mel_bins=4,
            max_source_positions=6,
            max_target_positions=16,
            decoder_start_token_id=1,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ),
    "jetmoe": lambda t: t.JetMoeForCausalLM(t.JetMoeConfig(hidden_size=8, kv_channels=4, **EXPERTS)),
    "mixtral": lambda t: t.MixtralForCausalLM(t.MixtralConfig(hidden_size=8, **EXPERTS)),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Each tiny model saved by transformers, built on first use."""
    root, built = tmp_path_factory.mktemp("tiny"), {}

    def get(family: str) -> Path:
        if family not in built:
            torch.manual_seed(0)
            TINY[family](transformers).save_pretrained(root / family)
            built[family] = root / family
        return built[family]

    return get


def lora(base: Path, dest: Path, **options) -> Path:
    """A PEFT LoRA with random (not zero) B, so that it changes the model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = transformers.AutoConfig.from_pretrained(base).architectures[0]
    loaded = getattr(transformers, model).from_pretrained(base)
    config = LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False, **options)
    get_peft_model(loaded, config).save_pretrained(dest)
    return dest


def export(*args: str) -> dict:
    result = CliRunner().invoke(main, ["export-onnx", *args, "--exporter", "legacy", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verified"] is True and report["verification"]["max_abs_diff"] <= 1e-4
    return report


def session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def peft_model(base: Path, adapter: Path):
    from peft import PeftModel

    model = transformers.AutoConfig.from_pretrained(base).architectures[0]
    return PeftModel.from_pretrained(getattr(transformers, model).from_pretrained(base), adapter).eval()


def test_vit_with_lora_matches_peft(tiny, tmp_path):
    """An image classifier: pixel_values shaped from the config, the task from the architecture, the
    LoRA merged first; onnxruntime against PEFT on a batch the export never saw."""
    base = tiny("vit")
    adapter = lora(base, tmp_path / "lora", modules_to_save=["classifier"])
    report = export(str(base), "--adapter", str(adapter), "-o", str(tmp_path / "vit.onnx"))
    assert report["task"] == "image-classification" and report["graph_output"] == "logits"
    pixels = np.random.default_rng(2).standard_normal((5, 3, 8, 8), dtype=np.float32)
    (got,) = session(tmp_path / "vit.onnx").run(None, {"pixel_values": pixels})
    with torch.no_grad():
        expected = peft_model(base, adapter)(pixel_values=torch.from_numpy(pixels)).logits.numpy()
        unmerged = transformers.ViTForImageClassification.from_pretrained(base)(torch.from_numpy(pixels)).logits
    assert got.shape == (5, 3) and np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - unmerged.numpy()).max() > 1e-3  # the adapter really is in the graph


@pytest.mark.parametrize(
    ("family", "task"),
    [
        ("deit", "image-classification"),
        ("swin", "image-classification"),
        ("dinov2", "image-feature-extraction"),
        ("clip-vision", "image-feature-extraction"),  # CLIP's vision tower saved alone
    ],
)
def test_vision_families_export_and_verify(tiny, tmp_path, family, task):
    report = export(str(tiny(family)), "-o", str(tmp_path / "m.onnx"))
    assert report["task"] == task and [c["padded_row"] for c in report["verification"]["cases"]] == [None, None]


def test_clip_is_one_graph_of_texts_and_images(tiny, tmp_path):
    """optimum's zero-shot-image-classification graph: texts and images in, the four outputs out, the
    two batch axes independent (3 texts, one padded after its end-of-text token, against 2 images)."""
    base = tiny("clip")
    report = export(str(base), "-o", str(tmp_path / "clip.onnx"))
    assert report["task"] == "zero-shot-image-classification"
    rng = np.random.default_rng(4)
    feed = {
        "input_ids": rng.integers(0, 32, (3, 7), dtype=np.int64),
        "attention_mask": np.ones((3, 7), np.int64),
        "pixel_values": rng.standard_normal((2, 3, 8, 8), dtype=np.float32),
    }
    feed["attention_mask"][1, 4:] = 0
    feed["input_ids"][[0, 1, 2], [6, 3, 6]] = 31  # where CLIP pools
    graph = session(tmp_path / "clip.onnx")
    names = [o.name for o in graph.get_outputs()]
    assert names == ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"]
    got = dict(zip(names, graph.run(None, feed)))
    with torch.no_grad():
        expected = transformers.CLIPModel.from_pretrained(base)(**{k: torch.from_numpy(v) for k, v in feed.items()})
    assert got["logits_per_image"].shape == (2, 3)
    for name in names:
        assert np.abs(got[name] - expected[name].numpy()).max() <= 1e-4, name


def run_encoder_decoder(folder: Path, encoder_feed: dict, decoder_ids: np.ndarray) -> np.ndarray:
    """What optimum's ORTModelForSeq2SeqLM does without a cache: the encoder, then the decoder on its states."""
    (states,) = session(folder / "encoder_model.onnx").run(None, encoder_feed)
    decoder = session(folder / "decoder_model.onnx")
    feed = {"input_ids": decoder_ids, "encoder_hidden_states": states}
    if "attention_mask" in encoder_feed:
        feed["encoder_attention_mask"] = encoder_feed["attention_mask"]
    assert {i.name for i in decoder.get_inputs()} == set(feed)
    return decoder.run(None, feed)[0]


def test_t5_with_lora_is_an_encoder_and_a_decoder_matching_peft(tiny, tmp_path):
    base = tiny("t5")
    adapter = lora(base, tmp_path / "lora", task_type="SEQ_2_SEQ_LM")
    out = tmp_path / "t5-onnx"
    report = export(str(base), "--adapter", str(adapter), "-o", str(out))
    assert report["task"] == "text2text-generation"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "decoder_model.onnx",
        "encoder_model.onnx",
        "generation_config.json",
    ]
    rng = np.random.default_rng(5)
    encoder = {"input_ids": rng.integers(0, 32, (3, 11), dtype=np.int64), "attention_mask": np.ones((3, 11), np.int64)}
    encoder["attention_mask"][2, 6:] = 0
    decoder_ids = rng.integers(0, 32, (3, 4), dtype=np.int64)
    got = run_encoder_decoder(out, encoder, decoder_ids)
    inputs = {k: torch.from_numpy(v) for k, v in encoder.items()}
    with torch.no_grad():
        expected = peft_model(base, adapter)(**inputs, decoder_input_ids=torch.from_numpy(decoder_ids)).logits
        unmerged = transformers.T5ForConditionalGeneration.from_pretrained(base)(
            **inputs, decoder_input_ids=torch.from_numpy(decoder_ids)
        ).logits
    assert got.shape == (3, 4, 32) and np.abs(got - expected.numpy()).max() <= 1e-4
    assert np.abs(got - unmerged.numpy()).max() > 1e-3

    again = CliRunner().invoke(main, ["export-onnx", str(base), "-o", str(out), "--exporter", "legacy"])
    assert again.exit_code == 1 and "--force" in again.output
    forced = CliRunner().invoke(main, ["export-onnx", str(base), "-o", str(out), "--exporter", "legacy", "--force"])
    assert forced.exit_code == 0, forced.output  # a folder of graphs is one of surgeon's own outputs


def test_prefix_tuning_is_refused_beyond_text_models(tiny, tmp_path):
    """PEFT's prefix tuning on T5 was reported as an adapter that "does not fit this model"."""
    from peft import PrefixTuningConfig, get_peft_model

    base = tiny("t5")
    prefix = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)
    get_peft_model(transformers.T5ForConditionalGeneration.from_pretrained(base), prefix).save_pretrained(
        tmp_path / "p"
    )
    args = ["export-onnx", str(base), "--adapter", str(tmp_path / "p"), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "into a text model's graph only" in result.output
    assert not (tmp_path / "out").exists()


def test_bart_encoder_decoder_verifies(tiny, tmp_path):
    export(str(tiny("bart")), "-o", str(tmp_path / "bart"))
    assert (tmp_path / "bart" / "decoder_model.onnx").is_file()


def test_whisper_is_an_audio_encoder_and_a_decoder(tiny, tmp_path):
    """input_features of the config's mel bins and twice its source positions; no encoder mask."""
    base = tiny("whisper")
    report = export(str(base), "-o", str(tmp_path / "whisper"))
    assert report["task"] == "automatic-speech-recognition"
    rng = np.random.default_rng(6)
    features = rng.standard_normal((2, 4, 12), dtype=np.float32)
    decoder_ids = rng.integers(0, 32, (2, 7), dtype=np.int64)
    got = run_encoder_decoder(tmp_path / "whisper", {"input_features": features}, decoder_ids)
    with torch.no_grad():
        expected = transformers.WhisperForConditionalGeneration.from_pretrained(base)(
            input_features=torch.from_numpy(features), decoder_input_ids=torch.from_numpy(decoder_ids)
        ).logits
    assert got.shape == (2, 7, 32) and np.abs(got - expected.numpy()).max() <= 1e-4


def test_mixture_of_experts_exports_with_batched_experts(tiny, tmp_path):
    """Mixtral crashed in both exporters (issue 17): with transformers' batched experts every token
    goes through every expert in the graph, so routing that differs from the traced one still runs."""
    base = tiny("mixtral")
    export(str(base), "-o", str(tmp_path / "moe.onnx"))
    graph = session(tmp_path / "moe.onnx")
    model = transformers.MixtralForCausalLM.from_pretrained(base).eval()
    for shape in [(1, 1), (4, 17)]:
        ids = np.random.default_rng(sum(shape)).integers(0, 32, shape, dtype=np.int64)
        (got,) = graph.run(None, {"input_ids": ids, "attention_mask": np.ones(shape, np.int64)})
        with torch.no_grad():
            expected = model(input_ids=torch.from_numpy(ids)).logits.numpy()
        assert np.abs(got - expected).max() <= 1e-4


def test_experts_that_only_loop_are_refused_in_one_sentence(tiny, tmp_path):
    """JetMoE's experts ignore transformers' experts implementations: their traced loop failed in
    onnxruntime on a routing the export did not see."""
    result = CliRunner().invoke(main, ["export-onnx", str(tiny("jetmoe")), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "JetMoeForCausalLM's experts do not take transformers' batched_mm" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "config",
    [
        lambda t: t.LlavaConfig(),  # a vision-language model whose graphs would take images and text
        lambda t: t.Wav2Vec2Config(),  # raw audio
    ],
)
def test_models_no_task_takes_are_refused_in_one_sentence(config, tmp_path):
    """Before any model is built (a config.json alone), naming the tasks that work."""
    config(transformers).save_pretrained(tmp_path / "model")
    result = CliRunner().invoke(main, ["export-onnx", str(tmp_path / "model"), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "whose inputs no export-onnx task builds" in result.output
    assert "text2text-generation (T5, BART, ...)" in result.output and "image-classification" in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_a_task_that_does_not_fit_names_those_that_do(tiny, tmp_path):
    args = ["export-onnx", str(tiny("vit")), "-o", str(tmp_path / "m.onnx"), "--task", "causal-lm"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.output.strip().endswith("choose task image-classification or image-feature-extraction.")


def test_encoder_decoder_needs_a_folder(tiny, tmp_path):
    result = CliRunner().invoke(main, ["export-onnx", str(tiny("t5")), "-o", str(tmp_path / "t5.onnx")])
    assert result.exit_code == 1 and "give output a folder" in result.output
    assert list(tmp_path.iterdir()) == []
