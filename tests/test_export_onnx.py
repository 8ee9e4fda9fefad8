"""export-onnx: the tiny Llama, GPT-2 and BERT fixtures merged with their PEFT adapters, exported,
and run in onnxruntime against PEFT's own forward pass (the adapter unmerged, as PEFT applies it);
a graph with one initializer changed must fail the command's verification."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("peft")

import onnxruntime  # noqa: E402

from fixtures.make_fixtures import load_base  # noqa: E402
from surgeon import onnx_export  # noqa: E402
from surgeon.cli import main  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def peft_reference(arch: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(arch, FIXTURES / f"tiny-{arch}"), FIXTURES / f"tiny-{arch}-lora").eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(feed["input_ids"]), attention_mask=torch.from_numpy(feed["attention_mask"])
        )
    return (out.logits if arch != "bert" else out.last_hidden_state).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each fixture merged with its adapter and exported by the command, with its --json report."""
    out = tmp_path_factory.mktemp("onnx")
    found = {}
    for arch in ("llama", "gpt2", "bert"):
        graph = out / f"{arch}.onnx"
        args = [
            "export-onnx",
            str(FIXTURES / f"tiny-{arch}"),
            "--adapter",
            str(FIXTURES / f"tiny-{arch}-lora"),
            "-o",
            str(graph),
            "--json",
        ]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("sys.argv", ["surgeon", *args])  # what the command records, as a shell would pass it
            result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        found[arch] = (graph, json.loads(result.stdout))
    return found


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merged_export_matches_peft_in_onnxruntime(exported, arch):
    graph, report = exported[arch]
    assert report["verified"] is True and report["exporter"] == "dynamo"
    assert report["verification"]["max_abs_diff"] <= 1e-4
    assert [p.name for p in graph.parent.glob(f"{arch}.onnx*")] == [
        graph.name
    ]  # no .data, no .unverified, no leftovers
    onnx.checker.check_model(str(graph))
    recorded = {p.key: p.value for p in onnx.load(str(graph)).metadata_props}
    assert recorded["surgeon_command"].startswith(f"surgeon export-onnx {FIXTURES}/tiny-{arch} --adapter")
    assert json.loads(recorded["surgeon_report"])["verification"]["passed"]

    # Shapes the export never saw, a padded row, and PEFT (not surgeon's merge) as the reference.
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    feed = {
        "input_ids": rng.integers(0, 256, (4, 19), dtype=np.int64),
        "attention_mask": np.ones((4, 19), dtype=np.int64),
    }
    feed["attention_mask"][1, 12:] = 0
    got = session.run(None, feed)[0]
    expected = peft_reference(arch, feed)
    valid = feed["attention_mask"].astype(bool)
    assert got.shape == expected.shape
    assert np.abs(got[valid] - expected[valid]).max() <= 1e-4
    base = load_base(arch, FIXTURES / f"tiny-{arch}").eval()
    with torch.no_grad():
        out = base(
            input_ids=torch.from_numpy(feed["input_ids"]), attention_mask=torch.from_numpy(feed["attention_mask"])
        )
    unmerged = (out.logits if arch != "bert" else out.last_hidden_state).numpy()
    assert np.abs(got[valid] - unmerged[valid]).max() > 1e-3  # the adapter really is in the graph


def test_push_card_says_how_the_graph_was_made(exported, tmp_path):
    graph, _ = exported["gpt2"]
    shutil.copy(graph, tmp_path / graph.name)
    result = CliRunner().invoke(main, ["push", str(tmp_path), "hf://me/gpt2-onnx", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)["card"]
    assert "library_name: onnx" in card and "outputs logits" in card
    assert f"surgeon export-onnx {FIXTURES}/tiny-gpt2 --adapter {FIXTURES}/tiny-gpt2-lora" in card


def corrupt(source: Path, dest: Path, external: bool = False) -> None:
    """``source`` with its largest initializer nudged by 0.05."""
    model = onnx.load(str(source))
    target = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) + np.float32(0.05), target.name))
    if external:
        onnx.save_model(
            model,
            str(dest),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=dest.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(dest))


def test_verification_catches_a_changed_initializer(exported, tmp_path):
    graph, _ = exported["llama"]
    broken = tmp_path / "broken.onnx"
    corrupt(graph, broken)
    head, config = onnx_export.load_head(FIXTURES / "tiny-llama", "causal-lm")
    assert not onnx_export.verify(broken, head, config, atol=1e-4).passed
    # the intact graph is the merged model, not the base: verifying it against the base fails too
    assert not onnx_export.verify(graph, head, config, atol=1e-4).passed


