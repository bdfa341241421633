"""Everything one process trains with (`TrainingRun`) and how it is built from the base model: the UNet and
text encoder as one module for accelerate, AdamW, the EMA, this rank's data and seeded generators."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.console import log
from cxrdiff.errors import InputError
from cxrdiff.finetune.config import FinetuneConfig
from cxrdiff.finetune.data import TrainData
from cxrdiff.finetune.lora import TrainingMode, parameter_counts, set_trainable, trainable
from cxrdiff.models import Components
from cxrdiff.training_text import TrainingText


def text_to_noise_class() -> type:
    import torch

    from cxrdiff.text_encoders import hidden_states

    class TextToNoise(torch.nn.Module):
        """UNet and text encoder in one module, so DDP, FSDP and DeepSpeed wrap, sync and save one model; with a
        text encoder of another width than the UNet's, the learned map between them (`text_projection`)."""

        def __init__(self, unet: Any, text_encoder: Any, train_text: bool, text_projection: Any = None):
            super().__init__()
            self.unet, self.text_encoder, self.train_text = unet, text_encoder, train_text
            self.text_projection = text_projection  # trained with the UNet, frozen encoder or not
            self.parameter_counts = parameter_counts(unet, text_encoder)  # before a wrapper may shard them

        def forward(self, noisy: Any, timesteps: Any, input_ids: Any, attention_mask: Any = None) -> Any:
            with contextlib.nullcontext() if self.train_text else torch.no_grad():
                hidden = hidden_states(self.text_encoder, input_ids, attention_mask)  # (batch, tokens, width)
            if self.text_projection is not None:
                hidden = self.text_projection(hidden)  # (batch, tokens, cross-attention dim)
            return self.unet(noisy, timesteps, encoder_hidden_states=hidden).sample  # (batch, C, H, W)

    return TextToNoise


@dataclasses.dataclass
class TrainingRun:
    """Everything one process trains with (built by `load_run`); the phases below take it whole."""

    config: FinetuneConfig
    accelerator: Any
    per_device: int
    accum: int
    comps: Components
    data: TrainData
    text: TrainingText
    model: Any  # the prepared TextToNoise module
    optimizer: Any
    lr_scheduler: Any
    ema: Any  # diffusers' EMAModel of the UNet, or None
    noise_scheduler: Any
    gen: Any  # this rank's torch generator: every tensor draw
    np_gen: np.random.Generator  # this rank's numpy generator: UCG and alternative prompts

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> Any:
        return self.accelerator.device

    @property
    def mode(self) -> TrainingMode:
        return TrainingMode.of_config(self.config)

    def unet_names(self) -> list[str]:
        """The names of the UNet parameters that train (all; with LoRA its adapters): what the EMA follows."""
        return [n for n, _ in trainable(self.accelerator.unwrap_model(self.model).unet)]

    def ema_parameters(self) -> list[Any]:
        return [p for _, p in trainable(self.accelerator.unwrap_model(self.model).unet)]


def load_run(config: FinetuneConfig, model_dir: Path, accelerator: Any, per_device: int, accum: int) -> TrainingRun:
    """Load the base model and this rank's data, build the model, optimizer and EMA, seed the generators."""
    from diffusers import DDPMScheduler

    from cxrdiff.models import load_components

    rank, world = accelerator.process_index, accelerator.num_processes
    comps = load_components(model_dir)
    if config.text_encoder is not None:  # another text encoder than the base model's (finetune --text-encoder)
        from cxrdiff.text_encoders import open_text_encoder

        cross = int(comps.unet.config.cross_attention_dim)
        comps.use_text(open_text_encoder(config.text_encoder, cross, config.trust_remote_code, seed=config.seed))
    with_logvar = config.latent_sampling == "sample"
    data = TrainData(Path(config.data), comps.latent_shape, config.seed, rank, world, with_logvar=with_logvar)
    ucg = getattr(config, data.format.ucg_field)
    text = TrainingText(
        config.prompt_source,
        data.impressions,
        data.labels,
        ucg,
        any_row=not data.format.labelled,
        deid_markers=config.deid_markers,
    )
    model, optimizer, lr_scheduler, ema = build_model(config, comps, accelerator)
    noise_scheduler = DDPMScheduler.from_config(comps.scheduler.config)
    prediction = noise_scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise InputError(f"--base-model {model_dir}: prediction_type {prediction!r} is not epsilon or v_prediction")
    gen, np_gen = seeded_generators(config.seed, rank, accelerator.device)
    return TrainingRun(
        config=config,
        accelerator=accelerator,
        per_device=per_device,
        accum=accum,
        comps=comps,
        data=data,
        text=text,
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        ema=ema,
        noise_scheduler=noise_scheduler,
        gen=gen,
        np_gen=np_gen,
    )


