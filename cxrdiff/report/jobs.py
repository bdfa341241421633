"""The report's sub-steps outside its main process: as commands, or as the other ranks of a launcher.

`report --emit-jobs FILE` writes the exact `sample` and `ground` commands of every sub-folder the report needs,
one a line, for a SLURM array (one task a line, or `--shard slurm` appended to each). A later `report` with
the same options finds those folders finished with its own settings and measures at once. The commands come
from the report's own sub-step code (`sample_folders`, `ground_folders`) run with steps that write each config
down instead of running it, so they cannot drift from what the report would run.

Under `accelerate launch` (or torchrun) the main process claims `--out`, runs the report and measures; every
other rank runs the same sub-steps in the same order (`run_sub_steps`), so each `sample` and `ground` is
shared by all ranks as when launched alone. Measuring stays in the main process (the features are gathered
there and each Fréchet distance computed once); the others wait in the next sub-step (`--dist-timeout`).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from pathlib import Path
from typing import Any

from cxrdiff.artifacts import OtherSettings, manifest_hash, write_text
from cxrdiff.distributed import DEFAULT_TIMEOUT_S
from cxrdiff.errors import InputError, RunError
from cxrdiff.report.config import ReportConfig, Steps
from cxrdiff.report.steps import Deferred, ground_folders, grounding_only, run_names, sample_folders
from cxrdiff.report.trainings import run_summary


def command(step: str, config: Any) -> str:
    """`cxrdiff STEP --flag value ...` for the fields of `config` that differ from the defaults."""
    defaults = type(config)()
    args = ["cxrdiff", step]
    for field in dataclasses.fields(config):
        value, default = getattr(config, field.name), getattr(defaults, field.name)
        if value == default or value is None:
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            if not value:
                raise InputError(f"report --emit-jobs: {step} {flag} off has no command-line form")
            args.append(flag)
        elif isinstance(value, tuple):
            for item in value:
                args += [flag, os.fspath(item) if isinstance(item, Path) else str(item)]
        else:
            args += [flag, os.fspath(value) if isinstance(value, Path) else str(value)]
    return shlex.join(args)


def recording_steps(lines: list[str]) -> Steps:
    """Stand-in steps that add their command to `lines` and run nothing."""
    from cxrdiff.ground import GroundConfig
    from cxrdiff.sample import SampleConfig

    def recorder(step: str):
        def record(config: Any) -> None:
            lines.append(command(step, config))
            raise Deferred(config.out)

        return record

    return {"sample": (recorder("sample"), SampleConfig), "ground": (recorder("ground"), GroundConfig)}


def run_sub_steps(config: ReportConfig, real: Path, steps: Steps) -> None:
    """Every run's samples, diversity set, groundings and MS-CXR-phrase samples, in the order the report's main
    process runs them (`orchestrate._report_run`); the curves over checkpoints are not included."""
    for name, run in zip(run_names(config), config.runs, strict=True):
        run, folder, done = Path(run), Path(config.out) / "runs" / name, []
        sampled = not grounding_only(config, run_summary(run))
        if sampled:
            sample_folders(config, run, folder, real, steps, done)
        ground_folders(config, run, folder, real, steps, done)
        if sampled and not config.table4_p19_only:
            sample_folders(config, run, folder, real, steps, done, prompts="ms-cxr")


def emit_jobs(config: ReportConfig, file: Path, real: Path) -> dict[str, Any]:
    """Write the commands of `run_sub_steps` to `file` (`--checkpoints`' curves run inside the report)."""
    if not config.runs or config.out is None:
        raise InputError("report --emit-jobs: give the RUN folders and --out, as for the report itself")
    lines: list[str] = []
    run_sub_steps(config, real, recording_steps(lines))
    write_text(file, "".join(line + "\n" for line in lines))
    return {"jobs": len(lines), "file": os.fspath(file)}


def follower_steps(steps: Steps, timeout_s: float = DEFAULT_TIMEOUT_S) -> Steps:
    """The steps as another rank than the main one runs them: its share, then a wait until the main process
    has written the sub-folder's manifest (the step returns before it: only the main writes tables). A folder
    made with other settings is removed by the main process, which runs the step again; so does this rank."""

    def follow(fn):
        def run(config: Any) -> None:
            out = Path(config.out)
            old = manifest_hash(out)
            try:
                fn(config)
            except OtherSettings:
                _wait_for(lambda: manifest_hash(out) != old, out, timeout_s)
                fn(config)
            _wait_for(lambda: manifest_hash(out) is not None, out, timeout_s)

        return run

    return {name: (follow(fn), cls) for name, (fn, cls) in steps.items()}


def _wait_for(ready: Any, out: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise RunError(f"{out}: the main process did not finish it within {timeout_s:g} s")
        time.sleep(0.2)


def check_ranks(config: ReportConfig, processes: int) -> None:
    """Under a launcher the ranks follow the main process's sub-steps one by one: not side by side
    (`--workers`), and not the checkpoints' curves, which the other ranks do not know."""
    if processes > 1 and (config.workers > 1 or config.checkpoints):
        raise InputError(
            f"report under a launcher ({processes} processes): use --workers 1 and no --checkpoints "
            "(or run the sub-steps as an array: --emit-jobs)"
        )
