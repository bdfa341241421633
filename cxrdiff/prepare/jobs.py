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
from cxrdiff.errors import InputError, RunError
from cxrdiff.prepare.config import STEP, PrepareConfig
from cxrdiff.shards import Shard, parse_shard
from cxrdiff.stopping import stop_signals


def claim(config: PrepareConfig, out: Path, settings: dict[str, Any], acc: Any) -> tuple[StepFolder, Shard | None]:
    """The main process claims `out` (its shard of it, with `--shard`); the others check what it holds."""
    part = parse_shard(config.shard)
    create = acc.is_main_process and not config.finalize
    folder = StepFolder.claim(out, STEP, settings, create=create, part=tuple(part) if part and create else None)
    if config.finalize and not folder.finished and folder.state == "new":
        raise InputError(f"--out {out}: no prepare run with these settings to finalize")
    return folder, part


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
    missing = [unit for unit in units if not (out / f"{unit}.parquet").is_file()]
    if missing:
        if finalize:
            raise RunError(f"--out {out}: {len(missing)} of {len(units)} units missing; run the missing shards first")
        folder.release_part()
        log.info("prepare: %d units still missing (other shards); the manifest is written when all exist", len(missing))
        return {"out": str(out), "complete": False, "missing_units": len(missing)}
    with folder.finalizing() as writer:
        if writer:
            return finish()
    return {"out": str(out), "complete": True}
