"""bitsandbytes-quantized checkpoints (issue 14): read as the float weights they stand for, bit for
bit what bitsandbytes itself dequantizes them to, and merged as PEFT merges after transformers'
``model.dequantize()``. The checkpoints are made by transformers + bitsandbytes on CPU."""

from __future__ import annotations

import itertools
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgeon.checkpoint import Checkpoint
from surgeon.cli import main
from surgeon.quantized import FP4_UNSCALED, NF4

FIXTURES_DIR = Path(__file__).resolve().parent.parent / "fixtures"
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
F = bnb.functional

#: name → (fixture model, quantization options)
BNB_CONFIGS = {
    "llama-nf4-double": (
        "llama",
        dict(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
    ),
    "gpt2-fp4": ("gpt2", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float16)),
    "llama-fp4-double-bf16-storage": (
        "llama",
        dict(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_storage=torch.bfloat16,
        ),
    ),
    "llama-int8": ("llama", dict(load_in_8bit=True)),
    "gpt2-int8": ("gpt2", dict(load_in_8bit=True)),
}
#: Saved in several shards, so that a weight's parts may lie in different files.
SHARDED = {"llama-fp4-double-bf16-storage": "60KB"}


def _quiet():
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def bnb_checkpoints(tmp_path_factory, fixtures_dir) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Each config's model quantized by transformers on CPU and saved by ``save_pretrained``."""
    _quiet()
    made = {}
    for name, (arch, options) in BNB_CONFIGS.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            fixtures_dir / f"tiny-{arch}",
            quantization_config=transformers.BitsAndBytesConfig(**options),
            device_map="cpu",
        )
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, max_shard_size=SHARDED.get(name, "5GB"))
        made[name] = (path, model)
    return made


def bnb_dequantized(module) -> torch.Tensor | None:
    """What bitsandbytes dequantizes a quantized module's weight to, or None for a float module."""
    if isinstance(module, bnb.nn.Linear4bit):
        return F.dequantize_4bit(module.weight.data, module.weight.quant_state)
    if isinstance(module, bnb.nn.Linear8bitLt):
        return F.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
    return None


def test_code_tables_are_bitsandbytes():
    """Bit for bit, the sign of FP4's second zero included (bitsandbytes stores it as +0.0)."""
    assert torch.equal(torch.tensor(NF4).view(torch.int32), F.get_4bit_type("nf4", device="cpu").view(torch.int32))
    fp4 = torch.tensor(FP4_UNSCALED)
    assert torch.equal(
        (fp4 / fp4.abs().max()).view(torch.int32), F.get_4bit_type("fp4", device="cpu").view(torch.int32)
    )


#: bitsandbytes' CPU kernel for an even last dimension blocks rows wrongly unless they are whole
#: blocks (0.50.2: (64, 128) at blocksize 256 comes back wrong); its own quantizer and the CUDA and
#: pure-torch paths block the flattened tensor, as surgeon does. Odd last dimensions take the torch path.
SHAPES = [(16, 256), (8, 512), (33, 17), (7,), (3, 5, 9), (130, 9)]


