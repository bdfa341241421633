"""Stopping a step at a clean point on SLURM's signals, so that a requeued job resumes instead of redoing.

SLURM sends SIGTERM on preemption or `scancel`, and SIGUSR1 before the time limit when a job asks for it
(`#SBATCH --signal=USR1@90`). Under `stop_signals()` either only sets a flag; the step calls `check()` where
everything written so far is complete (between batches), which raises `Stopped` (exit 75, EX_TEMPFAIL: the
scripts requeue on it). A step whose clean points are far apart (`prepare`: a unit of thousands of images
is written whole or not at all) stops at once instead (`immediate=True`): it would lose the same work if it
waited, and SLURM kills a job 30 s after SIGTERM. Every write is atomic, so nothing half-written stays.
Ctrl-C keeps its own meaning (KeyboardInterrupt, exit 130).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

from cxrdiff.console import log
from cxrdiff.errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_FILE = "CXRDIFF_EXIT_FILE"  # environment variable: a file each process appends its exit code to


def record_exit_code(code: int) -> None:
    """Append this process's exit code to $CXRDIFF_EXIT_FILE, if set: `torchrun` and `accelerate launch` exit 1
    whenever a worker fails, so a batch script learns from this file that every rank stopped with 75 and the
    job can be requeued (`scripts/run-step.sh`, `scripts/finetune.sbatch`). One short O_APPEND write: lines of
    several processes do not mix."""
    path = os.environ.get(EXIT_FILE)
    if path:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{code}\n".encode())
            finally:
                os.close(fd)


class StopFlag:
    """The signal that asked this process to stop (None while none has)."""

    def __init__(self, step: str, immediate: bool = False) -> None:
        self.step, self.immediate = step, immediate
        self.raised: int | None = None

    def handle(self, signum: int, frame: Any) -> None:
        first = self.raised is None
        self.raised = self.raised or signum
        if first and self.immediate:
            self.check()
        if first:
            log.warning("%s: %s received; stopping at the next clean point", self.step, signal.Signals(signum).name)

    def check(self, done: str = "") -> None:
        """Raise `Stopped` if a stop signal arrived; `done` says what is complete (for the message)."""
        if self.raised is not None:
            name = signal.Signals(self.raised).name
            what = f" after {done}" if done else ""
            raise Stopped(f"{self.step}: stopped by {name}{what}; re-run the same command to resume")


@contextlib.contextmanager
def stop_signals(step: str, immediate: bool = False) -> Iterator[StopFlag]:
    """SIGTERM and SIGUSR1 set the flag for the block's duration (the old handlers come back after it), or
    with `immediate` raise `Stopped` where the process is. Outside the main thread signals cannot be caught:
    the flag then never rises."""
    flag = StopFlag(step, immediate)
    old: dict[int, Any] = {}
    for sig in SIGNALS:
        with contextlib.suppress(ValueError):
            old[sig] = signal.signal(sig, flag.handle)
    try:
        yield flag
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
