"""The `cxrdiff finetune` step: train SD's UNet (and, for Finetune_L, its text encoder) on prepared latents.

One readable loop under accelerate, so the same code runs on one CPU, one GPU or many nodes:
check inputs and claim --out → plan the global batch → load the base model → build optimizer and EMA →
resume from the newest complete checkpoint → train (noise, timestep, epsilon or v target, MSE) →
export a diffusers pipeline folder, manifest last.

Exact resume is the design constraint: every random draw comes from generators whose states are saved
per rank, and the data order is a seeded, epoch-based permutation over all rows, so the data position
is just "samples consumed" and a resumed run continues at the exact step, not the start of an epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrdiff.artifacts import (
    StepFolder,
)
from cxrdiff.config import to_dict
from cxrdiff.console import log
from cxrdiff.errors import InputError
from cxrdiff.finetune.checkpoints import Checkpoints
from cxrdiff.finetune.config import STEP, FinetuneConfig
from cxrdiff.finetune.export import export_run, run_result
from cxrdiff.finetune.inputs import batch_plan, check_inputs
from cxrdiff.finetune.loop import resume, train
from cxrdiff.finetune.tracking import chosen_tracker
from cxrdiff.finetune.training import load_run
from cxrdiff.finetune.validation import validate
from cxrdiff.speed import limit_cpu_threads


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Train, checkpoint, resume and export; returns where the model is and what the run did."""
    inputs = check_inputs(config)
    config, folder = inputs.config, inputs.folder
    if folder.finished and folder.manifest.get("steps") == config.steps:
        log.info(f"{folder.out}: already trained to step {config.steps}; nothing to do")
        return run_result(folder.out, folder.manifest)
    accelerator, trackers = start_accelerator(config)
    limit_cpu_threads(accelerator.device)
    per_device, accum = plan_batch(accelerator, config)
    checkpoints = Checkpoints(folder.out, config.keep_checkpoints)
    own_folder(accelerator, folder, checkpoints, config)
    run = load_run(config, inputs.model_dir, accelerator, per_device, accum)
    start = resume(run, checkpoints)
    if accelerator.is_main_process and trackers:
        accelerator.init_trackers(STEP, config={k: v for k, v in flat_config(config).items() if v is not None})
    last_loss = train(run, checkpoints, start)
    if config.validation_prompts and not (config.validate_every and config.steps % config.validate_every == 0):
        validate(run, config.steps)
    result = export_run(run, folder, last_loss)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also ends the process group: last
    return result


def start_accelerator(config: FinetuneConfig) -> tuple[Any, str | None]:
    """The accelerate state of this process and the tracker it logs to (`--report-to`), if any."""
    from accelerate import Accelerator

    tracker = chosen_tracker(config.report_to, Path(config.out))
    try:
        accelerator = Accelerator(
            mixed_precision=config.mixed_precision, log_with=tracker, project_dir=Path(config.out) / "logs"
        )
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"--mixed-precision {config.mixed_precision}: {str(exc).splitlines()[0]}") from None
    return accelerator, tracker


def flat_config(config: FinetuneConfig) -> dict[str, Any]:
    return {k: (", ".join(v) if isinstance(v, list) else v) for k, v in to_dict(config).items()}


def plan_batch(accelerator: Any, config: FinetuneConfig) -> tuple[int, int]:
    """Per-device batch and accumulation steps for this many processes (see `batch_plan`)."""
    world = accelerator.num_processes
    per_device, accum = batch_plan(config.batch_size, config.per_device_batch_size, world)
    if accelerator.is_main_process:
        log.info(
            f"global batch {config.batch_size} = {per_device} per device × {world} processes × {accum} "
            f"accumulation steps; {config.steps} steps; text encoder "
            + ("frozen" if config.frozen_text else f"learnable (lr {config.text_lr})")
        )
    return per_device, accum


def own_folder(accelerator: Any, folder: StepFolder, checkpoints: Checkpoints, config: FinetuneConfig) -> None:
    """Write the claim (main process) once the run is accepted for this process count; a finished run
    given more steps becomes unfinished again (claim first, then no manifest) and resumes."""
    world_change = config.batch_size if config.allow_world_change else None
    world = accelerator.num_processes
    saved_by = checkpoints.check(config.steps, processes=world, world_change=world_change)
    if saved_by is not None and accelerator.is_main_process:
        seeded = ", ".join(str(r) for r in range(saved_by, world)) or "none"
        log.warning(f"resuming a checkpoint of {saved_by} processes with {world} (--allow-world-change): the data "
                    f"continues at the next sample; ranks without saved generators ({seeded}) draw noise and "
                    "timesteps from ones seeded by (seed, step, rank)")  # fmt: skip
    if accelerator.is_main_process:
        if folder.finished:
            folder.reopen()
        else:
            StepFolder.claim(folder.out, folder.step, folder.settings)
    accelerator.wait_for_everyone()
