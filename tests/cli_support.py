"""Running the ``nca-tiles`` CLI in-process (click's CliRunner) and checking its error contract:
one line on stderr that starts with ``Error:``, a non-zero exit, no traceback."""

from __future__ import annotations

from click.testing import CliRunner, Result

from nca_tiles_cli.main import cli


def run_cli(*args) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """The command failed the way a user error should; returns the message."""
    assert result.exit_code != 0, result.output
    # A user error exits through click (SystemExit), never an uncaught exception.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
