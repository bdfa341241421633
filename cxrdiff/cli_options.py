"""The command line's shared declarations: the step commands' configs (whose defaults `--help` shows, read from
their source), `opt` (a step command's option), the choice enums, and the options that several commands declare
alike. No heavy imports: `--help` and completion stay instant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup, TyperOption

from cxrdiff import choices
from cxrdiff.config import config_defaults

STEP_CONFIGS = {  # command → the file and class of its config, whose field defaults `--help` shows
    "phantom": ("phantom/config.py", "PhantomConfig"),
    "prepare": ("prepare/config.py", "PrepareConfig"),
    "finetune": ("finetune/config.py", "FinetuneConfig"),
    "sample": ("sample.py", "SampleConfig"),
    "ground": ("ground/config.py", "GroundConfig"),
    "report": ("report/config.py", "ReportConfig"),
    "pretrain-text": ("model/pretrain_text.py", "PretrainTextConfig"),
    "pretrain-bert": ("model/pretrain_bert.py", "PretrainBertConfig"),
}


def show_config_defaults(command: Any, defaults: dict[str, Any]) -> None:
    """Let `--help` show each option's default from its config. The options themselves default to None so that
    a `--config` TOML value is not overridden by a flag that was never given; the config holds the real
    defaults (the paper's where they are the paper's), and this shows them. On/off flags are left as they are."""
    for param in command.params:
        if isinstance(param, TyperOption) and not param.is_flag and param.default is None and param.name in defaults:
            value = defaults[param.name]
            param.show_default = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


class StepGroup(TyperGroup):
    """Typer's group, with each step command's config defaults shown in its `--help`."""

    def get_command(self, ctx: Any, name: str) -> Any:
        command = super().get_command(ctx, name)
        if command is not None and name in STEP_CONFIGS:
            show_config_defaults(
                command, config_defaults(Path(__file__).parent / STEP_CONFIGS[name][0], STEP_CONFIGS[name][1])
            )
        return command


def opt(help: str, *names: str) -> Any:
    """A step command's option: help first, then its flag names where they are not the parameter's."""
    return typer.Option(None, *names, help=help)


Choice = choices.enums()  # Choice.Scheduler: the StrEnum of choices.Scheduler

# Options that several commands share (adding one that a single command takes: a line in cli.py).
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML file of options (flags given win over it).")]
Compile = Annotated[
    bool | None, typer.Option("--compile", help="torch.compile the UNet (GPUs; first compile: minutes).")
]
Tf32 = Annotated[bool | None, typer.Option("--tf32", help="TF32 matmuls and convolutions (NVIDIA GPUs).")]
ChannelsLast = Annotated[bool | None, typer.Option("--channels-last", help="NHWC memory format for the UNet.")]
CheckpointEvery = Annotated[int | None, typer.Option(help="Save a resumable checkpoint every N steps.")]
MinWordCount = Annotated[int | None, typer.Option(help="Table 6: words in more than N phrases of a class (paper: 25).")]
ReportTextFallback = Annotated[
    Choice.TextFallback | None, typer.Option(help="Text for reports without IMPRESSION (none: left out, as prepare).")
]
PretrainMsCxr = Annotated[Path | None, typer.Option(help="MS-CXR box CSV: its images are left out (default: in DATA).")]
PretrainSteps = Annotated[int | None, typer.Option(help="Optimiser steps.")]
PretrainLr = Annotated[float | None, typer.Option(help="AdamW learning rate.")]
PretrainWeightDecay = Annotated[float | None, typer.Option(help="AdamW weight decay.")]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        help="This job's share: I/N (0-based), or 'slurm' for an array task (SLURM_ARRAY_TASK_ID − "
        "SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT). Shards share --out; see docs/slurm.md."
    ),
]
DistTimeoutOpt = Annotated[
    int | None, typer.Option(help="Seconds a process waits for the others in a collective before failing.")
]
FinalizeOpt = Annotated[
    bool | None,
    typer.Option("--finalize", help="Only write the table and manifest of a sharded --out (every shard done)."),
]
