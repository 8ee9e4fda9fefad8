"""hf:// inputs, pull and push, through huggingface_hub's real client and without network: (1) a
cache laid out as the Hub's with HF_HUB_OFFLINE=1, (2) the local stand-in server in hub_server.py.

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME when it is imported, so every command
under test runs in a subprocess with its own environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from hub_server import HubServer
from surgeon.cli import main

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def hub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


def surgeon(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from surgeon.cli import main; main(prog_name='surgeon')", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def write_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str) -> None:
    """A repository in the Hub cache layout: blobs named by content hash, refs/main holding the
    commit, and snapshots/<commit>/<file> as relative symlinks to the blobs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))


# -- (1) the offline cache -------------------------------------------------------------------------


def test_offline_cache_serves_hf_paths_to_merge(tmp_path):
    cache = tmp_path / "hf-home" / "hub"
    write_cache(cache, "org/tiny-llama", folder_files(FIXTURES / "tiny-llama"), "a" * 40)
    write_cache(cache, "org/tiny-llama-lora", folder_files(FIXTURES / "tiny-llama-lora"), "b" * 40)
    env = hub_env(tmp_path, HF_HUB_OFFLINE="1")

    done = surgeon(
        env, "merge", "hf://org/tiny-llama", "hf://org/tiny-llama-lora@main", "-o", str(tmp_path / "from-hub")
    )
    assert done.returncode == 0, done.stderr
    local = CliRunner().invoke(
        main, ["merge", str(FIXTURES / "tiny-llama"), str(FIXTURES / "tiny-llama-lora"), "-o", str(tmp_path / "local")]
    )
    assert local.exit_code == 0, local.output
    from_hub, expected = (
        load_file(tmp_path / "from-hub" / "model.safetensors"),
        load_file(tmp_path / "local" / "model.safetensors"),
    )
    assert from_hub.keys() == expected.keys()
    assert all(torch.equal(from_hub[k], expected[k]) for k in expected)
    assert (tmp_path / "from-hub" / "config.json").read_text() == (FIXTURES / "tiny-llama" / "config.json").read_text()

    missing = surgeon(env, "inspect", "hf://org/not-cached")
    assert missing.returncode != 0
    assert "not in the local Hub cache" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_unreachable_hub_falls_back_to_the_cache(tmp_path):
    write_cache(tmp_path / "hf-home" / "hub", "org/tiny-gpt2-lora", folder_files(FIXTURES / "tiny-gpt2-lora"), "c" * 40)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = hub_env(tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=closed)
    cached = surgeon(env, "inspect", "hf://org/tiny-gpt2-lora", "--json")
    assert cached.returncode == 0, cached.stderr
    assert json.loads(cached.stdout)["rank"] == 8
    absent = surgeon(env, "inspect", "hf://org/elsewhere")
    assert absent.returncode != 0 and "cannot be reached" in absent.stderr


# -- (2) the local server --------------------------------------------------------------------------


@pytest.fixture()
def hub():
    with HubServer() as server:
        yield server


