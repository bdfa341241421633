"""Run the real entry point, `cxrdiff.cli.main`, in this process: its exit code and its stderr lines.

Not typer's CliRunner, which calls the app below `main` and so skips the mapping of errors to one line and an
exit code that users see."""

from __future__ import annotations

import sys

import pytest


def run_main(
    argv: list[object], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, list[str], str]:
    """`cxrdiff ARGV` → (exit code, stderr's lines, stdout)."""
    from cxrdiff.cli import main

    monkeypatch.setattr(sys, "argv", ["cxrdiff", *map(str, argv)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    code = exit_info.value.code
    captured = capsys.readouterr()
    return (0 if code is None else int(code)), captured.err.strip().splitlines(), captured.out
