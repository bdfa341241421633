"""Fitting a tiny model's VAE to a data set's pictures, so that its samples decode to pictures of that kind.

The demos build their base models from random weights; a random VAE decodes any latent to noise. A few
hundred steps of reconstruction make its decoder draw chest-like (or COCO-phantom-like) pictures, and the
scaling factor is then set as SD's 0.18215 was: so that the latents have unit variance.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxrdiff.console import log


def fit_vae(
    vae: Any, images: np.ndarray, steps: int, seed: int = 0, batch_size: int = 16, lr: float = 1e-3
) -> list[float]:
    """Fit a tiny VAE to grey images (uint8, (N, H, W)) with an L1 reconstruction loss and a small KL term.

    A random VAE decodes any latent to noise; a few hundred steps on the phantom images make its decoder
    draw chest-like pictures, which is all the demo needs from it. Returns the loss per step.
    """
    import torch

    from cxrdiff.images import to_model_input

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    data = to_model_input(images)  # (n, 3, height, width)
    losses = []
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latent = posterior.sample(generator)
        reconstruction = vae.decode(latent).sample
        kl = posterior.kl().mean() / batch[0].numel()
        loss = (reconstruction - batch).abs().mean() + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    vae.eval().requires_grad_(False)
    log.info("VAE fitted: L1 %.4f → %.4f over %d steps", losses[0], losses[-1], steps)
    return losses


def scale_to_unit_variance(vae: Any, images: np.ndarray) -> float:
    """The scaling factor that gives the fitted VAE's latents unit variance (what SD's 0.18215 does)."""
    import torch

    from cxrdiff.images import to_model_input

    with torch.no_grad():
        mean = vae.encode(to_model_input(images[:64])).latent_dist.mean
    return float(1.0 / mean.std())