def build_model(config: FinetuneConfig, comps: Components, accelerator: Any) -> tuple[Any, Any, Any, Any]:
    """UNet and text encoder as one prepared module (the text encoder trained only when learnable; with LoRA only
    the adapters train), AdamW at a constant learning rate as the paper, and the UNet's EMA with --ema (of what
    trains: with LoRA, the UNet's adapters)."""
    import torch

    from cxrdiff.speed import set_tf32, speed_up_unet

    set_tf32(config.tf32)
    unet, text_encoder = comps.unet, comps.text_encoder
    unet.train()
    text_encoder.train(not config.frozen_text)
    set_trainable(TrainingMode.of_config(config), unet, text_encoder, not config.frozen_text, config.seed)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if not config.frozen_text:
            text_encoder.gradient_checkpointing_enable()
    speed_up_unet(unet, compile=config.compile, channels_last=config.channels_last)
    projection = comps.text_projection
    model = text_to_noise_class()(unet, text_encoder, train_text=not config.frozen_text, text_projection=projection)
    if accelerator.is_main_process:
        log_parameters(model.parameter_counts)
    groups = [{"params": [p for _, p in trainable(unet)], "lr": config.lr}]
    if not config.frozen_text:
        groups.append({"params": [p for _, p in trainable(text_encoder)], "lr": config.text_lr})
    if projection is not None:  # the width map learns with the UNet, at its rate (last group: logs read [1])
        groups.append({"params": list(projection.train().requires_grad_(True).parameters()), "lr": config.lr})
    optimizer = torch.optim.AdamW(
        groups, betas=(0.9, 0.999), weight_decay=config.weight_decay, eps=1e-8, fused=config.fused_adamw or None
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema = None
    if config.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel([p for _, p in trainable(accelerator.unwrap_model(model).unet)], decay=config.ema_decay)
        ema.to(accelerator.device)
    return model, optimizer, lr_scheduler, ema


def log_parameters(counts: dict[str, Any]) -> None:
    unet, text = counts["unet"]["trainable"], counts["text_encoder"]["trainable"]
    log.info(
        f"trainable parameters: {counts['trainable']:,} of {counts['total']:,} (UNet {unet:,}, text encoder {text:,})"
    )


def seeded_generators(seed: int, rank: int, device: Any, step: int | None = None) -> tuple[Any, np.random.Generator]:
    """This rank's generators for every draw of the run; the global RNGs are seeded alike for libraries.
    With `step`: those of a rank that resumes a checkpoint saved by fewer processes (no saved state of its own)."""
    import torch

    key = [seed, rank] if step is None else [seed, step, rank]
    seeds = np.random.SeedSequence(key).generate_state(2)
    gen = torch.Generator(device=device).manual_seed(int(seeds[0]))
    np_gen = np.random.default_rng(int(seeds[1]))
    random.seed(int(seeds[0]))
    np.random.seed(int(seeds[1]) % 2**32)
    torch.manual_seed(int(seeds[0]))
    return gen, np_gen