def test_pull_fetches_only_what_surgeon_reads(hub, tmp_path):
    adapter = folder_files(FIXTURES / "tiny-llama-lora")
    clutter = {
        "optimizer.pt": b"state",
        "training_args.bin": b"args",
        "adapter_model.bin": b"pickle twin",
        "model.onnx": b"graph",
        "model-q8_0.gguf": b"GGUF",
        "checkpoint-5/adapter_config.json": adapter["adapter_config.json"],
        "checkpoint-5/adapter_model.safetensors": adapter["adapter_model.safetensors"],
        "checkpoint-5/optimizer.pt": b"state",
    }
    repo = hub.add_repo("org/lora", {**adapter, **clutter})
    first = repo.refs["main"]
    repo.commit({"adapter_config.json": b"{}"}, message="break main")
    env = hub_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")

    single = surgeon(env, "pull", f"hf://org/lora@{first}/model-q8_0.gguf", "-o", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    assert folder_files(tmp_path / "single") == {"model-q8_0.gguf": b"GGUF"}
    assert hub.downloads() == ["model-q8_0.gguf"]

    done = surgeon(env, "pull", f"hf://org/lora@{first}", "-o", str(tmp_path / "pulled"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["commit"] == first
    pulled = folder_files(tmp_path / "pulled")
    expected = {name for name in {**adapter, **clutter} if name.endswith((".json", ".safetensors"))}
    assert set(pulled) == expected  # the GGUF fetched before into the same snapshot is not part of it
    assert pulled["adapter_model.safetensors"] == adapter["adapter_model.safetensors"]
    assert not {"optimizer.pt", "training_args.bin", "adapter_model.bin", "model.onnx", "model-q8_0.gguf"} & set(
        hub.downloads()[1:]
    )

    sub = surgeon(env, "inspect", f"hf://org/lora@{first}/checkpoint-5", "--json")
    assert sub.returncode == 0, sub.stderr
    assert json.loads(sub.stdout)["format"] == "peft"


def test_pull_takes_pickles_only_where_there_are_no_safetensors(hub, tmp_path):
    hub.add_repo("org/old", {"config.json": b"{}", "pytorch_model.bin": b"weights", "training_args.bin": b"args"})
    env = hub_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    done = surgeon(env, "pull", "hf://org/old", "-o", str(tmp_path / "old"))
    assert done.returncode == 0, done.stderr
    assert set(folder_files(tmp_path / "old")) == {"config.json", "pytorch_model.bin"}


def test_hub_errors_are_one_sentence_that_says_what_to_do(hub, tmp_path):
    hub.add_repo("org/gated", {"config.json": b"{}"}, gated=True, granted={"hf_granted"})
    hub.add_repo("org/open", {"config.json": b"{}"})
    script = """
import json, os, sys
from surgeon.errors import SurgeonError
from surgeon.hub import fetch
out = {}
for name, uri, token in json.loads(sys.argv[1]):
    os.environ.pop("HF_TOKEN", None)
    if token:
        os.environ["HF_TOKEN"] = token
    try:
        out[name] = str(fetch(uri).path)
    except SurgeonError as error:
        out[name] = "SurgeonError: " + str(error)
print(json.dumps(out))
"""
    cases = [
        ("missing", "hf://org/nothing", None),
        ("missing-token", "hf://org/nothing", "hf_x"),
        ("gated", "hf://org/gated", None),
        ("gated-token", "hf://org/gated", "hf_x"),
        ("granted", "hf://org/gated", "hf_granted"),
        ("revision", "hf://org/open@v9", None),
        ("path", "hf://org/open/sub", None),
        ("bad", "hf://", None),
    ]
    env = hub_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert "no such repository" in found["missing"] and "hf auth login" in found["missing"]
    assert "token cannot read it" in found["missing-token"]
    assert "gated" in found["gated"] and "accept its conditions" in found["gated"] and "hf auth login" in found["gated"]
    assert "not been granted access" in found["gated-token"]
    assert Path(found["granted"], "config.json").is_file()
    assert "no revision 'v9'" in found["revision"]
    assert "found no file" in found["path"]
    assert "not a Hub path" in found["bad"]
    for message in found.values():
        assert "\n" not in message


def test_push_creates_the_repo_with_a_card_in_one_commit(hub, tmp_path):
    env = hub_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_TOKEN="hf_writer")
    adapter_dir = FIXTURES / "tiny-llama-lora"
    done = surgeon(
        env, "push", str(adapter_dir), "hf://me/adapter", "--private", "--base-model", "org/tiny-llama", "--json"
    )
    assert done.returncode == 0, done.stderr
    repo = hub.repos["me/adapter"]
    assert repo.private
    assert len(repo.commits) == 2  # the repository's creation, then exactly one commit
    files = repo.files()
    local = folder_files(adapter_dir)
    assert files["adapter_model.safetensors"] == local["adapter_model.safetensors"]
    assert files["adapter_config.json"] == local["adapter_config.json"]
    assert files["README.md"] != local["README.md"]  # PEFT's unfilled template is replaced
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "org/tiny-llama"
    assert card.data.base_model_relation == "adapter"
    assert card.data.library_name == "peft"
    config = json.loads(local["adapter_config.json"])
    assert f"| rank | {config['r']} |" in card.text and f"| alpha | {config['lora_alpha']} |" in card.text
    assert any(path == "/api/validate-yaml" for _, path, _ in hub.log)
    assert all(token == "hf_writer" for method, _, token in hub.log if method == "POST")

    # what went up comes back down, byte for byte, through an hf:// input
    pulled = surgeon(env, "pull", "hf://me/adapter", "-o", str(tmp_path / "back"))
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == local["adapter_model.safetensors"]

    pr = surgeon(env, "push", str(FIXTURES / "tiny-gpt2"), "hf://me/adapter/gpt2", "--create-pr", "--json")
    assert pr.returncode == 0, pr.stderr
    assert json.loads(pr.stdout)["pr_url"].endswith("/discussions/1")
    assert "gpt2/model.safetensors" in repo.files("refs/pr/1") and "gpt2/model.safetensors" not in repo.files("main")
    assert "architecture | GPT2LMHeadModel" in repo.files("refs/pr/1")["gpt2/README.md"].decode()

    branch = surgeon(env, "push", str(adapter_dir), "hf://me/adapter@dev", "-m", "on a branch")
    assert branch.returncode == 0, branch.stderr
    assert repo.messages[repo.refs["dev"]] == "on a branch"


def test_push_without_token_says_how_to_log_in(hub, tmp_path):
    env = hub_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    done = surgeon(env, "push", str(FIXTURES / "tiny-llama-lora"), "hf://me/adapter")
    assert done.returncode == 1
    assert "no Hugging Face token found" in done.stderr and "hf auth login" in done.stderr
    assert "me/adapter" not in hub.repos


def test_push_dry_run_lists_the_commit_and_sends_nothing(tmp_path):
    result = CliRunner().invoke(
        main, ["push", str(FIXTURES / "tiny-bert-lora"), "hf://me/bert-adapter", "--dry-run", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [f["path"] for f in report["files"]] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert report["dry_run"] and "| rank | 8 |" in report["card"]
    own = tmp_path / "own"
    own.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (own / name).write_bytes((FIXTURES / "tiny-bert-lora" / name).read_bytes())
    (own / "README.md").write_text("# my own words\n")
    kept = CliRunner().invoke(main, ["push", str(own), "hf://me/bert-adapter", "--dry-run", "--json"])
    assert json.loads(kept.output)["card"] is None


def test_push_card_of_a_merge_says_how_it_was_made(tmp_path, monkeypatch):
    merged = tmp_path / "merged"
    args = ["merge", str(FIXTURES / "tiny-gpt2"), str(FIXTURES / "tiny-gpt2-lora"), "-o", str(merged)]
    monkeypatch.setattr("sys.argv", ["surgeon", *args])  # what provenance() records, as a shell would pass it
    assert CliRunner().invoke(main, args).exit_code == 0
    (merged / "README.md").write_text("# The base model's own card\n")  # as merge copies a base's README along
    result = CliRunner().invoke(main, ["push", str(merged), "hf://me/merged", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)["card"]
    assert card is not None and "The base model's own card" not in card
    assert "| architecture | GPT2LMHeadModel |" in card
    assert f"surgeon merge {FIXTURES}/tiny-gpt2 {FIXTURES}/tiny-gpt2-lora" in card


def test_push_card_links_a_recorded_base_only_where_the_hub_cache_holds_it(tmp_path, monkeypatch):
    """PEFT records the path the base was loaded from; a relative one such as out/base reads as a Hub id."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))  # read when imported
    adapter = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "tiny-bert-lora", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "out/base"}))

    def card() -> str:
        result = CliRunner().invoke(main, ["push", str(adapter), "hf://me/adapter", "--dry-run", "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["card"]

    assert "base_model:" not in card() and "huggingface.co/out/base" not in card() and "`out/base`" in card()
    snapshot = tmp_path / "cache" / "models--out--base" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    assert "base_model: out/base" in card() and "(https://huggingface.co/out/base)" in card()
