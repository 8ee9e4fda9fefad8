"""The output guard: no run destroys an input or someone's files, two runs never write one output,
a killed run leaves nothing the next run does not clear, and OS failures are one line."""

from __future__ import annotations

import fcntl
import hashlib
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from surgeon.checkpoint import Checkpoint
from surgeon.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".surgeon-" in p.name)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def merged(fixtures_dir, tmp_path) -> tuple[Path, Path]:
    """A private copy of the tiny base and a full fine-tune of it (the base with the LoRA merged)."""
    base = Path(shutil.copytree(fixtures_dir / "tiny-llama", tmp_path / "base"))
    assert run("merge", base, fixtures_dir / "tiny-llama-lora", "-o", tmp_path / "tuned").exit_code == 0
    return base, tmp_path / "tuned"


def test_report_onto_an_input_is_refused_and_the_input_kept(merged, tmp_path):
    base, tuned = merged
    before = digest(base / "model.safetensors")
    target = base / "model.safetensors"
    result = run("extract", base, tuned, "-o", tmp_path / "adapter", "--rank", "2", "--report", target, "--force")
    assert_one_line_error(result, "inside the input")
    assert digest(base / "model.safetensors") == before
    assert not (tmp_path / "adapter").exists()


def test_report_onto_an_existing_file_needs_force(merged, tmp_path):
    base, tuned = merged
    report = tmp_path / "report.json"
    report.write_text("mine")
    command = ["extract", base, tuned, "-o", tmp_path / "adapter", "--rank", "2", "--report", report]
    assert_one_line_error(run(*command), "already exists")
    assert report.read_text() == "mine" and not (tmp_path / "adapter").exists()  # refused before the work
    assert run(*command, "--force").exit_code == 0
    assert report.read_text().startswith("{") and leftovers(tmp_path) == []


def test_force_refuses_a_folder_holding_more_than_surgeon_output(fixtures_dir, tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "main.py").write_text("print('keep me')\n")
    monkeypatch.chdir(project)
    result = run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", ".", "--force")
    assert_one_line_error(result, ".git", "main.py", "surgeon does not write")
    assert (project / "main.py").read_text() == "print('keep me')\n" and (project / ".git").is_dir()


def test_force_replaces_earlier_surgeon_outputs(merged, tmp_path):
    base, tuned = merged
    adapter = tmp_path / "adapter"  # PEFT files plus a sparse/ subfolder
    for rank in ("2", "4"):
        result = run("extract", base, tuned, "-o", adapter, "--rank", rank, "--sparse-density", "0.01", "--force")
        assert result.exit_code == 0, result.output
    assert (adapter / "sparse" / "sparse_model.safetensors").is_file()
    result = run("merge", base, adapter, adapter / "sparse", "-o", tuned, "--force")  # over merge's own output
    assert result.exit_code == 0, result.output
    assert leftovers(tmp_path) == []


def test_a_second_run_on_a_locked_output_fails(fixtures_dir, tmp_path):
    out = tmp_path / "out"
    with open(tmp_path / ".out.surgeon-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242\n")
        lock.flush()
        result = run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", out)
    assert_one_line_error(result, "another surgeon run (process 4242)")
    assert not out.exists()


def test_stale_lock_and_staging_of_dead_processes_are_cleared(fixtures_dir, tmp_path):
    pid = dead_pid()
    (tmp_path / ".out.surgeon-lock").write_text(f"{pid}\n")
    stale = tmp_path / f".out.surgeon-{pid}-abcd1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    result = run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"removed {stale.name}" in result.output and f"left by process {pid}" in result.output
    assert "took over the lock" in result.output
    assert leftovers(tmp_path) == [] and (tmp_path / "out" / "model.safetensors").is_file()


# Runs surgeon with a pause at one point (after the first tensor is written, or in the middle of
# the --force swap), announced on stderr, so that the test can kill -9 it exactly there.
PAUSED = """
import os, sys, time
import surgeon.checkpoint
stop = os.environ["STOP_AT"]
write, replace = surgeon.checkpoint.StreamingWriter.write, os.replace
def pause():
    print("stopped", file=sys.stderr, flush=True)
    time.sleep(60)
def paused_write(self, key, tensor):
    write(self, key, tensor)
    if stop == "write":
        pause()
def paused_replace(source, dest):
    replace(source, dest)
    if stop == "swap" and "-old-" in str(dest):
        pause()
surgeon.checkpoint.StreamingWriter.write = paused_write
os.replace = paused_replace
from surgeon.cli import main
main()
"""


