"""Streaming checkpoint writing, atomic outputs and the CLI's reports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from surgeon.checkpoint import Checkpoint, StreamingWriter, TensorInfo, parse_size
from surgeon.cli import main
from surgeon.errors import SurgeonError
from surgeon.output import atomic_output


def test_streaming_writer_accepts_any_order_and_matches_safetensors(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.tensor(2.5),
        "e": torch.ones(4, dtype=torch.bool),
    }
    specs = [(k, TensorInfo(tuple(v.shape), v.dtype)) for k, v in tensors.items()]
    with StreamingWriter(tmp_path, specs, shard_size=40, metadata={"note": "x"}) as writer:
        for key in reversed(list(tensors)):
            writer.write(key, tensors[key])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = Checkpoint(tmp_path)
    assert loaded.keys() == list(tensors)
    for key, value in tensors.items():
        assert torch.equal(loaded.get(key), value), key
    with safe_open(tmp_path / index["weight_map"]["a"], "pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "x"}


def test_streaming_writer_refuses_wrong_shape_and_missing_tensors(tmp_path):
    specs = [("a", TensorInfo((2, 2), torch.float32)), ("b", TensorInfo((1,), torch.float32))]
    writer = StreamingWriter(tmp_path, specs)
    with pytest.raises(SurgeonError, match="planned"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2, 2))
    with pytest.raises(SurgeonError, match="never written"):
        writer.close()


@pytest.mark.parametrize(
    "text, expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("100", 100)]
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_nonsense():
    with pytest.raises(SurgeonError, match="5GB"):
        parse_size("lots")


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit, RuntimeError])
def test_interrupted_output_leaves_nothing(tmp_path, interruption):
    dest = tmp_path / "out"
    with pytest.raises(interruption):
        with atomic_output(dest) as staging:
            (staging / "model.safetensors").write_bytes(b"partial")
            raise interruption()
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_sigterm_mid_write_leaves_nothing(tmp_path):
    script = (
        "import sys, time; from pathlib import Path\n"
        "from surgeon.output import atomic_output, install_signal_cleanup\n"
        "install_signal_cleanup()\n"
        "with atomic_output(Path(sys.argv[1])) as staging:\n"
        "    (staging / 'model.safetensors').write_bytes(b'partial')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    assert any(p.name.startswith(".out.surgeon-") for p in tmp_path.iterdir())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_inspect_json_for_adapter_and_checkpoint(fixtures_dir):
    adapter = json.loads(CliRunner().invoke(main, ["inspect", str(fixtures_dir / "tiny-llama-lora"), "--json"]).output)
    config = json.loads((fixtures_dir / "tiny-llama-lora" / "adapter_config.json").read_text())
    assert adapter["kind"] == "adapter" and adapter["format"] == "peft"
    assert adapter["rank"] == config["r"] and adapter["alpha"] == config["lora_alpha"]
    assert adapter["scale"] == config["lora_alpha"] / config["r"]
    assert adapter["targets"] == 2 * len(config["target_modules"])
    assert adapter["bytes"] == os.path.getsize(
        fixtures_dir / "tiny-llama-lora" / "adapter_model.safetensors"
    ) - _header_size(fixtures_dir / "tiny-llama-lora" / "adapter_model.safetensors")
    checkpoint = json.loads(CliRunner().invoke(main, ["inspect", str(fixtures_dir / "tiny-gpt2"), "--json"]).output)
    assert checkpoint["kind"] == "checkpoint" and checkpoint["architecture"] == "GPT2LMHeadModel"
    assert checkpoint["params"] == sum(t.numel() for _, t in Checkpoint(fixtures_dir / "tiny-gpt2").items())


def _header_size(path: Path) -> int:
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_merge_json_report_copies_extras_and_records_dtype(fixtures_dir, tmp_path):
    out = tmp_path / "merged"
    result = CliRunner().invoke(
        main,
        [
            "merge",
            str(fixtures_dir / "tiny-llama"),
            str(fixtures_dir / "tiny-llama-lora"),
            "-o",
            str(out),
            "--dtype",
            "bf16",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["changed"] == 14 and report["tensors"] == len(Checkpoint(fixtures_dir / "tiny-llama"))
    assert (out / "generation_config.json").read_bytes() == (
        fixtures_dir / "tiny-llama" / "generation_config.json"
    ).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    merged = Checkpoint(out)
    assert {merged.info(k).dtype for k in merged.keys()} == {torch.bfloat16}


def test_package_imports_formats_from_a_clean_install(tmp_path):
    """A non-editable install must ship every package, surgeon.formats from the top-level formats/ folder
    included. Built from a copy of the sources and imported with the running interpreter (whose venv holds
    the dependencies), the install's folder first on the path and the source tree off it."""
    root = Path(__file__).resolve().parent.parent
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "surgeon", "formats"):
        copy = shutil.copytree if (root / name).is_dir() else shutil.copy2
        copy(
            root / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
        )
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(source)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert install.returncode == 0, install.stderr
    probe = "import surgeon.cli, surgeon.formats.peft, surgeon.formats; print(surgeon.formats.__file__)"
    located = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert located.returncode == 0, located.stderr
    assert located.stdout.strip() == str(site / "surgeon" / "formats" / "__init__.py")


def test_installed_package_imports_formats_outside_the_repo(tmp_path):
    """However the running environment installed surgeon (CI: editable), surgeon.formats imports from anywhere."""
    located = subprocess.run(
        [sys.executable, "-c", "import surgeon.formats.peft as p; print(p.NAME)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    assert located.strip() == "peft"
    console_script = Path(sys.executable).with_name("surgeon")
    assert subprocess.run([str(console_script), "--help"], capture_output=True, cwd=tmp_path).returncode == 0


def test_inspect_resolves_kohya_names_with_base(fixtures_dir, tmp_path):
    runner = CliRunner()
    kohya_file = tmp_path / "lora.safetensors"
    assert (
        runner.invoke(
            main, ["convert", str(fixtures_dir / "tiny-llama-lora"), "--to", "kohya", "-o", str(kohya_file)]
        ).exit_code
        == 0
    )
    without = runner.invoke(main, ["inspect", str(kohya_file)])
    assert without.exit_code == 1 and "--base" in without.output
    summary = json.loads(
        runner.invoke(main, ["inspect", str(kohya_file), "--base", str(fixtures_dir / "tiny-llama"), "--json"]).output
    )
    peft_summary = json.loads(runner.invoke(main, ["inspect", str(fixtures_dir / "tiny-llama-lora"), "--json"]).output)
    assert summary["format"] == "kohya"
    assert {m["target"] for m in summary["modules"]} == {m["target"] for m in peft_summary["modules"]}
    assert (summary["rank"], summary["scale"], summary["params"]) == (
        peft_summary["rank"],
        peft_summary["scale"],
        peft_summary["params"],
    )
