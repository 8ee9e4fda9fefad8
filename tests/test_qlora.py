"""QLoRA merges (issue 14): a 16-bit base quantized and dequantized exactly as bitsandbytes does on
loading, so that an adapter trained in 4 bits merges into the weights it was trained on. Checked
against bitsandbytes' own quantizer and a tiny model trained for a few steps with QLoRA on CPU."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_architectures_known import TINY

from surgeon import quantize
from surgeon.architectures import LINEAR_DECODERS
from surgeon.checkpoint import Checkpoint
from surgeon.cli import main
from surgeon.errors import SurgeonError
from surgeon.ops.qlora import QuantizedBase
from surgeon.quantize import (
    Scheme,
    _built_linear_weights,
    bnb_linear_weights,
    quantize_4bit,
    quantize_int8,
    roundtrip,
    shapes_of,
)
from surgeon.quantized import STEP

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
F = bnb.functional
IDS = torch.tensor([[1, 5, 9, 200, 7, 42, 3, 128]])


@pytest.fixture
def eager_bitsandbytes():
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.mark.parametrize("quant_type, double", list(itertools.product(["nf4", "fp4"], [False, True])))
def test_quantize_4bit_equals_bitsandbytes_bit_for_bit(quant_type, double, eager_bitsandbytes):
    """Packed codes, scales, nested scales, code tables and quant state: each as bitsandbytes stores
    it, for every float dtype, odd sizes (a half-filled last byte, a short last block, an all-equal
    block whose nested scale is 0) and several blocksizes; and the round trip as it dequantizes."""
    torch.manual_seed(0)
    for shape, blocksize, dtype in itertools.product(
        [(64, 256), (33, 17), (7,), (300, 130)], [64, 256], [torch.float32, torch.bfloat16, torch.float16]
    ):
        weight = (torch.randn(shape) * 0.05).to(dtype)
        packed, state = F.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double, quant_type=quant_type)
        expected = state.as_dict(packed=True)
        parts, ours = quantize_4bit(weight, Scheme(quant_type, double, blocksize))
        assert torch.equal(parts.pop("weight"), packed), (shape, blocksize, dtype)
        for role, value in parts.items():
            assert torch.equal(value.reshape(expected[role].shape), expected[role]), (role, shape, blocksize, dtype)
        assert set(parts) == set(expected) - {f"quant_state.bitsandbytes__{quant_type}"}
        assert ours == json.loads(bytes(expected[f"quant_state.bitsandbytes__{quant_type}"].tolist()))
        dequantized = roundtrip(weight, Scheme(quant_type, double, blocksize))
        assert torch.equal(dequantized, F.dequantize_4bit(packed, state)), (shape, blocksize, dtype)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """A float tensor's bits (torch.equal takes -0.0 for 0.0); other tensors as they are."""
    if not tensor.is_floating_point():
        return tensor
    return tensor.view(torch.int32 if tensor.element_size() == 4 else torch.int16)


