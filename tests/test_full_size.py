"""SD2-base's exact architecture (random weights) through the steps that depend on it: the folder loads in plain
diffusers offline, a fine-tuning step runs with gradient checkpointing, and grounding captures all 16
cross-attention layers on all four grids. The resolution is the smallest that keeps four grids (64 px:
8×8 latents → 8, 4, 2, 1), so this stays a few minutes on 2 CPU cores. bench/full_size.py runs 512 px."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

RESOLUTION = 64  # latents 8×8: the UNet's cross-attention runs on 8×8, 4×4, 2×2 and 1×1 grids


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    from cxrdiff.model.published import write_random_model

    out = tmp_path_factory.mktemp("full") / "sd2-base"
    result = write_random_model(out, "sd2-base", seed=0)
    assert (result["unet_parameters"], result["text_encoder_parameters"]) == (865_910_724, 340_387_840)
    return out


@pytest.fixture(scope="module")
def sd2_small(sd2, tmp_path_factory):
    """The same weights (linked) with the configs' default size set to RESOLUTION: the steps take the
    resolution from the model, and the parameters do not depend on it."""
    out = tmp_path_factory.mktemp("full-small") / "sd2-base-64"
    for path in sd2.rglob("*"):
        if path.is_file():
            (out / path.relative_to(sd2)).parent.mkdir(parents=True, exist_ok=True)
            (out / path.relative_to(sd2)).symlink_to(path)
    for part, size in (("unet", RESOLUTION // 8), ("vae", RESOLUTION)):
        config = json.loads((sd2 / part / "config.json").read_text())
        (out / part / "config.json").unlink()
        (out / part / "config.json").write_text(json.dumps({**config, "sample_size": size}))
    return out


@pytest.fixture(scope="module")
def prepared(sd2_small, phantom_tree, tmp_path_factory):
    from cxrdiff.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("full-prepared") / "prepared"
    prepare(
        PrepareConfig(
            mimic=phantom_tree,
            ms_cxr=phantom_tree / "MS_CXR_Local_Alignment_v1.0.0.csv",
            base_model=sd2_small,
            out=out,
            test_size=2,
            test_no_finding_max=1.0,
            batch_size=16,
            workers=0,
        )
    )
    return out


def test_the_folder_loads_in_plain_diffusers_offline(sd2):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd2, local_files_only=True)
    assert isinstance(pipe.scheduler, PNDMScheduler) and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id == 0
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert sum(p.numel() for p in pipe.vae.parameters()) == 83_653_863
    assert pipe.text_encoder.config.num_hidden_layers == 23 and pipe.unet.config.sample_size == 64
    del pipe
    gc.collect()


def test_a_fine_tuning_step_at_full_architecture(sd2_small, prepared, tmp_path):
    """finetune's own loop (frozen text, gradient checkpointing, batch 1) through forward and backward; the
    optimizer step is left out here (AdamW's state would add 7 GB); bench/full_size.py runs it."""
    from cxrdiff import finetune as ft

    config = ft.FinetuneConfig(
        data=prepared, base_model=sd2_small, out=tmp_path / "run", frozen_text=True, steps=1, batch_size=1,
        gradient_checkpointing=True,
    )  # fmt: skip
    inputs = ft.check_inputs(config)
    accelerator, _ = ft.start_accelerator(inputs.config)
    run = ft.load_run(inputs.config, inputs.model_dir, accelerator, 1, 1)
    with ft.StopFlag() as stop:
        stats = ft.accumulate(run, 0, stop)
    unet = accelerator.unwrap_model(run.model).unet
    assert unet.is_gradient_checkpointing
    assert np.isfinite(stats.loss) and 0.1 < stats.loss < 10  # MSE of a random model on unit noise
    keys = [m.to_k.weight.grad for name, m in unet.named_modules() if name.endswith("attn2")]
    assert len(keys) == 16 and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in keys)
    assert all(p.grad is None for p in run.comps.text_encoder.parameters())  # frozen text
    del run, unet, keys
    gc.collect()


def test_grounding_captures_all_16_layers_on_four_grids(sd2_small, prepared, tmp_path, monkeypatch):
    from cxrdiff.attention import AttentionCapture, layer_grid
    from cxrdiff.ground import GroundConfig, ground

    seen: list[tuple[int, tuple[int, int]]] = []
    original = AttentionCapture.add

    def add(self, probs, grid=None):  # probs: (batch, heads, hw, tokens); SD2's linear projections pass no grid
        seen.append((probs.shape[1], grid or layer_grid(probs.shape[2], self.latent_hw)))
        return original(self, probs, grid)

    monkeypatch.setattr(AttentionCapture, "add", add)
    result = ground(
        GroundConfig(
            model=sd2_small, out=tmp_path / "ground", data=prepared / "ms_cxr.parquet", limit=1, steps=2, window=2,
            batch_size=1, overlays=False,
        )
    )  # fmt: skip
    assert len(seen) == 2 * 16  # two steps, every cross-attention layer
    assert sorted({grid for _, grid in seen}) == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert sorted({heads for heads, _ in seen}) == [5, 10, 20]  # SD2's heads per level (64 channels each)
    assert 0.0 <= result["auc_roc"] <= 1.0
    heat = np.load(tmp_path / "ground" / "heatmaps.npz")
    (first,) = heat.files
    assert heat[first].shape == (RESOLUTION // 8, RESOLUTION // 8) and np.isfinite(heat[first]).all()  # latent grid
