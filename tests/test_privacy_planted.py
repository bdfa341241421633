"""The planted case: a fine-tune overfit on three training images reproduces them, and the report's privacy
measures say so (a copy rate far above a normal fine-tune's on the same data, the pairs showing the copies)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrdiff.artifacts import write_manifest
from cxrdiff.data import LABELS, latent_to_bytes

PROMPTS = ("planted one", "planted two", "planted three")
HELD_OUT = 24


class PooledPixels:
    """A deterministic feature network: the image's 8 × 8 block means, centred."""

    name = "pooled pixels"
    classes = ("Edema",)
    cache_key = "v1"

    def features(self, x):
        import torch.nn.functional as F

        pooled = F.adaptive_avg_pool2d(x, 8).flatten(1)  # (batch, 64)
        return pooled - pooled.mean(dim=1, keepdim=True)


def _prepared(folder, model):
    """Training 'images' that the tiny VAE decodes exactly from their latents (so a model that reproduces a
    training latent reproduces the training image), and held-out images decoded from fresh latents."""
    import torch

    from cxrdiff.images import grey_from_vae
    from cxrdiff.models import load_components, vae_fingerprint

    comps = load_components(model)
    rng = np.random.default_rng(0)
    latents = (rng.standard_normal((3 + HELD_OUT, *comps.latent_shape)) / comps.scaling_factor).astype(np.float32)
    with torch.no_grad():
        images = grey_from_vae(comps.vae.decode(torch.from_numpy(latents)).sample)  # (n, 32, 32) uint8
    folder.mkdir(parents=True)
    rows = []
    for i, (latent, grey) in enumerate(zip(latents, images, strict=True)):
        path = folder / f"image{i}.png"
        Image.fromarray(grey).save(path)
        labels = {c: float("nan") for c in LABELS} | {"No Finding": 1.0}
        text = PROMPTS[i] if i < 3 else f"held-out study {i}"
        rows.append({"impression": text, **labels, "image_path": str(path)})
        if i < 3:
            rows[-1].update(
                latent_mean=latent_to_bytes(latent),
                latent_logvar=latent_to_bytes(np.full_like(latent, -20.0)),  # the mean, no posterior noise
                latent_shape=list(comps.latent_shape),
            )
    pd.DataFrame(rows[:3]).to_parquet(folder / "train-00000.parquet")
    pd.DataFrame(rows[3:]).to_parquet(folder / "test.parquet")
    geometry = {"resolution": comps.resolution, "latent_shape": list(comps.latent_shape)}
    extra = {**geometry, "scaling_factor": comps.scaling_factor, "vae_fingerprint": vae_fingerprint(model)}
    write_manifest(folder, "prepare", config={"resolution": comps.resolution}, extra=extra)
    return folder


@pytest.mark.slow  # two fine-tunes (one of 200 steps) and two sample sets of a 32 px model: about 25 s
def test_an_overfit_fine_tune_copies_its_training_images_and_a_normal_one_does_not(tmp_path):
    from cxrdiff.finetune import FinetuneConfig, finetune
    from cxrdiff.model.tiny import TinySpec, write_tiny_model
    from cxrdiff.report import ReportConfig
    from cxrdiff.report.privacy import measure_privacy, pairs_figure
    from cxrdiff.sample import SampleConfig, sample

    model = write_tiny_model(tmp_path / "tiny", TinySpec(resolution=32), seed=0)
    data = _prepared(tmp_path / "prepared", model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    config = ReportConfig(
        out=tmp_path / "report",
        privacy_features="classifier",
        privacy_pixels=32,
        privacy_pairs=4,
        memorization_prompts=0,
    )
    measured = {}
    for name, steps in (("normal", 10), ("overfit", 200)):
        run = tmp_path / name
        finetune(
            FinetuneConfig(
                data=data,
                base_model=model,
                out=run,
                frozen_text=True,
                steps=steps,
                batch_size=12,  # each of the three images four times a step
                lr=3e-3,
                ucg_no_finding=0.0,
                checkpoint_every=1000,
                log_every=1000,
            )
        )
        samples = tmp_path / f"samples-{name}"
        sample(SampleConfig(model=run, out=samples, prompts_file=prompts, n_per_prompt=4, steps=20, guidance=2.0,
                            scheduler="ddim", batch_size=12))  # fmt: skip
        measured[name] = measure_privacy(config, None, samples, data, PooledPixels())
    normal, overfit = measured["normal"], measured["overfit"]
    for key in ("copy_rate", "copy_rate_pixels"):
        assert overfit[key]["n"] == normal[key]["n"] == 12 and overfit[key]["held_out_images"] == HELD_OUT
        assert overfit[key]["threshold"] == normal[key]["threshold"]  # one calibration for both: the same data
        assert overfit[key]["rate"] >= 0.75, overfit[key]
        assert normal[key]["rate"] <= 0.25, normal[key]
        assert overfit[key]["low"] > normal[key]["rate"]  # far above: the normal rate lies below the interval
    # the pairs: the closest generated images of the overfit run are copies of the planted training images
    planted = {str(data / f"image{i}.png") for i in range(3)}
    for pair in overfit["pairs"]["pixels"]:
        assert pair["copy"] and pair["training"] in planted and pair["similarity"] > 0.5
    png, caption = pairs_figure({"runs": {n: {"privacy": m} for n, m in measured.items()}})
    assert png.startswith(b"\x89PNG") and "copy" in caption
    figure = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    red = (figure[..., 0] > 200) & (figure[..., 1] < 60) & (figure[..., 2] < 60)
    assert red.sum() > 500  # the copies' frames are drawn red
