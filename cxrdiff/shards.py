"""`--shard I/N` and `--shard slurm`: one step split across independent jobs (a SLURM array) that share one
`--out` folder, beside accelerate's processes inside each job.

Task i of N, running as rank p of P processes, takes share i·P + p of N·P: images (or units) whose index
is that share modulo N·P. Which image goes where never changes an image (every one has its own seed), so
any split gives the same files as one process at the same threads. The folder machinery
(`artifacts.StepFolder.claim(part=...)`) lets the shards work side by side: one settings key, one lock per
shard, and the table and manifest written once, by whoever completes the last part or by `--finalize`.
`claim_share` and `finish_share` are that start and end, the same for every sharded step (prepare, sample,
ground).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from cxrdiff.artifacts import StepFolder
from cxrdiff.console import log
from cxrdiff.errors import InputError, RunError

T = TypeVar("T")

SLURM_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")


class Shard(NamedTuple):
    """Shard `index` of `count` (0-based)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(spec: str | None, environ: Mapping[str, str] | None = None) -> Shard | None:
    """`I/N` (0 <= I < N), or `slurm`: this array task's place in its array, from SLURM's variables, which
    must all be set (they are never read unless asked for). None or "" means no sharding."""
    if not spec:
        return None
    if spec == "slurm":
        return slurm_shard(os.environ if environ is None else environ)
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not match:
        raise InputError(f"--shard {spec!r}: expected I/N (e.g. 0/4) or 'slurm'")
    index, count = int(match[1]), int(match[2])
    if not 0 <= index < count:
        raise InputError(f"--shard {spec}: expected 0 <= I < N")
    return Shard(index, count)


def slurm_shard(environ: Mapping[str, str]) -> Shard:
    """SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT (an array like 0-7 or 1-8; a
    stepped or sparse array such as 0-15:2 is refused, since its IDs do not number 0..N-1)."""
    missing = [name for name in SLURM_VARIABLES if not environ.get(name)]
    if missing:
        raise InputError(f"--shard slurm: {', '.join(missing)} not set (run it in an `sbatch --array` job)")
    try:
        task, first, count = (int(environ[name]) for name in SLURM_VARIABLES)
    except ValueError:
        shown = ", ".join(f"{name}={environ[name]!r}" for name in SLURM_VARIABLES)
        raise InputError(f"--shard slurm: not integers ({shown})") from None
    index = task - first
    if not 0 <= index < count:
        raise InputError(
            f"--shard slurm: task {task} − first {first} is not below the task count {count} "
            "(a stepped or sparse --array? use --array=0-{N-1})"
        )
    return Shard(index, count)


def share(shard: Shard | None, rank: int, world: int) -> Shard:
    """The share of rank `rank` of `world` processes inside `shard`: i·P + p of N·P."""
    if shard is None:
        return Shard(rank, world)
    return Shard(shard.index * world + rank, shard.count * world)


def label(shard: Shard | None, rank: int, world: int) -> str:
    """What names this process in progress lines: `shard 1/4 rank 0/2`, or "" for one plain process."""
    parts = ([f"shard {shard}"] if shard is not None else []) + ([f"rank {rank}/{world}"] if world > 1 else [])
    return " ".join(parts)


def claim_share(
    out: Path, step: str, settings: Mapping[str, Any], spec: str | None, main: bool, finalize: bool
) -> tuple[StepFolder, Shard | None]:
    """The main process claims `out` (its shard of it, with `--shard` `spec`); the other processes, and
    `--finalize`, only check what it holds. `--finalize` where no run with these settings exists is refused."""
    part = parse_shard(spec)
    create = main and not finalize
    folder = StepFolder.claim(out, step, settings, create=create, part=tuple(part) if part and create else None)
    if finalize and folder.state == "new":
        raise InputError(f"--out {out}: no {step} run with these settings to finalize")
    return folder, part


def finish_share(
    folder: StepFolder,
    finalize: bool,
    missing: int,
    *,
    noun: str,
    later: str,
    write: Callable[[], T],
    done: Callable[[], T | None] = lambda: None,
    of: int | None = None,
) -> T | None:
    """The end of a shard's run, in the main process. With `missing` parts (of `of`, if given) not made yet,
    `--finalize` is refused and otherwise this shard's part is released and None returned: the job that
    completes the last part (`later` says what it then writes), or `--finalize`, finishes the folder. With
    none missing, `write()` runs in the one process that takes the folder's finalizing lock first and its
    value is returned; a process that finds the folder finished by another returns `done()`."""
    if missing:
        if finalize:
            counted = f"{missing} of {of}" if of is not None else str(missing)
            raise RunError(f"--out {folder.out}: {counted} {noun} missing; run the missing shards first")
        folder.release_part()
        log.info("%s: %d %s still missing (other shards); %s", folder.step, missing, noun, later)
        return None
    with folder.finalizing() as writer:
        if writer:
            return write()
    return done()
