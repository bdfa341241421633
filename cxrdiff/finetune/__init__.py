"""`cxrdiff finetune`: train SD's UNet (and, for Finetune_L, its text encoder) on prepared latents.

Reads top-down: `entry` (the step: check, claim, load, resume, train, export) over `inputs` (every check
before weights are read), `training` (what one process trains with), `loop` (the steps), `checkpoints`
(resumable states, and a kept one exported as a model), `export` (the pipeline folder and manifest) and
`validation`; `data` feeds the loop, `config` holds what the step is asked for, `lora` what trains (full or
LoRA adapters: `TrainingMode`) and the adapters themselves.
"""

from cxrdiff.finetune.checkpoints import CHECKPOINT_STEP, Checkpoints, checkpoint_identity, export_checkpoint
from cxrdiff.finetune.config import CHECKPOINTS, DEFAULT_STEPS, STEP, TRAIN_LOG, FinetuneConfig
from cxrdiff.finetune.data import TrainData
from cxrdiff.finetune.entry import finetune, plan_batch, start_accelerator
from cxrdiff.finetune.inputs import Inputs, batch_plan, check_inputs, check_prepared, run_settings
from cxrdiff.finetune.loop import StopFlag, accumulate, optimizer_step
from cxrdiff.finetune.lora import TrainingMode
from cxrdiff.finetune.training import TrainingRun, load_run
from cxrdiff.training_text import NO_FINDING, TrainingText, check_prompt_source

__all__ = [
    "CHECKPOINTS",
    "CHECKPOINT_STEP",
    "DEFAULT_STEPS",
    "NO_FINDING",
    "STEP",
    "TRAIN_LOG",
    "Checkpoints",
    "FinetuneConfig",
    "Inputs",
    "StopFlag",
    "TrainData",
    "TrainingRun",
    "TrainingMode",
    "TrainingText",
    "accumulate",
    "batch_plan",
    "check_inputs",
    "check_prepared",
    "check_prompt_source",
    "checkpoint_identity",
    "export_checkpoint",
    "finetune",
    "load_run",
    "optimizer_step",
    "plan_batch",
    "run_settings",
    "start_accelerator",
]
