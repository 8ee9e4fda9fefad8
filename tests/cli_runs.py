"""The surgeon command as the tests run it: click's runner in this process, every argument a string."""

from __future__ import annotations

from click.testing import CliRunner

from surgeon.cli import main


def invoke(*args) -> str:
    """The output of a run that must succeed."""
    result = CliRunner().invoke(main, [*map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args) -> str:
    """The one ``Error:`` line a run must be refused with."""
    result = CliRunner().invoke(main, [*map(str, args)])
    assert result.exit_code == 1 and result.output.startswith("Error: "), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output
