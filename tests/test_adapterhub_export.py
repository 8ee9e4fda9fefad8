"""AdapterHub bottleneck adapters and prefix tuning baked into ONNX exports (issue 16): the adapters in
fixtures/adapterhub were saved by the adapters library itself, beside its own outputs for fixed
inputs (fixtures/make_adapterhub_fixtures.py, run in that library's environment). surgeon's wrappers
around the transformers 5 model, and the exported graph, must reproduce those outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fixtures.make_fixtures import load_base
from surgeon.adapterhub_run import attach
from surgeon.cli import main
from tests.test_adapterhub_lora import edited

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
HUB = FIXTURES / "adapterhub"
OUTPUT = {"bert": "last_hidden_state", "llama": "logits"}
KINDS = ("houlsby", "pfeiffer", "parallel", "options", "options2", "prefix")


def oracle(name: str) -> dict[str, torch.Tensor]:
    """The fixed inputs and the adapters library's output for them, with the adapter active."""
    return load_file(HUB / "oracle" / f"{name}.safetensors")


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def unmasked_difference(got: np.ndarray, expected: dict[str, torch.Tensor]) -> float:
    mask = expected["attention_mask"].numpy().astype(bool)
    return float(np.abs(got[mask] - expected["logits"].numpy()[mask]).max())


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("kind", KINDS)
def test_wrapped_model_matches_the_adapters_library(family, kind):
    """Houlsby, Pfeiffer and parallel adapters, and every non-default option (non-linearity, original
    layer norm before/after, residual_before_ln, ln_before/after, learned and per-channel scaling,
    leave_out, per-layer reduction factors), and prefix tuning, in surgeon's wrappers give the
    library's outputs."""
    expected = oracle(f"{family}-{kind}")
    feed = {k: expected[k] for k in ("input_ids", "attention_mask")}
    model = load_base(family, FIXTURES / f"tiny-{family}")
    with torch.no_grad():
        base = model(**feed)[OUTPUT[family]].numpy()
        got = attach(model, HUB / f"{family}-{kind}")(**feed)[OUTPUT[family]].numpy()
    assert unmasked_difference(got, expected) <= 1e-5
    assert unmasked_difference(base, expected) > 1e-2  # the adapter changes the output: the check is not vacuous


@pytest.mark.parametrize("family,kind", [("bert", "prefix"), ("llama", "houlsby")])
def test_export_bakes_the_adapter_into_the_graph(tmp_path, family, kind):
    """The exported graph, run in onnxruntime on the library's inputs, gives the library's outputs."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    graph = tmp_path / "model.onnx"
    result = run(
        "export-onnx", FIXTURES / f"tiny-{family}", "--adapter", HUB / f"{family}-{kind}", "-o", graph, "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verified"] is True
    expected = oracle(f"{family}-{kind}")
    feed = {k: expected[k].numpy() for k in ("input_ids", "attention_mask")}
    got = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert unmasked_difference(got, expected) <= 1e-5


def test_merge_refuses_and_points_to_export_onnx(tmp_path):
    result = run("merge", FIXTURES / "tiny-bert", HUB / "bert-houlsby", "-o", tmp_path / "merged")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "export-onnx --adapter bakes it" in lines[0]
    assert not (tmp_path / "merged").exists()


def test_inspect_describes_the_library_files():
    summary = json.loads(run("inspect", HUB / "llama-options2", "--json").output)
    assert summary["family"] == "AdapterHub Houlsby bottleneck adapter (after attention and feed-forward)"
    assert (
        summary["layers"] == [1] and summary["bottleneck_size"] == [8] and summary["model_class"] == "LlamaForCausalLM"
    )
    assert "export-onnx --adapter bakes it" in summary["merge"]


@pytest.mark.parametrize(
    "family,adapter,options,expected",
    [
        ("bert", "bert-houlsby", {"phm_layer": True}, "Compacter's parameterized hypercomplex (PHM) layers"),
        ("bert", "bert-pfeiffer", {"inv_adapter": "nice"}, "an invertible adapter"),
        ("llama", "llama-houlsby", {"use_gating": True}, "a gate averaged over every position, padding included"),
        ("llama", "bert-pfeiffer", {}, "saved for a bert model of width 64, and this is a llama model"),
        ("bert", "bert-houlsby", {"original_ln_before": False, "residual_before_ln": "post_add"}, '"post_add"'),
        ("bert", "bert-prefix", {"flat": True}, "an ejected (flat) prefix"),
        ("bert", "llama-prefix", {}, "saved for a llama model and this is a bert model"),
        ("bert", "bert-pfeiffer", {"architecture": "reft"}, "ReFT adapter runs in the adapters library only"),
    ],
)
def test_export_refuses_what_it_does_not_run(tmp_path, family, adapter, options, expected):
    """Compacter, invertible adapters, gating, an ejected prefix, an adapter of another model: one sentence, no
    graph written."""
    result = run(
        "export-onnx",
        FIXTURES / f"tiny-{family}",
        "--adapter",
        edited(tmp_path, adapter, **options),
        "-o",
        tmp_path / "m.onnx",
    )
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and expected in lines[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "m.onnx").exists()


def test_a_weight_other_than_one_is_refused(tmp_path):
    command = ["export-onnx", FIXTURES / "tiny-bert", "--adapter", HUB / "bert-pfeiffer", "-w", "0.5"]
    result = run(*command, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 1 and "weight other than 1" in result.output
