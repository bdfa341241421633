"""`report --emit-jobs FILE`: the exact `sample` and `ground` commands of every sub-folder the report needs, one a
line, for a SLURM array (one task a line, or `--shard slurm` appended to each). A later `report` with the same
options finds those folders finished with its own settings and measures at once.

The commands come from the report's own sub-step code (`sample_folders`, `ground_folders`) run with steps that
write each config down instead of running it, so they cannot drift from what the report would run.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import Any

from cxrdiff.artifacts import write_text
from cxrdiff.errors import InputError
from cxrdiff.report.config import ReportConfig, Steps
from cxrdiff.report.orchestrate import real_folder
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


def emit_jobs(config: ReportConfig, file: Path) -> dict[str, Any]:
    """Write the commands of every run's samples, diversity set, MS-CXR-phrase samples and groundings to `file`
    (the curves over checkpoints, `--checkpoints`, are not included: they run inside the report)."""
    if not config.runs or config.out is None:
        raise InputError("report --emit-jobs: give the RUN folders and --out, as for the report itself")
    real = real_folder(config)
    lines: list[str] = []
    steps = recording_steps(lines)
    for name, run in zip(run_names(config), config.runs, strict=True):
        run, folder, done = Path(run), Path(config.out) / "runs" / name, []
        sampled = not grounding_only(config, run_summary(run))
        if sampled:
            sample_folders(config, run, folder, real, steps, done)
        ground_folders(config, run, folder, real, steps, done)
        if sampled and not config.table4_p19_only:
            sample_folders(config, run, folder, real, steps, done, prompts="ms-cxr")
    write_text(file, "".join(line + "\n" for line in lines))
    return {"jobs": len(lines), "file": os.fspath(file)}
