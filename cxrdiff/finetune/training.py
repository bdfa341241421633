"""Everything one process trains with (`TrainingRun`) and how it is built from the base model: the UNet and
text encoder as one module for accelerate, AdamW, the EMA, this rank's data and seeded generators."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.errors import InputError
from cxrdiff.finetune.config import FinetuneConfig
from cxrdiff.finetune.data import TrainData, TrainingText
from cxrdiff.models import Components


def text_to_noise_class() -> type:
    import torch

    class TextToNoise(torch.nn.Module):
        """UNet and text encoder in one module, so DDP, FSDP and DeepSpeed wrap, sync and save one model."""

        def __init__(self, unet: Any, text_encoder: Any, train_text: bool):
            super().__init__()
            self.unet, self.text_encoder, self.train_text = unet, text_encoder, train_text

        def forward(self, noisy: Any, timesteps: Any, input_ids: Any, attention_mask: Any = None) -> Any:
            with contextlib.nullcontext() if self.train_text else torch.no_grad():
                hidden = self.text_encoder(input_ids, attention_mask=attention_mask)[0]  # (batch, tokens, width)
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

    def unet_names(self) -> list[str]:
        return [n for n, _ in self.accelerator.unwrap_model(self.model).unet.named_parameters()]


def load_run(config: FinetuneConfig, model_dir: Path, accelerator: Any, per_device: int, accum: int) -> TrainingRun:
    """Load the base model and this rank's data, build the model, optimizer and EMA, seed the generators."""
    from diffusers import DDPMScheduler

    from cxrdiff.models import load_components

    rank, world = accelerator.process_index, accelerator.num_processes
    comps = load_components(model_dir)
    with_logvar = config.latent_sampling == "sample"
    data = TrainData(Path(config.data), comps.latent_shape, config.seed, rank, world, with_logvar=with_logvar)
    ucg = config.ucg_caption if data.captions else config.ucg_no_finding
    text = TrainingText(
        config.prompt_source,
        data.impressions,
        data.labels,
        ucg,
        any_row=data.captions,
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
    """UNet and text encoder as one prepared module (the text encoder trained only when learnable),
    AdamW at a constant learning rate as the paper, and the UNet's EMA with --ema."""
    import torch

    from cxrdiff.speed import set_tf32, speed_up_unet

    set_tf32(config.tf32)
    unet, text_encoder = comps.unet, comps.text_encoder
    unet.train().requires_grad_(True)
    text_encoder.train(not config.frozen_text).requires_grad_(not config.frozen_text)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if not config.frozen_text:
            text_encoder.gradient_checkpointing_enable()
    speed_up_unet(unet, compile=config.compile, channels_last=config.channels_last)
    model = text_to_noise_class()(unet, text_encoder, train_text=not config.frozen_text)
    groups = [{"params": list(unet.parameters()), "lr": config.lr}]
    if not config.frozen_text:
        groups.append({"params": list(text_encoder.parameters()), "lr": config.text_lr})
    optimizer = torch.optim.AdamW(
        groups, betas=(0.9, 0.999), weight_decay=config.weight_decay, eps=1e-8, fused=config.fused_adamw or None
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema = None
    if config.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(accelerator.unwrap_model(model).unet.parameters(), decay=config.ema_decay)
        ema.to(accelerator.device)
    return model, optimizer, lr_scheduler, ema


def seeded_generators(seed: int, rank: int, device: Any) -> tuple[Any, np.random.Generator]:
    """This rank's generators for every draw of the run; the global RNGs are seeded alike for libraries."""
    import torch

    seeds = np.random.SeedSequence([seed, rank]).generate_state(2)
    gen = torch.Generator(device=device).manual_seed(int(seeds[0]))
    np_gen = np.random.default_rng(int(seeds[1]))
    random.seed(int(seeds[0]))
    np.random.seed(int(seeds[1]) % 2**32)
    torch.manual_seed(int(seeds[0]))
    return gen, np_gen
