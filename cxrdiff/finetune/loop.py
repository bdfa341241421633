"""The training loop: resume at the newest checkpoint, then per step the micro-steps (prompts with the UCG rule,
latent draw, noise, timestep, loss, backward), the optimizer step, the log line, checkpoints and the signal
check that lets SLURM preemption (SIGTERM, SIGUSR1) or Ctrl-C (SIGINT) stop every rank at the same step with
that step saved."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from cxrdiff.artifacts import (
    atomic_path,
)
from cxrdiff.console import interactive, log, progress
from cxrdiff.errors import RunError, Stopped
from cxrdiff.finetune.checkpoints import Checkpoints, rng_state
from cxrdiff.finetune.config import STEP, TRAIN_LOG
from cxrdiff.finetune.training import TrainingRun
from cxrdiff.finetune.validation import validate
from cxrdiff.text_encoders import wants_mask


def resume(run: TrainingRun, checkpoints: Checkpoints) -> int:
    """Load the newest checkpoint, if any; returns the step training continues from."""
    train_log = run.out / TRAIN_LOG
    latest = checkpoints.latest()
    if latest is None:
        if run.main and train_log.exists():
            truncate_log(train_log, 0)
        return 0
    start, path = latest
    checkpoints.load(run, path)
    if run.main:
        log.info(f"resuming {run.out} at step {start} from {path.name}")
        truncate_log(train_log, start)
    return start


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step, so a resumed run's log reads like an uninterrupted one."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))


def train(run: TrainingRun, checkpoints: Checkpoints, start: int) -> float:
    """Train from step `start` to the end; returns the last step's loss."""
    steps: Iterable[int] = range(start, run.config.steps)
    if run.main:
        steps = progress(steps, total=run.config.steps - start, description=STEP)
    train_log = TrainLog(run)
    last_loss = float("nan")
    try:
        with StopFlag(announce=run.main) as stop:
            for step in steps:
                last_loss = train_step(run, checkpoints, train_log, stop, step)
    finally:
        train_log.close()
        run.data.close()
    return last_loss


def train_step(run: TrainingRun, checkpoints: Checkpoints, train_log: TrainLog, stop: StopFlag, step: int) -> float:
    """One optimizer step over all micro-steps, then its log line, checkpoint, validation and signal check."""
    config = run.config
    rng_before = rng_state(run.gen, run.np_gen)
    stats = accumulate(run, step, stop)
    if not math.isfinite(stats.loss):
        stop_on_nan(run, checkpoints, step, stats.loss, rng_before)
    grad_norm = optimizer_step(run)
    done = step + 1
    train_log.step(done, stats, grad_norm)
    if config.stop_after_step is not None and done == config.stop_after_step:
        os.kill(os.getpid(), signal.SIGUSR1)  # a drill: exactly what SLURM's preemption signal does
        time.sleep(0.01)  # let the handler run
        stats.stop_signals += int(stop.raised is not None)
    preempted = stats.stop_signals > 0
    if done % config.checkpoint_every == 0 or done == config.steps or preempted:
        checkpoints.save(run, done, rng_state(run.gen, run.np_gen))
    if config.validation_prompts and config.validate_every and done % config.validate_every == 0:
        validate(run, done)
    if preempted:
        by, error = ("Ctrl-C", Interrupted) if stop.raised == signal.SIGINT else ("a signal", Stopped)
        saved = checkpoints.path(done)
        raise error(f"stopped by {by} after step {done}, saved in {saved}; re-run the same command to resume")
    return stats.loss


@dataclasses.dataclass
class StepStats:
    """One optimizer step's statistics over all ranks: the mean loss, how many samples could get the empty
    prompt and how many got it (the UCG rule), and how many ranks saw a stop signal."""

    loss: float
    ucg_eligible: int
    ucg_dropped: int
    stop_signals: int


def accumulate(run: TrainingRun, step: int, stop: StopFlag) -> StepStats:
    """Forward and backward over this rank's micro-steps; the step's statistics reduced over the ranks."""
    import torch

    loss_sum = torch.zeros((), device=run.device)
    eligible = dropped = 0
    for micro in range(run.accum):
        loss, elig, drop = micro_step(run, step, micro)
        loss_sum += loss
        eligible, dropped = eligible + elig, dropped + drop
    mine = [loss_sum.item() / run.accum, eligible, dropped, float(stop.raised is not None)]
    summed = run.accelerator.reduce(torch.tensor(mine, device=run.device, dtype=torch.float64), reduction="sum")
    loss, eligible, dropped, signals = summed.tolist()
    return StepStats(loss=loss / run.world, ucg_eligible=int(eligible), ucg_dropped=int(dropped),
                     stop_signals=int(signals))  # fmt: skip


