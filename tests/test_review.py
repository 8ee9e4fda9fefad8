"""Bugs found by a user's-eye review of issues 11, 12 and 15: each test fails on the code before its fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from surgeon.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.mark.parametrize("name", ["notes.txt", "train"])
def test_force_does_not_replace_a_file_surgeon_did_not_write(fixtures_dir, tmp_path, name):
    mine = tmp_path / name
    mine.write_text("my notes\n")
    result = run("convert", fixtures_dir / "tiny-llama-lora", "--to", "ort", "-o", mine, "--force")
    assert_one_line_error(result, name, "--force replaces only")
    assert mine.read_text() == "my notes\n"


def test_force_replaces_its_own_single_file_output_even_without_a_suffix(fixtures_dir, tmp_path):
    out = tmp_path / "adapter"
    command = ["convert", fixtures_dir / "tiny-llama-lora", "--to", "ort", "-o", out]
    assert run(*command).exit_code == 0
    assert run(*command, "--force").exit_code == 0, run(*command, "--force").output