@pytest.fixture
def eager_bitsandbytes():
    """bitsandbytes' torch path is wrapped in torch.compile, which recompiles per shape: seconds each."""
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.mark.parametrize(
    "quant_type, double, storage", list(itertools.product(["nf4", "fp4"], [False, True], [torch.uint8, torch.bfloat16]))
)
def test_4bit_equals_bitsandbytes_bit_for_bit(quant_type, double, storage, tmp_path, eager_bitsandbytes):
    """Every blocksize, float dtype and odd shape, stored as transformers stores a Params4bit."""
    torch.manual_seed(0)
    stored, expected = {}, {}
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    for shape, blocksize, dtype in itertools.product(SHAPES, [64, 128, 256], dtypes):
        if storage != torch.uint8 and -(-torch.Size(shape).numel() // 2) % 2:
            continue  # bitsandbytes cannot view an odd byte count as 2-byte storage
        key = f"w{len(expected)}.weight"
        packed, state = F.quantize_4bit(
            (torch.randn(shape) * 0.05).to(dtype),
            blocksize=blocksize,
            compress_statistics=double,
            quant_type=quant_type,
            quant_storage=storage,
        )
        stored[key] = packed
        stored.update({f"{key}.{part}": value for part, value in state.as_dict(packed=True).items()})
        expected[key] = F.dequantize_4bit(packed, state)
    save_file(stored, tmp_path / "model.safetensors")
    checkpoint = Checkpoint(tmp_path / "model.safetensors")
    assert sorted(checkpoint.keys()) == sorted(expected)
    for key, value in expected.items():
        ours = checkpoint.get(key)
        assert ours.dtype == value.dtype and checkpoint.info(key).shape == tuple(value.shape), key
        assert torch.equal(ours, value), key


def test_rows_shorter_than_a_block_follow_bitsandbytes_flat_blocks(tmp_path, eager_bitsandbytes):
    """Where bitsandbytes' CPU kernel blocks rows (see SHAPES), surgeon equals its pure-torch kernel,
    which blocks the flattened weight as its quantizer and its CUDA kernel do."""
    reference = getattr(pytest.importorskip("bitsandbytes.backends.default.ops"), "_dequantize_4bit_compute", None)
    if reference is None:
        pytest.skip("this bitsandbytes has no pure-torch 4-bit kernel")
    reference = getattr(reference, "__wrapped__", reference)  # without its torch.compile wrapper
    torch.manual_seed(0)
    packed, state = F.quantize_4bit(torch.randn(64, 128) * 0.05, blocksize=256, quant_type="nf4")
    save_file(
        {"w.weight": packed, **{f"w.weight.{k}": v for k, v in state.as_dict(packed=True).items()}},
        tmp_path / "model.safetensors",
    )
    expected = reference(
        packed.reshape(-1), state.absmax, F.get_4bit_type("nf4", device="cpu"), 256, state.shape, torch.float32
    )
    assert torch.equal(Checkpoint(tmp_path / "model.safetensors").get("w.weight"), expected)


def test_8bit_equals_bitsandbytes_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    stored, expected = {}, {}
    for i, shape in enumerate([(64, 128), (33, 17), (1, 5)]):
        quantized, scales, _ = F.int8_vectorwise_quant(torch.randn(shape).half())
        row_major = torch.tensor(0, dtype=torch.uint8)
        stored.update({f"m{i}.weight": quantized, f"m{i}.SCB": scales, f"m{i}.weight_format": row_major})
        expected[f"m{i}.weight"] = F.int8_vectorwise_dequant(quantized, scales)
    save_file(stored, tmp_path / "model.safetensors")
    checkpoint = Checkpoint(tmp_path / "model.safetensors")
    assert sorted(checkpoint.keys()) == sorted(expected)
    for key, value in expected.items():
        assert checkpoint.get(key).dtype == value.dtype and torch.equal(checkpoint.get(key), value), key


@pytest.mark.parametrize("name", BNB_CONFIGS)
def test_transformers_checkpoint_reads_as_the_float_model(name, bnb_checkpoints, fixtures_dir):
    """The float model's keys and shapes (GPT-2's Conv1D transposed back), and in each quantized
    weight exactly the values bitsandbytes dequantizes it to."""
    path, model = bnb_checkpoints[name]
    arch = BNB_CONFIGS[name][0]
    checkpoint, original = Checkpoint(path), Checkpoint(fixtures_dir / f"tiny-{arch}")
    assert checkpoint.keys() == original.keys() or set(checkpoint.keys()) == set(original.keys())
    assert all(checkpoint.info(k).shape == original.info(k).shape for k in original.keys())
    compared = 0
    for module_name, module in model.named_modules():
        expected = bnb_dequantized(module)
        if expected is None:
            continue
        if module.source_cls is transformers.pytorch_utils.Conv1D:
            expected = expected.t()
        ours = checkpoint.get(module_name + ".weight")
        assert ours.dtype == expected.dtype and torch.equal(ours, expected), module_name
        compared += 1
    assert compared == len(checkpoint.quantized) > 0
    assert (path / "model.safetensors.index.json").is_file() == (name in SHARDED)
    summary = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).output)
    assert (summary["tensors"], summary["params"]) == (len(original), original.num_params())


