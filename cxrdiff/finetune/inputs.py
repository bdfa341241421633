"""Every check of a fine-tuning run before any weight is read: values, the batch plan, data that fits the base
model, the prompt source and the --out folder (`check_inputs`)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from cxrdiff.artifacts import (
    MANIFEST,
    StepFolder,
    input_identity,
    read_manifest,
)
from cxrdiff.config import check_ranges, settings
from cxrdiff.console import log
from cxrdiff.errors import InputError
from cxrdiff.finetune.checkpoints import Checkpoints
from cxrdiff.finetune.config import DEFAULT_STEPS, STEP, FinetuneConfig
from cxrdiff.finetune.lora import LORA_FIELDS, TrainingMode, check_targets, check_values
from cxrdiff.formats import FORMATS, format_record
from cxrdiff.models import (
    check_model_folder,
    fingerprint_covers_weights,
    model_geometry,
    names_and_sizes_fingerprint,
    vae_fingerprint,
)
from cxrdiff.training_text import check_prompt_source


def batch_plan(batch_size: int, per_device: int | None, processes: int) -> tuple[int, int]:
    """Split the global batch: per_device × processes × accumulation = batch_size, or an InputError."""
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    if batch_size % processes:
        raise InputError(f"--batch-size {batch_size} is not divisible by the {processes} processes")
    if per_device is None:
        per_device = min(16, batch_size // processes)
        while (batch_size // processes) % per_device:
            per_device -= 1
    if per_device < 1:
        raise InputError(f"--per-device-batch-size {per_device}: must be at least 1")
    if (batch_size // processes) % per_device:
        raise InputError(
            f"--batch-size {batch_size} is not per-device {per_device} × {processes} processes × an integer "
            "number of accumulation steps; choose --per-device-batch-size dividing "
            f"{batch_size // processes}"
        )
    return per_device, batch_size // (processes * per_device)


def check_prepared(data: Path, model: Path) -> dict[str, Any]:
    """Refuse a prepared folder whose latents were not made by this base model's VAE at its resolution."""
    manifest = read_manifest(data, "prepare")
    known = {**manifest.get("config", {}), **manifest}  # prepare records these at the top level
    resolution, latent_shape, scaling_factor = model_geometry(model, None)
    for key in ("latent_shape", "scaling_factor", "resolution"):
        if key not in known:
            raise InputError(f"{data / MANIFEST}: no '{key}'; re-run `cxrdiff prepare`")
    if tuple(known["latent_shape"]) != latent_shape or int(known["resolution"]) != resolution:
        raise InputError(
            f"--data {data}: latents {list(known['latent_shape'])} at {known['resolution']} px do not fit "
            f"--base-model {model} (latents {list(latent_shape)} at {resolution} px); "
            "prepare the data with this base model"
        )
    if not math.isclose(float(known["scaling_factor"]), scaling_factor, rel_tol=1e-6):
        raise InputError(
            f"--data {data}: VAE scaling factor {known['scaling_factor']} differs from --base-model {model}'s "
            f"{scaling_factor}; prepare the data with this base model"
        )
    stored = known.get("vae_fingerprint")
    if stored is None:
        log.warning(f"{data / MANIFEST}: cannot verify that its latents came from {model}'s VAE (no fingerprint)")
    elif not fingerprint_covers_weights(stored):  # names and sizes only: compared as far as it goes
        if stored != names_and_sizes_fingerprint(model):
            raise InputError(
                f"--data {data}: latents were made by a different VAE than --base-model {model}'s "
                "(vae_fingerprint differs); prepare the data with this base model"
            )
        log.warning(
            f"{data / MANIFEST}: its VAE fingerprint covers file names and sizes but not the weights: cannot verify "
            f"that its latents came from {model}'s VAE weights; prepare again to be sure"
        )
    elif stored != vae_fingerprint(model):
        raise InputError(
            f"--data {data}: latents were made by a different VAE than --base-model {model}'s "
            "(vae_fingerprint differs); prepare the data with this base model"
        )
    return manifest


def with_defaults(config: FinetuneConfig) -> FinetuneConfig:
    """Fill derived defaults (steps, text lr) and refuse bad values (each number's declared `Range`),
    before anything heavy happens."""
    for name in ("data", "base_model", "out"):
        if getattr(config, name) is None:
            raise InputError(f"--{name.replace('_', '-')} is required")
    if config.frozen_text is None:
        raise InputError("choose --frozen-text (Finetune_F) or --learnable-text (Finetune_L)")
    check_ranges(config)
    steps = config.steps if config.steps is not None else DEFAULT_STEPS[config.frozen_text]
    if config.deid_markers not in ("keep", "strip"):
        raise InputError(f"--deid-markers {config.deid_markers!r}: expected keep or strip")
    if config.export_weights == "ema" and not config.ema:
        raise InputError("--export-weights ema needs --ema")
    check_values(config)
    return dataclasses.replace(config, steps=steps, text_lr=config.text_lr if config.text_lr is not None else config.lr)


def run_settings(config: FinetuneConfig) -> dict[str, Any]:
    """What a run folder's settings key is made of: the config less its NOT_SETTINGS, with the data, the
    base model and a prompt file by identity (a re-prepared data folder is another run), the training mode's
    settings (LoRA's rank, alpha, dropout and targets; nothing for full fine-tuning), and a --text-encoder by
    identity where one is given."""
    source = config.prompt_source
    if source.startswith("file:"):
        source = f"file:{input_identity(source[5:])}"
    identities = {"data": input_identity(config.data), "base_model": input_identity(config.base_model)}
    if config.text_encoder is not None:
        identities["text_encoder"] = text_encoder_identity(config.text_encoder)
    mine = settings(config, prompt_source=source, **identities)
    own = format_record(config.data).ucg_field
    unused = {f.ucg_field for f in FORMATS.values()} - {own}  # the other formats' UCG rules
    mode = TrainingMode.of_config(config).settings()
    return {k: v for k, v in mine.items() if k not in unused and k not in LORA_FIELDS} | mode


def text_encoder_identity(folder: Path) -> str:
    """A --text-encoder folder's identity: the hash of its weights, config and tokenizer files."""
    from cxrdiff.text_encoders import find_source, source_identity

    return source_identity(find_source(folder))


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What `check_inputs` accepted: the config with its defaults filled, the --out folder and the model."""

    config: FinetuneConfig
    folder: StepFolder
    model_dir: Path


def check_inputs(config: FinetuneConfig) -> Inputs:
    """Refuse bad values, data that does not fit the base model and an --out that cannot hold this run,
    all before any weight is read. The claim only checks here: it is written once the batch plan (which
    needs the process count) is accepted, so a refused run leaves no folder behind."""
    config = with_defaults(config)
    model_dir = check_model_folder(config.base_model)
    check_prepared(Path(config.data), model_dir)
    check_prompt_source(config.prompt_source)
    if config.text_encoder is not None:
        from cxrdiff.text_encoders import check_remote_code, find_source

        check_remote_code(find_source(config.text_encoder), config.trust_remote_code)
    check_targets(TrainingMode.of_config(config), model_dir)
    record = format_record(config.data)
    if record.prompt_sources is not None and config.prompt_source not in record.prompt_sources:
        raise InputError(f"--prompt-source {config.prompt_source}: {record.prompt_rule}")
    folder = StepFolder.claim(config.out, STEP, run_settings(config), create=False)
    if folder.state != "new":
        Checkpoints(folder.out).check(config.steps)
    return Inputs(config, folder, model_dir)
