"""One exception family, and the exit codes the CLI maps every failure to (0 ok, 1 run failed, 2 bad usage or
input, 75 try again: stopped by a signal and resumable, or the folder is busy with another process; 130 Ctrl-C)."""

from __future__ import annotations

import errno
from pathlib import Path


class CxrdiffError(Exception):
    """An expected failure: the CLI prints its one-line message, without a traceback."""

    exit_code = 1


class InputError(CxrdiffError):
    """Bad usage or input: a missing file, a wrong folder kind, a malformed CSV (exit code 2)."""

    exit_code = 2


TEMPFAIL = 75  # sysexits.h EX_TEMPFAIL: what a scheduler requeues on (`scripts/*.sbatch`)


class RunError(CxrdiffError):
    """The run itself failed: NaN loss, a crashed worker (exit code 1)."""

    exit_code = 1


class Stopped(CxrdiffError):
    """Stopped at a clean point by SIGTERM / SIGUSR1 (SLURM preemption or time limit): re-running the same
    command resumes, so the exit code (75) tells a scheduler to requeue."""

    exit_code = TEMPFAIL


def unsafe_pickle(folder: Path) -> InputError:
    """Pickled weights that torch will not load with weights_only (loading them could run code): which file, and
    what to do, in one line instead of torch's page of advice."""
    names = ", ".join(p.name for p in sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))) or "the weights"
    return InputError(
        f"{folder}: {names}: a pickle that is not loaded (it holds more than tensors, and loading it could run "
        "code); save the weights as safetensors"
    )


# --- the exit codes: what `cxrdiff.cli.main` does with a failure that reaches it ---------------------------

INTERRUPTED = "interrupted (Ctrl-C); re-run the same command to resume where the step left off"
PATH_ERRNOS = {
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
    errno.ENOENT, errno.ENAMETOOLONG, errno.ELOOP,
}  # fmt: skip


def failure(exc: BaseException) -> tuple[str | None, int, bool]:
    """What the entry point does with `exc`: the line to print (None: none), the exit code, and whether -v shows
    the traceback. A CxrdiffError its own code (1, 2 or 75); a path the step cannot read or write 2 (`PATH:
    reason`: no permission, a read-only or full disk, a file where a folder belongs); a bad option or value 2
    (`MESSAGE (see cxrdiff CMD --help)`); Ctrl-C 130; anything else 1 (with -v, raised again as it is)."""
    from cxrdiff.console import verbosity

    if isinstance(exc, CxrdiffError):
        return str(exc), exc.exit_code, True
    if isinstance(exc, OSError):
        return (path_error(exc), 2, True) if exc.errno in PATH_ERRNOS else (unexpected(exc), 1, True)
    if isinstance(exc, KeyboardInterrupt) or is_a(exc, "Abort"):  # Ctrl-C (older Typer: an Abort from it), or EOF
        interrupted = isinstance(exc, KeyboardInterrupt) or isinstance(exc.__context__, KeyboardInterrupt)
        return (INTERRUPTED, 130, True) if interrupted else ("aborted", 1, True)
    if is_a(exc, "ClickException"):  # one line that names the command's help (Click prints a box of 4–6 lines)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `cxrdiff` or `cxrdiff model` alone: the help, shown
            return None, 2, False
        ctx = getattr(exc, "ctx", None)
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        return exc.format_message() + where, exc.exit_code, False  # type: ignore[attr-defined]
    if verbosity() > 0:
        raise exc
    return unexpected(exc), 1, True


def is_a(exc: BaseException, class_name: str) -> bool:
    """Whether `exc` is one of Click's exceptions (Typer raises its own copies of Click's), told by class name
    so that neither's private modules are imported."""
    return any(kind.__name__ == class_name for kind in type(exc).__mro__)


def path_error(exc: OSError) -> str:
    """`PATH: reason` of an operating-system error on a path (the reason in words, e.g. "Read-only file system")."""
    where = " → ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    reason = exc.strerror or first_line(exc)
    return f"{where}: {reason}" if where else reason


def unexpected(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)} (run with -v for the traceback)"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
