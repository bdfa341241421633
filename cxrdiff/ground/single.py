"""`--image` with `--prompt`: one image, no prepared folder and no regions; its latent is encoded with the
model's own VAE once the model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.ground.config import GroundConfig, GroundingInput
from cxrdiff.metrics.laterality import named_side


def image_samples(config: GroundConfig) -> list[GroundingInput]:
    """The one sample, its image read now: unreadable, or smaller than `prepare` takes (a short side under half
    the model's resolution), is an InputError before any weight is loaded."""
    from cxrdiff.errors import InputError
    from cxrdiff.images import MAX_UPSCALE, load_grayscale, too_small
    from cxrdiff.models import model_geometry

    height, width = load_grayscale(config.image).shape
    resolution = model_geometry(Path(config.model), None)[0]
    if too_small(width, height, resolution):
        raise InputError(
            f"--image {config.image}: {width}x{height} px is too small for the model's {resolution} px frame "
            f"(the short side must be at least {-(-resolution // MAX_UPSCALE)} px, as `prepare` requires)"
        )
    phrase = str(config.prompt)
    return [GroundingInput(sample="000000", phrase=phrase, latent=None, image_path=str(config.image),
                           side=named_side(phrase))]  # fmt: skip


def encode_image(comps: Any, path: Path, device: Any, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """The image's posterior (unscaled mean and log-variance, as `prepare` stores them)."""
    import torch

    from cxrdiff.images import load_grayscale, resize_center_crop, to_model_input

    grey = resize_center_crop(load_grayscale(path), comps.resolution)
    with torch.no_grad():
        posterior = comps.vae.encode(to_model_input(grey).to(device, dtype)).latent_dist
    return posterior.mean[0].float().cpu().numpy(), posterior.logvar[0].float().cpu().numpy()  # (C, H, W) each
