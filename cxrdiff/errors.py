"""One exception family, mapped to exit codes by the CLI (0 ok, 1 run failed, 2 bad usage or input)."""

from __future__ import annotations


class CxrdiffError(Exception):
    """An expected failure: the CLI prints its one-line message, without a traceback."""

    exit_code = 1


class InputError(CxrdiffError):
    """Bad usage or input: a missing file, a wrong folder kind, a malformed CSV (exit code 2)."""

    exit_code = 2


class RunError(CxrdiffError):
    """The run itself failed: NaN loss, a crashed worker (exit code 1)."""

    exit_code = 1