def _peft_merged_after_dequantize(path: Path, adapter: Path) -> dict[str, torch.Tensor]:
    _quiet()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu").dequantize()
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _merge(base: Path, out: Path, *extra: str, adapter: Path | None = None) -> Checkpoint:
    adapter = adapter or FIXTURES_DIR / f"tiny-{'gpt2' if 'gpt2' in base.name else 'llama'}-lora"
    result = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(out), *extra])
    assert result.exit_code == 0, result.output
    return Checkpoint(out)


@pytest.mark.parametrize("name", ["llama-nf4-double", "gpt2-fp4", "gpt2-int8"])
def test_merge_equals_peft_after_transformers_dequantize(name, bnb_checkpoints, fixtures_dir, tmp_path):
    path, _ = bnb_checkpoints[name]
    arch = BNB_CONFIGS[name][0]
    transposed = {k for k, w in Checkpoint(path).quantized.items() if w.transposed}
    ours = _merge(path, tmp_path / "merged", "--dtype", "fp32")
    theirs = _peft_merged_after_dequantize(path, fixtures_dir / f"tiny-{arch}-lora")
    assert not ours.quantized and set(ours.keys()) <= set(theirs)
    for key in ours.keys():
        expected = theirs[key].t() if key in transposed else theirs[key]
        torch.testing.assert_close(ours.get(key), expected, atol=2e-6, rtol=1e-5, msg=key)
    changed = [k for k in ours.keys() if not torch.equal(ours.get(k), Checkpoint(path).get(k))]
    assert changed and all(k in Checkpoint(path).quantized for k in changed)


def test_merge_writes_the_compute_dtype_and_an_unquantized_config(bnb_checkpoints, tmp_path):
    path, _ = bnb_checkpoints["llama-nf4-double"]
    merged_dir = tmp_path / "merged"
    ours = _merge(path, merged_dir)
    assert {ours.info(k).dtype for k in ours.keys()} == {torch.bfloat16}
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    _quiet()
    model = transformers.AutoModelForCausalLM.from_pretrained(merged_dir)  # a plain model: no bitsandbytes
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    int8 = _merge(bnb_checkpoints["gpt2-int8"][0], tmp_path / "merged8")
    assert {int8.info(k).dtype for k in int8.keys()} == {torch.bfloat16}  # no compute dtype: bf16


def test_inspect_shows_the_quantization_and_the_dequantized_size(bnb_checkpoints, fixtures_dir):
    path, _ = bnb_checkpoints["llama-nf4-double"]
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    # what the files hold, beside the dequantized size the table counts (only that was shown: twice the files')
    stored, on_disk = (
        summary["quantization"].pop("stored_bytes"),
        sum(f.stat().st_size for f in path.glob("*.safetensors")),
    )
    assert on_disk - 20_000 < stored < on_disk < summary["bytes"] / 2
    assert summary["quantization"] == {
        "method": "bitsandbytes 4-bit",
        "quantized_tensors": 14,
        "type": "nf4",
        "blocksize": 64,
        "double_quant": True,
        "compute_dtype": "bfloat16",
        "dequantized_dtype": "float32",
    }
    original = Checkpoint(fixtures_dir / "tiny-llama")
    sizes = (summary["tensors"], summary["params"], summary["bytes"])
    assert sizes == (len(original), original.num_params(), original.num_bytes())
    text = CliRunner().invoke(main, ["inspect", str(bnb_checkpoints["gpt2-int8"][0])]).output
    assert "bitsandbytes 8-bit" in text


def test_inspect_of_a_bitsandbytes_checkpoint_imports_no_torch(bnb_checkpoints):
    from test_fast_cli import run_fresh

    found = run_fresh("inspect", str(bnb_checkpoints["gpt2-fp4"][0]), "--json")
    assert found == {"code": 0, "heavy": []}


def _corrupt(source: Path, tmp_path: Path, edit) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    tensors = load_file(broken / "model.safetensors")
    edit(tensors)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


KEY = "model.layers.0.self_attn.q_proj.weight"
STATE = f"{KEY}.quant_state.bitsandbytes__nf4"


def _as_uint8(raw: bytes) -> torch.Tensor:
    return torch.tensor(list(raw), dtype=torch.uint8)


def _edited_state(tensors: dict, **changes) -> torch.Tensor:
    return _as_uint8(json.dumps({**json.loads(bytes(tensors[STATE].tolist())), **changes}).encode())