def _every_bf16_under_each_absmax(scale: float) -> torch.Tensor:
    """Blocks of 64 whose first value is the absmax (each of the 128 bf16 mantissas, times ``scale``)
    and whose others run through every bf16 value of either sign no larger than it: every (sign,
    mantissa, exponent gap) the bf16 round trip's lookup table holds, subnormals and zeros included;
    and all-zero blocks."""
    magnitudes = torch.arange(0, 128 << 7, dtype=torch.int32)  # bits of every finite bf16 in [0, 2)
    blocks = []
    for mantissa in range(128):
        absmax = (127 << 7) | mantissa
        under = magnitudes[magnitudes <= absmax]
        values = torch.cat([under, under | 0x8000]).to(torch.int16).view(torch.bfloat16).float()
        values = torch.cat([values, values[: -values.numel() % 63]])  # whole blocks of 63
        head = torch.full(
            (values.numel() // 63, 1), float(torch.tensor(absmax, dtype=torch.int16).view(torch.bfloat16))
        )
        blocks.append(torch.cat([head, values.view(-1, 63)], dim=1))
    zeros = torch.zeros(4, 64).index_fill_(1, torch.arange(1, 64, 2), -0.0)  # all-zero blocks, zeros of both signs
    return torch.cat([*blocks, zeros]).mul(scale).to(torch.bfloat16)


@pytest.mark.parametrize(
    "quant_type, double, scale",  # absmax exponents 127 and the lookup's limits, 33 and 250 (where double
    [  # quantization's offset overflows: bitsandbytes' scales are NaN there, and surgeon refuses)
        *[(kind, double, scale) for kind, double in [("nf4", True), ("fp4", False)] for scale in (1.0, 2.0**-94)],
        ("nf4", False, 2.0**123),
        ("fp4", False, 2.0**123),
        ("nf4", True, 2.0**100),
    ],
)
def test_bf16_round_trip_through_the_lookup_is_bitsandbytes_bit_for_bit(quant_type, double, scale, eager_bitsandbytes):
    """The bf16 round trip looks each value up by (absmax mantissa, exponent gap, mantissa, sign)
    instead of scaling it (surgeon/quantize.py says why that is exact): against bitsandbytes for
    every bf16 value under every absmax mantissa, at absmax exponents far from 1."""
    weight = _every_bf16_under_each_absmax(scale)
    assert quantize._lookup_rows(weight.view(-1), quantize._absmax_4bit(weight.view(-1), 64), 64) is not None
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double, quant_type=quant_type)
    ours, theirs = roundtrip(weight, Scheme(quant_type, double, 64)), F.dequantize_4bit(packed, state)
    assert torch.equal(_bits(ours), _bits(theirs)) if quant_type == "nf4" else torch.equal(ours, theirs)


