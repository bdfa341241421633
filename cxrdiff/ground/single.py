"""`--image` with `--prompt`: one image, no prepared folder and no regions; its latent is encoded with the
model's own VAE once the model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.ground.config import GroundConfig, GroundingInput


def image_samples(config: GroundConfig) -> list[GroundingInput]:
    """The one sample, its image read now (unreadable → InputError before any weight is loaded)."""
    from cxrdiff.images import load_grayscale

    load_grayscale(config.image)
    return [GroundingInput(sample="000000", phrase=str(config.prompt), latent=None, image_path=str(config.image))]


def encode_image(comps: Any, path: Path, device: Any, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """The image's posterior (unscaled mean and log-variance, as `prepare` stores them)."""
    import torch

    from cxrdiff.images import load_grayscale, resize_center_crop, to_model_input

    grey = resize_center_crop(load_grayscale(path), comps.resolution)
    with torch.no_grad():
        posterior = comps.vae.encode(to_model_input(grey).to(device, dtype)).latent_dist
    return posterior.mean[0].float().cpu().numpy(), posterior.logvar[0].float().cpu().numpy()  # (C, H, W) each