def test_failed_verification_exits_nonzero_and_keeps_the_graph_aside(exported, tmp_path, monkeypatch):
    graph, _ = exported["llama"]

    def broken_exporter(head, config, dest, exporter, opset, external):
        corrupt(graph, dest, external=True)
        return "dynamo"

    monkeypatch.setattr(onnx_export, "export_graph", broken_exporter)
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(
        main,
        ["export-onnx", str(FIXTURES / "tiny-llama"), "--adapter", str(FIXTURES / "tiny-llama-lora"), "-o", str(out)],
    )
    assert result.exit_code == 1
    assert "above --atol" in result.output and "model.onnx.unverified" in result.output
    assert not out.exists() and not (tmp_path / "model.onnx.data").exists()
    kept = tmp_path / "model.onnx.unverified"
    assert kept.is_file() and (tmp_path / "model.onnx.unverified.data").is_file()
    onnxruntime.InferenceSession(str(kept), providers=["CPUExecutionProvider"])  # it points at its renamed data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx.unverified", "model.onnx.unverified.data"]

    skipped = CliRunner().invoke(
        main, ["export-onnx", str(FIXTURES / "tiny-llama"), "-o", str(out), "--no-verify", "--json"]
    )
    assert skipped.exit_code == 0, skipped.output
    assert json.loads(skipped.stdout)["verified"] is None and out.is_file()


def test_legacy_exporter_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", 0)  # as if the model were over 2 GB
    out = tmp_path / "bert.onnx"
    result = CliRunner().invoke(
        main,
        [
            "export-onnx",
            str(FIXTURES / "tiny-bert"),
            "--adapter",
            str(FIXTURES / "tiny-bert-lora"),
            "-o",
            str(out),
            "--exporter",
            "legacy",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["exporter"] == "legacy" and report["opset"] == onnx_export.LEGACY_OPSET and report["external_data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.onnx", "bert.onnx.data"]
    onnx.checker.check_model(str(out))
    assert report["verified"] and report["verification"]["max_abs_diff"] <= 1e-4


def test_missing_extra_names_what_to_install(monkeypatch, tmp_path):
    real = onnx_export.importlib.util.find_spec
    monkeypatch.setattr(
        onnx_export.importlib.util, "find_spec", lambda name: None if name == "onnxscript" else real(name)
    )
    result = CliRunner().invoke(main, ["export-onnx", str(FIXTURES / "tiny-llama"), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1
    assert "onnxscript" in result.output and "pip install '.[onnx]'" in result.output


def test_existing_output_is_refused_before_any_work(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    result = CliRunner().invoke(main, ["export-onnx", str(FIXTURES / "tiny-gpt2"), "-o", str(out)])
    assert result.exit_code == 1 and "--force" in result.output
    assert out.read_bytes() == b"keep me"


def test_dependencies_stay_quiet_unless_verbose(tmp_path):
    """transformers' loading bars and the exporter's notes about torchvision operators are noise on
    stderr; a fresh process (they print once per process) shows none of them without --verbose."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    command = [
        sys.executable,
        "-c",
        "from surgeon.cli import main; main()",
        "export-onnx",
        str(root / "fixtures" / "tiny-llama"),
        "-o",
        str(tmp_path / "m.onnx"),
        "--no-verify",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "torchvision" not in done.stderr and "Loading weights" not in done.stderr, done.stderr


def test_prefix_tuning_is_traced_into_the_graph(tmp_path):
    """A PEFT prefix-tuning adapter, which no weight delta expresses, runs in the exported graph as PEFT
    runs it (issue 16): onnxruntime matches PEFT's prefix-tuned forward pass, not the base's."""
    from peft import PeftModel, PrefixTuningConfig, get_peft_model

    torch.manual_seed(5)
    get_peft_model(
        load_base("llama", FIXTURES / "tiny-llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    ).save_pretrained(tmp_path / "prefix")
    graph = tmp_path / "prefix.onnx"
    command = ["export-onnx", str(FIXTURES / "tiny-llama"), "--adapter", str(tmp_path / "prefix")]
    result = CliRunner().invoke(main, [*command, "-o", str(graph), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verified"] is True
    rng = np.random.default_rng(3)
    feed = {"input_ids": rng.integers(0, 256, (3, 11), dtype=np.int64), "attention_mask": np.ones((3, 11), np.int64)}
    feed["attention_mask"][2, 7:] = 0
    got = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    inputs = {k: torch.from_numpy(v) for k, v in feed.items()}
    with torch.no_grad():
        prefixed = PeftModel.from_pretrained(load_base("llama", FIXTURES / "tiny-llama"), tmp_path / "prefix")
        expected = prefixed(**inputs).logits
        base = load_base("llama", FIXTURES / "tiny-llama")(**inputs).logits
    valid = feed["attention_mask"].astype(bool)
    assert np.abs(got[valid] - expected.numpy()[valid]).max() <= 1e-4
    assert np.abs(got[valid] - base.numpy()[valid]).max() > 1e-3
    scaled = CliRunner().invoke(main, [*command, "-w", "0.5", "-o", str(tmp_path / "scaled.onnx")])
    assert scaled.exit_code == 1 and "weight other than 1" in scaled.output
