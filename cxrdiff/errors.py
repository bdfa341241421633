"""One exception family, mapped to exit codes by the CLI (0 ok, 1 run failed, 2 bad usage or input, 75 try again:
stopped by a signal and resumable, or the folder is busy with another process)."""

from __future__ import annotations

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
