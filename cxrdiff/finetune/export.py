"""The end of a run: the diffusers pipeline folder (the trained UNet, the text encoder, the base model's other
parts; the EMA beside) written part by part, then the manifest, last, which marks the run finished."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from cxrdiff.artifacts import (
    MANIFEST,
    StepFolder,
)
from cxrdiff.config import to_dict
from cxrdiff.finetune.config import CHECKPOINTS
from cxrdiff.finetune.lora import add_adapters, export_adapters, merged, text_targets, trainable
from cxrdiff.finetune.training import TrainingRun
from cxrdiff.models import Components
from cxrdiff.text_encoders import fresh_like, label, new_projection, state_part, trained_parts


def conditioning(run: TrainingRun) -> dict[str, Any]:
    """The manifest's record of the text side: which encoder (its record, None: the base model's CLIP pair)
    and what fine-tuning trained."""
    record = run.comps.text_record
    return {
        "encoder": label(record),
        "record": None if record is None else record.to_dict(),
        "trained": trained_parts(record, learnable=not run.config.frozen_text),
    }


def trained_projection(comps: Components, state: dict[str, Any]) -> Any:
    """The text projection with its trained weights from the run's state (None without one)."""
    if comps.text_projection is None:
        return None
    record = comps.text_record
    projection = new_projection(record.width, record.cross_attention_dim, seed=0)
    projection.load_state_dict(state_part(state, "text_projection."))
    return projection


RESULT_KEYS = ("steps", "text_encoder", "weights", "final_loss")


def run_result(out: Path, values: dict[str, Any]) -> dict[str, Any]:
    return {"out": str(out), **{k: values[k] for k in RESULT_KEYS}}


def export_run(run: TrainingRun, folder: StepFolder, last_loss: float) -> dict[str, Any]:
    """Write the pipeline folder (main process), then the manifest, last, which marks the run finished."""
    config, out = run.config, run.out
    state = run.accelerator.get_state_dict(run.model)  # full weights on the main process under DDP/FSDP/DeepSpeed
    extra = {
        "steps": config.steps,
        "text_encoder": "frozen" if config.frozen_text else "learnable",
        "conditioning": conditioning(run),
        "weights": config.export_weights,
        "ema": config.ema,
        "global_batch_size": config.batch_size,
        "per_device_batch_size": run.per_device,
        "processes": run.world,
        "gradient_accumulation_steps": run.accum,
        "images_seen": config.steps * config.batch_size,
        "prediction_type": run.comps.prediction_type,
        "latent_sampling": config.latent_sampling,
        "final_loss": last_loss,
        "training_mode": run.mode.record(text_targets(run.comps.text_encoder) if run.mode.text_rank else ()),
        "parameters": run.accelerator.unwrap_model(run.model).parameter_counts,
        "ucg_rule": {"eligible": run.data.format.ucg_eligible, "p": getattr(config, run.data.format.ucg_field)},
    }
    if run.main:
        write_pipeline(run, state)
        relative = (p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
        files = [
            r.as_posix() for r in relative if r.parts[0] != CHECKPOINTS and not any(s.startswith(".") for s in r.parts)
        ]
        folder.finish(
            config=to_dict(config),
            inputs={"data": config.data, "base_model": config.base_model},
            seed=config.seed,
            files=files,
            extra=extra,
        )
    return run_result(out, extra)


def write_pipeline(run: TrainingRun, state: dict[str, Any]) -> None:
    """Base parts + trained UNet (+ text encoder if learnable); with --ema the other UNet beside it. LoRA: the
    modules are rebuilt with their adapters, the adapters file written, and the merged weights saved."""
    from diffusers import UNet2DConditionModel

    from cxrdiff.models import save_components

    comps, config, out, mode = run.comps, run.config, run.out, run.mode
    unet_state = {k[5:]: v for k, v in state.items() if k.startswith("unet.")}
    unet = UNet2DConditionModel.from_config(comps.unet.config)
    add_adapters(mode, unet)  # LoRA: the layers the run trained, so that its state loads
    unet.load_state_dict(unet_state)
    ema_unet = None
    if run.ema is not None:
        ema_unet = UNet2DConditionModel.from_config(comps.unet.config)
        add_adapters(mode, ema_unet)
        ema_unet.load_state_dict(unet_state)  # what the EMA does not follow (LoRA: the base weights)
        run.ema.copy_to([p for _, p in trainable(ema_unet)])
        if config.export_weights == "ema":
            unet, ema_unet = ema_unet, unet
    text = comps.text_encoder
    if not config.frozen_text:
        text = fresh_like(comps.text_encoder)
        add_adapters(mode, text_encoder=text)
        text.load_state_dict(state_part(state, "text_encoder."))
    tmp = out / ".pipeline"
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed export left
    tmp.mkdir()
    unet, text = export_adapters(tmp, mode, unet, text)  # LoRA: the adapters file, then the merged modules
    parts = Components(unet=unet, vae=comps.vae.to("cpu"), text_encoder=text, tokenizer=comps.tokenizer, scheduler=None)
    parts.use_text(
        dataclasses.replace(parts.text, projection=trained_projection(comps, state), record=comps.text_record)
    )
    save_components(parts, tmp, scheduler=comps.scheduler)
    if ema_unet is not None:
        other = "unet_raw" if config.export_weights == "ema" else "unet_ema"
        merged(ema_unet).save_pretrained(tmp / other, safe_serialization=True)
    for item in sorted(tmp.iterdir()):  # each part lands whole (rename); the manifest, last, marks completion
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    shutil.rmtree(tmp, ignore_errors=True)
