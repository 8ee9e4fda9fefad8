"""The CLI answers fast: --help, argument errors and header-only inspect import no torch, and what
they say is short and true. Each check runs in a fresh interpreter, since this one has torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from deploy_variants import VARIANTS, variant
from surgeon.cli import main
from surgeon.formats import FORMATS
from surgeon.summary import adapter_summary, peft_header_summary

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "numpy", "safetensors", "onnx", "gguf", "surgeon.formats.peft", "surgeon.delta")
PROBE = """
import json, sys
from surgeon.cli import main
try:
    main(sys.argv[1:], prog_name="surgeon")
except SystemExit as done:
    code = done.code
print(json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def run_fresh(*args: str) -> dict:
    """Run the CLI in a new interpreter; its exit code and which heavy modules it imported."""
    script = f"HEAVY = {HEAVY!r}\n{PROBE}"
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def variants_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("variants")


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["merge", "--help"],
        ["extract", "--help"],
        ["convert", "--help"],
        ["export-onnx", "--help"],
        ["push", "--help"],
        ["merge", "fixtures/tiny-llama"],  # a missing argument
        ["convert", "fixtures/tiny-llama-lora", "--to", "nonsense", "-o", "x"],  # a bad choice
        [
            "merge",
            "fixtures/tiny-llama",
            "fixtures/tiny-llama-lora",
            "-o",
            "merged.safetensors",
        ],  # a file name for a folder
        ["inspect", "fixtures/tiny-llama-lora", "--json"],  # header only
        ["inspect", "fixtures/tiny-llama"],  # header only
    ],
)
def test_answers_without_importing_torch(args):
    found = run_fresh(*args)
    assert found["heavy"] == [], f"{args} imported {found['heavy']}"


def test_header_only_inspect_agrees_with_reading_the_adapter(variants_root):
    """The header summary is the full reader's summary, for every PEFT layout the variants cover
    (rank and alpha patterns, rsLoRA, embeddings with their saved base layer, DoRA, modules_to_save)."""
    for name in VARIANTS:
        path = variant(name, variants_root)
        from_header = peft_header_summary(path, FORMATS["peft"].description)
        assert from_header is not None, name
        assert from_header == adapter_summary(FORMATS["peft"].read(path), path, FORMATS["peft"].description), name


def test_header_only_inspect_leaves_what_it_cannot_tell_to_the_reader(tmp_path, fixtures_dir):
    broken = tmp_path / "adapter"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(
        (fixtures_dir / "tiny-llama-lora" / "adapter_model.safetensors").read_bytes()
    )
    config = json.loads((fixtures_dir / "tiny-llama-lora" / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    assert peft_header_summary(broken, "") is None
    result = CliRunner().invoke(main, ["inspect", str(broken)])
    assert result.exit_code == 1 and "rank 8 in its tensors but 4" in result.output


def test_help_says_every_command_whole():
    text = CliRunner().invoke(main, ["--help"]).output
    listed = text.split("Commands:")[1]
    assert "…" not in listed and "..." not in listed
    assert {
        line.split()[0] for line in listed.splitlines() if line.startswith("  ") and not line.startswith("   ")
    } == set(main.commands)
    assert "merge, unmerge and inspect LoRA adapters" not in text


@pytest.mark.parametrize("command", ["extract", "resize"])
def test_rank_commands_say_one_of_three_is_needed(command):
    assert "exactly one of --rank, --energy" in CliRunner().invoke(main, [command, "--help"], terminal_width=200).output


def test_choices_are_listed_and_help_points_at_no_source_file():
    extract_help = CliRunner().invoke(main, ["extract", "--help"], terminal_width=200).output
    assert ".py" not in extract_help
    merge_help = CliRunner().invoke(main, ["merge", "--help"], terminal_width=200).output
    assert "[peft|mlx|gguf|ort|diffusers|lycoris|kohya|adapterhub|sparse]" in merge_help


def test_swapped_arguments_are_named(fixtures_dir, tmp_path):
    base, lora = fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora"
    for args in ([lora, base], [base, base]):
        result = CliRunner().invoke(main, ["merge", *map(str, args), "-o", str(tmp_path / "m")])
        assert result.exit_code == 1 and "did you swap BASE and ADAPTER?" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    extract = CliRunner().invoke(main, ["extract", str(base), str(lora), "--rank", "4", "-o", str(tmp_path / "e")])
    assert extract.exit_code == 1 and "surgeon merge BASE" in extract.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()


def test_a_file_name_where_a_folder_is_written_is_refused(fixtures_dir, tmp_path):
    merged = CliRunner().invoke(
        main,
        [
            "merge",
            str(fixtures_dir / "tiny-llama"),
            str(fixtures_dir / "tiny-llama-lora"),
            "-o",
            str(tmp_path / "merged.safetensors"),
        ],
    )
    assert merged.exit_code == 2 and "writes a directory" in merged.output
    converted = CliRunner().invoke(
        main,
        ["convert", str(fixtures_dir / "tiny-llama-lora"), "--to", "mlx", "-o", str(tmp_path / "adapter.safetensors")],
    )
    assert converted.exit_code == 1 and "is a directory" in converted.output
    assert list(tmp_path.iterdir()) == []


def test_cli_choices_match_the_library():
    from surgeon.cli import compose, export
    from surgeon.onnx_export import EXPORTERS, TASKS
    from surgeon.ops.compose import METHODS, RESULT_KINDS

    assert (compose.METHODS, compose.RESULT_KINDS) == (METHODS, RESULT_KINDS)
    assert (sorted(export.TASKS), export.EXPORTERS) == (sorted(TASKS), EXPORTERS)


def test_a_merge_that_touches_no_embedding_imports_no_transformers(fixtures_dir, tmp_path):
    """Importing transformers costs seconds; a merge whose keys match the base's and touch no
    embedding has nothing to ask it."""
    code = (
        "import sys; from surgeon.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as done:\n    assert done.code in (0, None), done.code\n"
        "print('transformers' in sys.modules)"
    )
    args = [str(fixtures_dir / "tiny-llama"), str(fixtures_dir / "tiny-llama-lora"), "-o", str(tmp_path / "m")]
    done = subprocess.run([sys.executable, "-c", code, "merge", *args], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"