CORRUPTIONS = {
    "state not json": (lambda t: t.update({STATE: _as_uint8(b"{oops")}), "not JSON"),
    "absmax missing": (lambda t: t.pop(f"{KEY}.absmax"), "has no"),
    "blocksize changed": (lambda t: t.update({STATE: _edited_state(t, blocksize=128)}), "absmax"),
    "unknown dtype": (lambda t: t.update({STATE: _edited_state(t, dtype="int4")}), "dtype"),
    "state missing": (lambda t: t.pop(STATE), "no quant_state"),
    "packed truncated": (lambda t: t.update({KEY: t[KEY][:-1]}), "bytes that pack"),
    "quant_map edited": (lambda t: t[f"{KEY}.quant_map"].mul_(2), "quant_map"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_quant_state_is_one_line_naming_the_tensor(corruption, bnb_checkpoints, tmp_path):
    edit, words = CORRUPTIONS[corruption]
    broken = _corrupt(bnb_checkpoints["llama-nf4-double"][0], tmp_path, edit)
    adapter = FIXTURES_DIR / "tiny-llama-lora"
    commands = [["merge", str(broken), str(adapter), "-o", str(tmp_path / "out")]]
    if corruption != "quant_map edited":  # the table is checked where it is read: on dequantizing
        commands.append(["inspect", str(broken)])
    for command in commands:
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1, (command, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:") and repr(KEY) in lines[0] and words in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_export_onnx_of_a_bitsandbytes_checkpoint_runs_as_the_dequantized_model(bnb_checkpoints, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path, _ = bnb_checkpoints["gpt2-fp4"]
    graph = tmp_path / "model.onnx"
    result = CliRunner().invoke(main, ["export-onnx", str(path), "-o", str(graph), "--exporter", "legacy", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verified"] is True
    _quiet()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu").dequantize().float().eval()
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    session = ort.InferenceSession(str(graph))
    feed = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
    got = session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})[0]
    assert abs(got - expected).max() < 1e-4


def test_extract_and_unmerge_check_read_a_bitsandbytes_base(bnb_checkpoints, tmp_path):
    """The QLoRA round trip: merged into the dequantized base, then taken back off or extracted again."""
    path, _ = bnb_checkpoints["llama-nf4-double"]
    _merge(path, tmp_path / "merged", "--dtype", "fp32")
    runner = CliRunner()
    unmerged = runner.invoke(
        main,
        [
            "unmerge",
            str(tmp_path / "merged"),
            str(FIXTURES_DIR / "tiny-llama-lora"),
            "-o",
            str(tmp_path / "unmerged"),
            "--check",
            str(path),
            "--json",
        ],
    )
    assert unmerged.exit_code == 0, unmerged.output
    assert json.loads(unmerged.stdout)["check"]["max_relative_error"] < 1e-6
    extracted = runner.invoke(
        main, ["extract", str(path), str(tmp_path / "merged"), "-o", str(tmp_path / "lora"), "--rank", "8"]
    )
    assert extracted.exit_code == 0, extracted.output
    merged = Checkpoint(tmp_path / "merged")
    remerged = _merge(path, tmp_path / "remerged", "--dtype", "fp32", adapter=tmp_path / "lora")
    for key in Checkpoint(path).quantized:
        torch.testing.assert_close(remerged.get(key), merged.get(key), atol=1e-5, rtol=1e-4, msg=key)


def test_an_int8_weight_without_its_scales_is_refused(fixtures_dir, tmp_path):
    """Without its SCB an int8 weight was read as a plain int8 tensor: inspect showed it, merge said
    deltas apply to float weights only."""
    out = tmp_path / "int8"
    args = ["merge", str(fixtures_dir / "tiny-llama"), str(fixtures_dir / "tiny-llama-lora"), "-o", str(out)]
    assert CliRunner().invoke(main, [*args, "--dtype", "int8"]).exit_code == 0
    shard = next(out.glob("model-0*.safetensors"))
    tensors = load_file(shard)
    del tensors["model.layers.0.mlp.down_proj.SCB"]
    save_file(tensors, shard, metadata={"format": "pt"})
    for command in (
        ["inspect", str(out)],
        ["merge", str(out), str(fixtures_dir / "tiny-llama-lora"), "-o", str(tmp_path / "x")],
    ):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1 and "no 'model.layers.0.mlp.down_proj.SCB'" in result.output, result.output