@pytest.mark.parametrize("quant_type, double", [("nf4", True), ("fp4", False)])
def test_quantizing_a_large_weight_is_bitsandbytes_bit_for_bit(quant_type, double, eager_bitsandbytes):
    """A weight of many steps of the blockwise arithmetic, spread over threads, with all-zero blocks,
    zeros of both signs and an all-zero short last block (whose absmax bitsandbytes clamps to 1e-38):
    packed codes, every part's bits, and the round trip's bits (FP4's two zero codes dequantize to
    zeros of a sign bitsandbytes' own CPU kernels disagree on: values there)."""
    torch.manual_seed(1)
    weight = torch.randn(2 * STEP // 1001 + 7, 1001) * 0.05  # more than two steps, a short last block
    flat = weight.view(-1)
    flat[:128], flat[300:310], flat[-(flat.numel() % 64) :] = 0.0, -0.0, 0.0
    for dtype, blocksize in [(torch.bfloat16, 64), (torch.float32, 4096), (torch.float16, 128)]:
        source = weight.to(dtype)
        packed, state = F.quantize_4bit(source, blocksize=blocksize, compress_statistics=double, quant_type=quant_type)
        expected = state.as_dict(packed=True)
        parts, _ = quantize_4bit(source, Scheme(quant_type, double, blocksize))
        assert torch.equal(parts.pop("weight"), packed), (dtype, blocksize)
        for role, value in parts.items():
            assert torch.equal(_bits(value.reshape(expected[role].shape)), _bits(expected[role])), (role, dtype)
        ours, theirs = roundtrip(source, Scheme(quant_type, double, blocksize)), F.dequantize_4bit(packed, state)
        assert torch.equal(_bits(ours), _bits(theirs)) if quant_type == "nf4" else torch.equal(ours, theirs)


def test_quantize_int8_equals_bitsandbytes():
    torch.manual_seed(0)
    for shape in [(64, 128), (33, 17)]:
        weight = torch.randn(shape, dtype=torch.bfloat16)
        codes, scales, _ = F.int8_vectorwise_quant(weight.half())
        ours = quantize_int8(weight)
        assert torch.equal(ours["weight"], codes) and torch.equal(ours["scb"], scales)
        assert torch.equal(roundtrip(weight, Scheme("int8")), F.int8_vectorwise_dequant(codes, scales))


def _quiet():
    import warnings

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _load_4bit(path: Path, quant_type: str = "nf4", double: bool = True):
    _quiet()
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


@pytest.mark.parametrize("arch, quant_type, double", [("llama", "nf4", True), ("gpt2", "fp4", False)])
def test_quantized_base_is_what_transformers_loads_in_4bit(arch, quant_type, double, fixtures_dir, eager_bitsandbytes):
    """The weights transformers quantizes (its rules: lm_head stays float, GPT-2's Conv1D are
    transposed into Linears) and, in each, exactly what bitsandbytes dequantizes it to."""
    model = _load_4bit(fixtures_dir / f"tiny-{arch}", quant_type, double)
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            value = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
            expected[f"{name}.weight"] = value.t() if module.source_cls is transformers.pytorch_utils.Conv1D else value
    base = QuantizedBase(Checkpoint(fixtures_dir / f"tiny-{arch}"), Scheme(quant_type, double))
    assert set(base.targets) == set(expected) and expected
    for key, value in expected.items():
        assert torch.equal(base.get(key), value), key
    float_keys = [k for k in base.keys() if k not in expected]
    assert all(torch.equal(base.get(k), base.original.get(k)) for k in float_keys)


@pytest.fixture(scope="module")
def qlora_trained(tmp_path_factory, fixtures_dir) -> tuple[Path, torch.Tensor]:
    """tiny-llama loaded in NF4 with double quantization, a LoRA trained on it for a few AdamW
    steps on CPU (the QLoRA recipe), saved by PEFT; and the logits of that model, adapter unmerged."""
    torch.manual_seed(0)
    model = _load_4bit(fixtures_dir / "tiny-llama")
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # Train mode throughout (nothing drops out): in eval mode bitsandbytes' CPU forward repacks the
    # weights for a bf16 kernel, an approximation of its own; training computes with the exact dequantization.
    model = peft.get_peft_model(model, config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, 256, (4, 16))
    for _ in range(5):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter = tmp_path_factory.mktemp("qlora") / "adapter"
    model.save_pretrained(adapter)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert not any(
        getattr(m.weight, "quant_state", None) is not None and m.weight.quant_state.dtype != torch.float32
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )  # not repacked
    return adapter, logits


def _merged_logits(path: Path) -> torch.Tensor:
    _quiet()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _merge(*args: str) -> dict:
    result = CliRunner().invoke(main, ["merge", *args, "--dtype", "fp32", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_qlora_merge_is_the_trained_model(qlora_trained, fixtures_dir, tmp_path, eager_bitsandbytes):
    """Merged weights are dequantize(quantize(W)) + ΔW, and the merged model answers as the 4-bit
    model with its adapter did, far closer than the naive merge into W does."""
    adapter, trained_logits = qlora_trained
    base = fixtures_dir / "tiny-llama"
    report = _merge(
        str(base),
        str(adapter),
        "-o",
        str(tmp_path / "qlora"),
        "--quantized-base",
        "nf4",
        "--double-quant",
        "--report",
        "--probe",
    )
    _merge(str(base), str(adapter), "-o", str(tmp_path / "naive"))
    merged, naive, original = Checkpoint(tmp_path / "qlora"), Checkpoint(tmp_path / "naive"), Checkpoint(base)
    quantized = QuantizedBase(original, Scheme("nf4", True))
    for key in quantized.targets:  # ΔW as the naive merge added it
        delta = naive.get(key) - original.get(key)
        torch.testing.assert_close(merged.get(key), quantized.get(key) + delta, atol=1e-7, rtol=0, msg=key)
    ours = (_merged_logits(tmp_path / "qlora") - trained_logits).abs().max().item()
    theirs = (_merged_logits(tmp_path / "naive") - trained_logits).abs().max().item()
    # Measured: 2.5e-7 (fp32 summation order) against 0.079, the quantization error the naive merge keeps.
    assert ours < 1e-5 and ours * 1000 < theirs, f"max logit difference: {ours:.3g} (QLoRA) vs {theirs:.3g} (naive)"
    total = report["distances"][-1]
    assert total["module"] == "total" and total["to_trained"] < 1e-6 < total["naive_to_trained"]
    assert report["quantized_modules"] == 14 and len(report["distances"]) == 15
    probe = report["probe"]  # the same comparison, surgeon's own (its trained model: fp32, no bitsandbytes)
    assert probe["max_logit_difference"] < 1e-5 and probe["naive_max_logit_difference"] > 1e-3, probe


@pytest.mark.parametrize("options", [["--double-quant"], ["--blocksize", "128"]])
def test_4bit_options_for_both_a_quantized_base_and_a_4bit_output_are_refused(options, fixtures_dir, tmp_path):
    """Which of the two would --double-quant or --blocksize describe? Neither is guessed."""
    error = _refused(fixtures_dir, tmp_path, ["--quantized-base", "nf4", "--dtype", "nf4", *options])
    assert "both the quantized base and the 4-bit output" in error


def test_quantized_base_of_a_bare_encoder_is_what_transformers_loads_in_4bit(fixtures_dir):
    """A checkpoint saved from BertModel loads as BertModel (AutoModel, or its own class), whose
    pooler is a Linear that bitsandbytes quantizes; its causal LM has no pooler."""
    model = transformers.AutoModel.from_pretrained(
        fixtures_dir / "tiny-bert", quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True)
    )
    expected = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    base = QuantizedBase(Checkpoint(fixtures_dir / "tiny-bert"), Scheme("nf4"))
    assert "pooler.dense.weight" in expected and set(base.targets) == expected


@pytest.mark.parametrize("architecture", sorted(LINEAR_DECODERS))
def test_known_layouts_name_the_weights_transformers_quantizes(architecture, tmp_path):
    """Read off the names (no transformers import) or decided by transformers on the built model:
    the same weights, with the output head saved and tied away."""
    for tied in (False, True):
        config = transformers.AutoConfig.for_model(architecture.removesuffix("ForCausalLM").lower(), **TINY)
        config.tie_word_embeddings = tied
        getattr(transformers, architecture)(config).save_pretrained(tmp_path / str(tied))
        checkpoint = Checkpoint(tmp_path / str(tied))
        named = bnb_linear_weights(checkpoint.config(), shapes_of(checkpoint), "here")
        assert named == _built_linear_weights(checkpoint.config(), checkpoint.keys(), "here") and named, tied


def test_quantized_base_merge_of_a_known_layout_imports_no_transformers(fixtures_dir, tmp_path):
    code = (
        "import sys; from click.testing import CliRunner; from surgeon.cli import main; "
        f"r = CliRunner().invoke(main, ['merge', {str(fixtures_dir / 'tiny-llama')!r}, "
        f"{str(fixtures_dir / 'tiny-llama-lora')!r}, '-o', {str(tmp_path / 'out')!r}, '--quantized-base', 'nf4']); "
        "print(r.exit_code, 'transformers' in sys.modules)"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.split()[-2:] == ["0", "False"], found.stdout + found.stderr


@pytest.mark.parametrize("options", [["--double-quant"], ["--report"], ["--probe"], ["--blocksize", "128"]])
def test_quantization_options_without_a_quantization_are_refused(options, fixtures_dir, tmp_path):
    assert "nf4" in _refused(fixtures_dir, tmp_path, options)


def _refused(fixtures_dir: Path, tmp_path: Path, options: list[str], base: Path | None = None) -> str:
    """The one line a merge of the tiny Llama (or ``base``) and its LoRA with ``options`` is refused
    with; nothing written."""
    base = base or fixtures_dir / "tiny-llama"
    result = CliRunner().invoke(
        main, ["merge", str(base), str(fixtures_dir / "tiny-llama-lora"), "-o", str(tmp_path / "o")] + options
    )
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert not (tmp_path / "o").exists()
    return lines[0]


@pytest.mark.parametrize(
    "options, named",
    [
        (["--dtype", "int8", "--double-quant"], "4-bit"),
        (["--dtype", "int8", "--blocksize", "128"], "4-bit"),
        (["--dtype", "nf4", "--report"], "quantized_base"),
        (["--dtype", "fp4", "--probe"], "quantized_base"),
    ],
)
def test_options_the_output_quantization_does_not_use_are_refused(options, named, fixtures_dir, tmp_path):
    """int8 has no double quantization or blocksize (they were dropped without a word), and the
    report and probe need a quantized base even when the output is 4-bit (the refusal asked for nf4)."""
    assert named in _refused(fixtures_dir, tmp_path, options)


def _huge(weight: torch.Tensor) -> None:
    weight[:2, 0] = 3e38  # two blocks: the sum of the block scales overflows fp32; Inf in fp16


def _close_to_zero_scales(weight: torch.Tensor) -> None:
    """Block scales of 2^-126 and a few ulps above: their deviations from the mean are subnormal."""
    levels = torch.tensor([2.0**-126, 2.0**-126 * (1 + 2**-7), 2.0**-126 * (1 + 2**-6)])
    blocks = weight.view(-1, 64).zero_()
    blocks[:, 0] = levels.repeat(blocks.shape[0] // 3 + 1)[: blocks.shape[0]]


def _nan(weight: torch.Tensor) -> None:
    weight[3, 5] = float("nan")


@pytest.mark.parametrize(
    "make, options, words",
    [
        (_huge, ["--quantized-base", "nf4", "--double-quant"], "overflows fp32"),
        (_huge, ["--dtype", "nf4", "--double-quant"], "overflows fp32"),
        (_huge, ["--dtype", "int8"], "fp16's range"),
        (_close_to_zero_scales, ["--quantized-base", "nf4", "--double-quant"], "below fp32's normal range"),
        (_nan, ["--quantized-base", "nf4", "--double-quant"], "NaN or Inf"),
    ],
)
def test_weights_bitsandbytes_cannot_quantize_are_refused(
    make, options, words, fixtures_dir, tmp_path, eager_bitsandbytes
):
    """Where bitsandbytes' arithmetic breaks down it stores NaN (huge weights: double quantization's
    offset overflows; LLM.int8 goes through fp16) or indexes its code with NaN (scales whose
    deviations are subnormal). surgeon refuses in one line naming the weight (it raised an IndexError)."""
    import shutil

    from safetensors.torch import load_file, save_file

    base, key = tmp_path / "base", "model.layers.0.self_attn.q_proj.weight"
    shutil.copytree(fixtures_dir / "tiny-llama", base)
    file = next(base.glob("*.safetensors"))
    tensors = load_file(file)
    make(tensors[key])
    save_file(tensors, file, metadata={"format": "pt"})
    if make is _huge:
        packed, state = F.quantize_4bit(tensors[key], blocksize=64, compress_statistics=True, quant_type="nf4")
        assert F.dequantize_4bit(packed, state).isnan().any()
    line = _refused(fixtures_dir, tmp_path, options, base)
    assert words in line and key in line, line


def test_probe_of_a_model_without_a_language_model_head_names_the_head(fixtures_dir, tmp_path):
    """tiny-bert is a bare BertModel: the probe claimed its word embeddings were missing (they are
    stored without the ``bert.`` prefix); what is missing is the head, and that is said before merging."""
    from surgeon.ops.probe import check_probe

    base = Checkpoint(fixtures_dir / "tiny-bert")
    with pytest.raises(SurgeonError, match="output head included") as refusal:
        check_probe(base, base.path)
    assert "cls.predictions" in str(refusal.value) and "bert.embeddings" not in str(refusal.value)
    result = CliRunner().invoke(
        main,
        ["merge", str(base.path), str(fixtures_dir / "tiny-bert-lora"), "-o", str(tmp_path / "o")]
        + ["--quantized-base", "nf4", "--probe"],
    )
    assert result.exit_code == 1 and "cls.predictions" in result.output and not (tmp_path / "o").exists()


def test_probe_of_a_merge_that_grows_the_vocabulary_or_unties(fixtures_dir, tmp_path):
    """A prompt adapter beside the QLoRA one grows the vocabulary: the probe built the base's model
    and crashed copying 260 rows into 256 (a traceback); with untie, it would compare with a tied model."""
    from test_prompt_tuning import make_prompt_adapter

    prompt, _ = make_prompt_adapter("llama", tmp_path / "prompt")
    base, lora = str(fixtures_dir / "tiny-llama"), str(fixtures_dir / "tiny-llama-lora")
    options = ["--quantized-base", "nf4", "--probe", "--json"]
    result = CliRunner().invoke(main, ["merge", base, str(prompt), lora, "-o", str(tmp_path / "o"), *options])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["probe"]["max_logit_difference"] < 1e-5
    gpt2, gpt2_prompt = str(fixtures_dir / "tiny-gpt2"), make_prompt_adapter("gpt2", tmp_path / "gpt2-prompt")[0]
    result = CliRunner().invoke(main, ["merge", gpt2, str(gpt2_prompt), "-o", str(tmp_path / "u"), *options, "--untie"])
    assert result.exit_code == 1 and result.output.startswith("Error: probe") and not (tmp_path / "u").exists()


def test_quantized_base_refuses_a_quantized_checkpoint_and_a_model_without_config(fixtures_dir, tmp_path):
    from safetensors.torch import save_file

    adapter = fixtures_dir / "tiny-llama-lora"
    save_file(dict(Checkpoint(fixtures_dir / "tiny-llama").items()), tmp_path / "bare.safetensors")
    _load_4bit(fixtures_dir / "tiny-llama").save_pretrained(tmp_path / "nf4")
    for base, words in [(tmp_path / "bare.safetensors", "config.json"), (tmp_path / "nf4", "already")]:
        result = CliRunner().invoke(
            main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--quantized-base", "nf4"]
        )
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0], lines
        assert not (tmp_path / "out").exists()


def _stored(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {}
    for file in sorted(path.glob("*.safetensors")):
        found.update(load_file(file))
    return found


@pytest.mark.parametrize(
    "arch, kind, double", [("llama", "nf4", True), ("gpt2", "fp4", False), ("gpt2", "int8", False)]
)
def test_quantized_output_is_what_transformers_saves(arch, kind, double, fixtures_dir, tmp_path, eager_bitsandbytes):
    """merge --dtype nf4|fp4|int8 writes, tensor for tensor, what transformers + bitsandbytes save
    after quantizing the same merged weights on loading; and transformers loads it as that model."""
    base, adapter = fixtures_dir / f"tiny-{arch}", fixtures_dir / f"tiny-{arch}-lora"
    options = ["--double-quant"] if double else []
    _merge(str(base), str(adapter), "-o", str(tmp_path / "float"))
    result = CliRunner().invoke(
        main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "ours"), "--dtype", kind, *options, "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    settings = (
        dict(load_in_8bit=True)
        if kind == "int8"
        else dict(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double)
    )
    _quiet()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=transformers.BitsAndBytesConfig(**settings), device_map="cpu"
    )
    theirs.save_pretrained(tmp_path / "theirs")
    ours_stored, theirs_stored = _stored(tmp_path / "ours"), _stored(tmp_path / "theirs")
    assert set(ours_stored) == set(theirs_stored)
    for key, value in theirs_stored.items():
        assert ours_stored[key].dtype == value.dtype and torch.equal(ours_stored[key], value), key
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    bnb_class = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    assert sum(isinstance(m, bnb_class) for m in loaded.modules()) == len(report["quantization_error"]) - 1 > 0
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, theirs(input_ids=IDS).logits)
    assert 0 < report["quantization_error"][-1]["relative"] < 0.2


def test_compose_of_fine_tunes_writes_a_quantized_checkpoint(fixtures_dir, tmp_path):
    """compose --base ... --dtype nf4: the task-arithmetic result, each quantized weight's parts
    those of the same result written in float and quantized (held to bitsandbytes above)."""
    base, adapter = fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora"
    _merge(str(base), str(adapter), "-o", str(tmp_path / "t1"))
    _merge(str(base), str(adapter), "-o", str(tmp_path / "t2"), "-w", "-0.5")
    runs = {}
    for dtype in ("auto", "nf4"):
        result = CliRunner().invoke(
            main,
            [
                "compose",
                str(tmp_path / "t1"),
                str(tmp_path / "t2"),
                "--base",
                str(base),
                "-o",
                str(tmp_path / dtype),
                "--dtype",
                dtype,
                "--json",
            ],
        )
        assert result.exit_code == 0, result.output
        runs[dtype] = json.loads(result.stdout)
    stored, composed = _stored(tmp_path / "nf4"), Checkpoint(tmp_path / "auto")
    targets = QuantizedBase(Checkpoint(base), Scheme("nf4")).targets
    for key in targets:
        parts, _ = quantize_4bit(composed.get(key), Scheme("nf4"))
        assert torch.equal(stored[key], parts.pop("weight")), key
        assert all(torch.equal(stored[f"{key}.{role}"], value) for role, value in parts.items()), key
    assert torch.equal(stored["lm_head.weight"], composed.get("lm_head.weight"))
    assert len(runs["nf4"]["quantization_error"]) == len(targets) + 1 and "quantization_error" not in runs["auto"]
