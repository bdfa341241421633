"""The model side of `ground`: the loaded model (`load_model`), each run's latent (`grounded_latent`), and a
batch's averaged cross-attention maps (`capture_maps`, the paper's noise mode or DDIM inversion)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.console import log
from cxrdiff.errors import InputError, RunError
from cxrdiff.ground.config import GroundConfig, GroundingInput
from cxrdiff.ground.inputs import data_manifest
from cxrdiff.ground.single import encode_image
from cxrdiff.speed import limit_cpu_threads, set_tf32, speed_up_unet
from cxrdiff.text_encoders import encode_text


@dataclasses.dataclass(frozen=True)
class Model:
    """What every batch reuses: the components, where and in what precision they run, the frame the maps are
    scored in, the latents' scaling factor and (with guidance) the empty prompt's context."""

    comps: Any
    device: Any
    dtype: Any
    frame_size: int
    scaling: float
    uncond: Any


def load_model(config: GroundConfig, samples: list[GroundingInput], device: Any) -> Model:
    """Load the model; encode the single image (`--image`); refuse latents the UNet cannot read."""
    import torch

    from cxrdiff.models import load_components

    limit_cpu_threads(device)
    set_tf32(config.tf32)
    dtype = precision_dtype(config, device)
    comps = load_components(config.model, device=device, dtype=None if dtype == torch.float32 else dtype)
    speed_up_unet(comps.unet, compile=config.compile, channels_last=config.channels_last)
    if config.image is not None:
        samples[0].latent, samples[0].logvar = encode_image(comps, config.image, device, dtype)
    channels = samples[0].latent.shape[0]
    if channels != comps.unet.config.in_channels:
        raise InputError(
            f"--data {config.data}: latents have {channels} channels, the model's UNet takes "
            f"{comps.unet.config.in_channels}; prepare with this model's VAE"
        )
    frame_size = int(samples[0].latent.shape[-1]) * comps.vae_scale_factor
    scaling = scaling_factor(config, comps)
    uncond = encode_text(comps, [""], device) if config.guidance > 1.0 else None
    return Model(comps, device, dtype, frame_size, scaling, uncond)


def precision_dtype(config: GroundConfig, device: Any) -> Any:
    """`--precision` as a torch dtype (auto: bf16 on CUDA, fp32 elsewhere)."""
    import torch

    if config.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]


def scaling_factor(config: GroundConfig, comps: Any) -> float:
    """The prepare manifest's scaling factor when it records one (it made the latents), else the model's."""
    if config.data is not None:
        recorded = data_manifest(Path(config.data)).get("scaling_factor")
        if recorded is not None:
            if not math.isclose(float(recorded), comps.scaling_factor):
                log.warning(
                    "latents were scaled by %s at prepare time; the model says %s", recorded, comps.scaling_factor
                )
            return float(recorded)
    return comps.scaling_factor


def capture_batch(chunk: list[GroundingInput], run: int, model: Model, config: GroundConfig) -> tuple[Any, Any]:
    """One batch of one run: its maps (b, tokens, H, W) as numpy, and the scaled latents (b, C, H, W) read."""
    import torch

    unscaled = np.stack([grounded_latent(s, config, run) for s in chunk])  # (b, C, H, W)
    latents = torch.from_numpy(unscaled).to(model.device, model.dtype) * model.scaling  # (b, C, H, W)
    context = encode_text(model.comps, [s.phrase for s in chunk], model.device)  # (b, tokens, dim)
    seeds = [sample_seed(config.seed + run, s.sample) for s in chunk]
    maps = capture_maps(model.comps, latents, context, config, seeds, model.uncond).float().cpu().numpy()
    check_finite(maps, chunk, model, config)
    return maps, latents


def check_finite(maps: np.ndarray, chunk: list[GroundingInput], model: Model, config: GroundConfig) -> None:
    """Maps holding NaN or inf stop the run (a RunError, exit 1: the model or its numbers failed, not the
    input's form), naming the first such phrase and the cause. Scored, a NaN map would read as chance (AUC 0.5,
    CNR 0)."""
    bad = [i for i, m in enumerate(maps) if not np.isfinite(m).all()]  # maps: (b, tokens, H, W)
    if not bad:
        return
    s = chunk[bad[0]]
    raise RunError(
        f"sample {s.sample} ({s.phrase!r}): the cross-attention maps are not finite (NaN or inf) in "
        f"{len(bad)} of {len(chunk)} phrases of this batch: {non_finite_cause(s, model, config)}"
    )


def non_finite_cause(sample: GroundingInput, model: Model, config: GroundConfig) -> str:
    """Why a map went non-finite: the sample's latent, a weight of the UNet or text encoder (or the VAE that
    encoded `--image`), else an overflow of the activations."""
    import torch

    if sample.latent is not None and not np.isfinite(sample.latent).all():
        return "its latent is not finite" + (f" (--data {config.data})" if config.data is not None else "")
    parts = [("UNet", model.comps.unet), ("text encoder", model.comps.text_encoder)]
    parts += [("VAE", model.comps.vae)] if config.image is not None else []
    for part, module in parts:
        for name, weight in module.named_parameters() if module is not None else ():
            if not torch.isfinite(weight).all():
                return f"the model's {part} weight {name} is not finite"
    return (
        f"the UNet's activations overflowed (--mode {config.mode}, --guidance {config.guidance:g}, "
        f"--precision {config.precision}); try --precision no"
    )


def sample_seed(seed: int, sample: str) -> int:
    """The noise seed of one sample in one run."""
    return int(np.random.SeedSequence([seed, int(sample)]).generate_state(1)[0])


def grounded_latent(sample: GroundingInput, config: GroundConfig, run: int) -> np.ndarray:
    """The unscaled latent a run grounds: the posterior mean, or (`--latent sample`, the reference code's
    choice) a draw mean + exp(logvar / 2) · ε with ε seeded by (seed + run, sample), apart from the noise."""
    if config.latent == "mean" or sample.logvar is None:
        return sample.latent
    rng = np.random.default_rng(np.random.SeedSequence([config.seed + run, int(sample.sample), 1]))
    eps = rng.standard_normal(sample.latent.shape, dtype=np.float32)  # (C, H, W)
    return (sample.latent + np.exp(0.5 * sample.logvar.astype(np.float32)) * eps).astype(np.float32)


def capture_maps(comps: Any, latents: Any, context: Any, config: GroundConfig, seeds: list[int], uncond: Any = None):
    """Average cross-attention maps (batch, tokens, H, W) of one batch of scaled latents (batch, C, H, W)."""
    import torch
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    from cxrdiff.attention import AttentionCapture

    unet = comps.unet
    cfg = config.guidance > 1.0
    scheduler = DDIMScheduler.from_config(comps.scheduler.config)
    scheduler.set_timesteps(config.steps, device=latents.device)
    emb = torch.cat([uncond.expand_as(context), context]) if cfg else context  # (batch×(1|2), tokens, dim)
    first = config.steps - config.window
    with torch.no_grad(), AttentionCapture(unet, latents.shape[-2:], drop_uncond=cfg) as capture:
        if config.mode == "noise":
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            for i, t in enumerate(scheduler.timesteps):
                noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens])  # (batch, C, H, W)
                if i < first:  # the UNet's output is never used: steps before the window change nothing
                    continue
                capture.active = True
                noisy = scheduler.add_noise(latents, noise.to(latents), t)  # (batch, C, H, W)
                unet(torch.cat([noisy, noisy]) if cfg else noisy, t, encoder_hidden_states=emb)
        else:
            inverse = DDIMInverseScheduler.from_config(comps.scheduler.config)
            inverse.set_timesteps(config.steps, device=latents.device)
            x = latents
            for t in inverse.timesteps:  # conditional DDIM inversion, capture off
                eps = unet(x, t, encoder_hidden_states=context).sample  # (batch, C, H, W)
                x = inverse.step(eps, t, x).prev_sample
            for i, t in enumerate(scheduler.timesteps):
                capture.active = i >= first
                out = unet(torch.cat([x, x]) if cfg else x, t, encoder_hidden_states=emb).sample
                if cfg:
                    out_u, out_c = out.chunk(2)
                    out = out_u + config.guidance * (out_c - out_u)
                x = scheduler.step(out, t, x).prev_sample
        return capture.maps()  # (batch, tokens, H, W)
