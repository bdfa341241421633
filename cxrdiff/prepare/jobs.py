"""How one `prepare` run is split across array jobs (`--shard`, `cxrdiff.shards`) and stopped by SLURM's signals.

Shard i of n encodes the units i, i + n, ... of the plan (test, ms_cxr, train-00000, ...); inside a job,
accelerate's processes share each unit's rows as before. A unit's Parquet file does not depend on which job
wrote it, so any split makes the same files as one job. The plan is built once (under the folder's
`exclusive()` lock); whoever completes the last unit writes `skipped.csv` and the manifest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxrdiff.artifacts import StepFolder
from cxrdiff.console import log
from cxrdiff.prepare.config import STEP, PrepareConfig
from cxrdiff.shards import Shard, claim_share, finish_share
from cxrdiff.stopping import stop_signals


def claim(config: PrepareConfig, out: Path, settings: dict[str, Any], acc: Any) -> tuple[StepFolder, Shard | None]:
    """The main process claims `out` (its shard of it, with `--shard`); the others check what it holds."""
    return claim_share(out, STEP, settings, config.shard, acc.is_main_process, config.finalize)


def plan_once(folder: StepFolder, acc: Any, make_plan: Callable[[], Any]) -> None:
    """Build and save the plan in the main process, one shard at a time (the first builds it, the others
    find it saved; without shards no lock file is made); every process then reads it from disk."""
    if acc.is_main_process:
        with folder.exclusive() if folder.part is not None else contextlib.nullcontext():
            make_plan()
    acc.wait_for_everyone()


def units_to_do(units: list[str], out: Path, part: Shard | None, finalize: bool) -> list[str]:
    """This shard's units (all without `--shard`; none with `--finalize`) that are not written yet."""
    mine = [] if finalize else units[part.index :: part.count] if part else units
    return [unit for unit in mine if not (out / f"{unit}.parquet").is_file()]


def encode_units(acc: Any, todo: list[str], encode: Callable[[str], None], who: str) -> None:
    """`encode(unit)` for each unit to do; SIGTERM / SIGUSR1 stop at once with exit 75 (a unit is written
    whole or not at all, so waiting for its end would save nothing), and the same command resumes."""
    with stop_signals("prepare", immediate=True):
        for number, unit in enumerate(todo, 1):
            if acc.is_main_process:
                log.info("prepare%s: unit %s (%d of %d to do)", f" [{who}]" if who else "", unit, number, len(todo))
            encode(unit)


def complete(folder: StepFolder, units: list[str], out: Path, finalize: bool, finish: Callable[[], dict]) -> dict:
    """In the main process once this job's units are done: `finish()` (skipped.csv and the manifest) when
    every unit exists, by one process only; otherwise this shard's part is released and a partial result
    returned (the job that completes the last unit, or `--finalize`, finishes the folder)."""
    missing = sum(not (out / f"{unit}.parquet").is_file() for unit in units)
    later = "the manifest is written when all exist"
    done = lambda: {"out": str(out), "complete": True}  # noqa: E731
    result = finish_share(folder, finalize, missing, of=len(units), noun="units", later=later, write=finish, done=done)
    return result if result is not None else {"out": str(out), "complete": False, "missing_units": missing}