def micro_step(run: TrainingRun, step: int, micro: int) -> tuple[Any, int, int]:
    """One micro-batch: prompts (UCG rule), latent draw, noise, timestep, loss, backward (gradients
    synchronised on the last micro-step only). Returns the loss and the UCG eligible/dropped counts."""
    import torch

    config, device, accelerator, scheduler = run.config, run.device, run.accelerator, run.noise_scheduler
    rows, stored = run.data.micro_batch(step, micro, run.per_device, config.batch_size)
    texts, eligible, dropped = run.text.batch(rows, run.np_gen)
    tokenizer = run.comps.tokenizer
    tokens = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    stored = torch.from_numpy(stored).to(device, torch.float32)  # (batch, 1|2, C, H, W)
    latents = stored[:, 0]  # (batch, C, H, W)
    if config.latent_sampling == "sample":
        eps = torch.randn(latents.shape, generator=run.gen, device=device)  # (batch, C, H, W)
        latents = latents + torch.exp(0.5 * stored[:, 1]) * eps
    latents = latents * run.comps.scaling_factor
    noise = torch.randn(latents.shape, generator=run.gen, device=device)  # (batch, C, H, W)
    t = torch.randint(0, int(scheduler.config.num_train_timesteps), (len(rows),), generator=run.gen, device=device)
    noisy = scheduler.add_noise(latents, noise, t)
    prediction = scheduler.config.prediction_type
    target = noise if prediction == "epsilon" else scheduler.get_velocity(latents, noise, t)
    mask = tokens.attention_mask.to(device) if wants_mask(run.comps.text) else None  # BERTs: yes; SD's CLIP: no
    sync = contextlib.nullcontext() if micro == run.accum - 1 else accelerator.no_sync(run.model)
    with sync:
        with accelerator.autocast():
            pred = run.model(noisy, t, tokens.input_ids.to(device), mask)  # ids: (batch, tokens)
        loss = diffusion_loss(pred.float(), target.float(), t, scheduler, config.snr_gamma, prediction)
        accelerator.backward(loss / run.accum)
    return loss.detach(), int(eligible.sum()), int(dropped.sum())


def diffusion_loss(pred: Any, target: Any, t: Any, scheduler: Any, snr_gamma: float | None, prediction: str) -> Any:
    """MSE on the target; with `snr_gamma`, Min-SNR weighting (Hang et al. 2023) per sample."""
    import torch.nn.functional as F

    if snr_gamma is None:
        return F.mse_loss(pred, target)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, t)  # (batch,)
    weight = snr.clamp(max=snr_gamma) / (snr + 1 if prediction == "v_prediction" else snr)  # (batch,)
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=tuple(range(1, pred.ndim)))  # (batch,)
    return (per_sample * weight).mean()


def optimizer_step(run: TrainingRun) -> Any:
    """Clip, step, zero the gradients and update the EMA; returns the gradient norm (None unclipped)."""
    grad_norm = None
    if run.config.max_grad_norm > 0:
        grad_norm = run.accelerator.clip_grad_norm_(run.model.parameters(), run.config.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(run.ema_parameters())
    return grad_norm


def stop_on_nan(
    run: TrainingRun, checkpoints: Checkpoints, step: int, loss: float, rng_before: dict[str, Any]
) -> NoReturn:
    """Stop on a non-finite loss, keeping (or saving) the state before this step for inspection."""
    run.optimizer.zero_grad(set_to_none=True)
    path = checkpoints.path(step)
    if not path.is_dir():
        path = checkpoints.save(run, step, rng_before)
    raise RunError(f"loss is {loss} at step {step + 1}; the last good state (step {step}) is in {path}")


class Interrupted(RunError):
    """Stopped by Ctrl-C, the current step saved: exit code 130, the shell's code for SIGINT."""

    exit_code = 130


class StopFlag:
    """SIGTERM / SIGUSR1 (SLURM preemption) and a first Ctrl-C (SIGINT) only set a flag; ranks agree on it at a
    step boundary, so every rank saves the same step. A second Ctrl-C aborts at once (KeyboardInterrupt): the
    current step is lost and a re-run resumes from the last checkpoint saved."""

    def __init__(self, announce: bool = True) -> None:
        self.raised: int | None = None
        self.announce = announce
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.raised == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if signum == signal.SIGINT and self.announce:
            print(
                "\nCtrl-C: finishing this step, saving it and stopping (Ctrl-C again stops at once, losing the step)",
                file=sys.stderr,
                flush=True,
            )
        self.raised = self.raised or signum

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: signals cannot be caught here
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class TrainLog:
    """`train_log.jsonl` (main process), the trackers and plain progress lines in batch jobs; images/s
    is measured over the steps since the last line."""

    def __init__(self, run: TrainingRun) -> None:
        self.run = run
        self.file = open(run.out / TRAIN_LOG, "a") if run.main else None  # noqa: SIM115 (append-only log)
        self.window_start, self.window_images = time.perf_counter(), 0

    def step(self, done: int, stats: StepStats, grad_norm: Any) -> None:
        config, optimizer = self.run.config, self.run.optimizer
        self.window_images += config.batch_size
        if self.file is None or not (done % config.log_every == 0 or done == config.steps):
            return
        elapsed = time.perf_counter() - self.window_start
        record = {
            "step": done,
            "loss": stats.loss,
            "lr": optimizer.param_groups[0]["lr"],
            "text_lr": None if config.frozen_text else optimizer.param_groups[1]["lr"],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "images_per_s": self.window_images / elapsed if elapsed > 0 else None,
            "memory_mb": memory_mb(self.run.device),
            "ucg_eligible": stats.ucg_eligible,
            "ucg_dropped": stats.ucg_dropped,
            "epoch": done * config.batch_size // self.run.data.rows,
        }
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.run.accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=done)
        if not interactive():
            log.info(f"step {done}/{config.steps} loss {stats.loss:.4f} {record['images_per_s']:.1f} img/s")
        self.window_start, self.window_images = time.perf_counter(), 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def memory_mb(device: Any) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