def kill_merge_at(point: str, fixtures_dir: Path, out: Path, *extra: str) -> None:
    command = [
        sys.executable,
        "-c",
        PAUSED,
        "merge",
        str(fixtures_dir / "tiny-llama"),
        str(fixtures_dir / "tiny-llama-lora"),
        "-o",
        str(out),
        *extra,
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "STOP_AT": point})
    try:
        assert any(line.strip() == "stopped" for line in process.stderr)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()


def test_kill_9_mid_write_leaves_no_output_and_the_next_run_clears_staging(fixtures_dir, tmp_path):
    out = tmp_path / "out"
    kill_merge_at("write", fixtures_dir, out)
    assert not out.exists() and leftovers(tmp_path)
    result = run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", out)
    assert result.exit_code == 0 and "killed while writing it" in result.output, result.output
    assert leftovers(tmp_path) == [] and len(Checkpoint(out))


def test_kill_9_mid_force_swap_loses_nothing(fixtures_dir, tmp_path):
    out = tmp_path / "out"
    assert run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", out).exit_code == 0
    before = digest(out / "model.safetensors")
    kill_merge_at("swap", fixtures_dir, out, "--force")
    assert not out.exists()  # moved aside, not yet replaced
    result = run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", out)
    *notes, error = result.output.splitlines()
    assert any(note.startswith(f"surgeon: put back {out}") for note in notes), result.output
    assert result.exit_code == 1 and error.startswith("Error: ") and "already exists" in error
    assert digest(out / "model.safetensors") == before and leftovers(tmp_path) == []


def test_a_failed_force_swap_keeps_the_old_output(fixtures_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", out).exit_code == 0
    before = digest(out / "model.safetensors")
    replace = os.replace

    def failing_replace(source, dest):
        if Path(dest) == out and ".surgeon-" in str(source) and "-old-" not in str(source):
            raise PermissionError(13, "Permission denied", str(source), None, str(dest))
        replace(source, dest)

    monkeypatch.setattr(os, "replace", failing_replace)
    result = run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", out, "--force")
    assert_one_line_error(result, "Permission denied")
    assert digest(out / "model.safetensors") == before and leftovers(tmp_path) == []


def test_file_size_limit_is_one_line_naming_the_output(fixtures_dir, tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    command = [
        sys.executable,
        "-c",
        "from surgeon.cli import main; main()",
        "merge",
        str(fixtures_dir / "tiny-llama"),
        str(fixtures_dir / "tiny-llama-lora"),
        "-o",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(command, check=False, preexec_fn=limit, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    expected = f"Error: {tmp_path / 'out'}: writing the output failed (File too large); nothing was written there.\n"
    assert result.stderr == expected
    assert leftovers(tmp_path) == []


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder nobody may write into: read-only for a user, immutable (chattr +i) for root, who
    writes through permissions."""
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    if os.geteuid() != 0:
        yield folder, "Permission denied"
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("root can write anywhere here, and chattr +i is not available")
    yield folder, "Operation not permitted"
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_output_folder_is_one_line(fixtures_dir, unwritable_folder):
    folder, reason = unwritable_folder
    result = run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", folder / "out")
    assert_one_line_error(result, str(folder), reason)


def test_unreadable_input_is_not_called_missing(fixtures_dir, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    result = run("merge", loop, fixtures_dir / "tiny-llama-lora", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "symbolic links" in result.output, result.output
    assert "no such file" not in result.output


def test_output_names_up_to_255_bytes_work(fixtures_dir, tmp_path):
    out = tmp_path / ("n" * 250)
    result = run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and leftovers(tmp_path) == []
    too_long = run("merge", fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora", "-o", tmp_path / ("n" * 256))
    assert_one_line_error(too_long, "longer than 255 bytes")


def test_written_files_get_the_usual_modes(fixtures_dir, tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    for fmt, out in (("peft", tmp_path / "peft"), ("mlx", tmp_path / "mlx"), ("ort", tmp_path / "a.onnx_adapter")):
        result = run("convert", fixtures_dir / "tiny-llama-lora", "--to", fmt, "-o", out)
        assert result.exit_code == 0, result.output
        for path in [out, *out.rglob("*")]:
            expected = (0o777 if path.is_dir() else 0o666) & ~mask
            assert path.stat().st_mode & 0o777 == expected, path


def test_unmerge_check_against_a_wrong_base_leaves_nothing(fixtures_dir, tmp_path):
    out = tmp_path / "restored"
    result = run(
        "unmerge",
        fixtures_dir / "tiny-llama",
        fixtures_dir / "tiny-llama-lora",
        "-o",
        out,
        "--check",
        fixtures_dir / "tiny-gpt2",
    )
    assert_one_line_error(result, "hold different tensors")
    assert not out.exists() and leftovers(tmp_path) == []
