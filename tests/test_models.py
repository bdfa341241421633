"""Model folders: the tiny model loads in plain diffusers, round-trips exactly, and bad folders are refused."""

import json
import shutil

import numpy as np
import pytest
import torch

from cxrdiff.errors import InputError
from cxrdiff.models import (
    TinySpec,
    check_model_folder,
    load_components,
    save_components,
    tiny_components,
)


def _generate(folder, seed=0):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "small left pleural effusion",
        num_inference_steps=3,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    )
    return out.images[0]


def test_tiny_model_generates_offline_in_plain_diffusers(tiny_model):
    image = _generate(tiny_model)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    index = json.loads((tiny_model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]


def test_save_load_round_trip_gives_identical_outputs(tiny_model, tmp_path):
    comps = load_components(tiny_model)
    assert comps.resolution == 64 and comps.latent_shape == (4, 16, 16)
    assert comps.prediction_type == "epsilon" and comps.scaling_factor == pytest.approx(0.18215)
    save_components(comps, tmp_path / "copy")
    assert np.array_equal(_generate(tiny_model, seed=3), _generate(tmp_path / "copy", seed=3))
    again = load_components(tmp_path / "copy")
    for a, b in zip(comps.unet.state_dict().values(), again.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_same_seed_same_weights_and_v_prediction():
    a = tiny_components(TinySpec(prediction_type="v_prediction"), seed=1)
    b = tiny_components(TinySpec(prediction_type="v_prediction"), seed=1)
    c = tiny_components(TinySpec(), seed=2)
    assert a.prediction_type == "v_prediction"
    wa, wb, wc = (next(iter(x.unet.parameters())) for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: shutil.rmtree(p / "unet"), "missing the unet/ folder"),
        (lambda p: (p / "model_index.json").unlink(), "no model_index.json"),
        (lambda p: (p / "scheduler" / "scheduler_config.json").unlink(), "missing scheduler_config.json"),
        (lambda p: [f.unlink() for f in (p / "vae").glob("*.safetensors")], "no weight file"),
        (lambda p: (p / "model_index.json").write_text("{"), "not valid JSON"),
    ],
)
def test_malformed_folder_is_a_one_line_error(tiny_model, tmp_path, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    damage(broken)
    with pytest.raises(InputError, match=message) as info:
        check_model_folder(broken)
    assert "\n" not in str(info.value) and str(broken) in str(info.value)


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="model folder not found"):
        load_components(tmp_path / "stable-diffusion-2-base")


def test_model_tiny_refuses_a_step_folder(tmp_path):
    """`cxrdiff model tiny` over a finetune output would silently swap its weights under its manifest."""
    from cxrdiff.artifacts import write_manifest
    from cxrdiff.models import write_tiny_model_cli

    run = tmp_path / "run"
    run.mkdir()
    write_manifest(run, "finetune")
    with pytest.raises(InputError, match="'finetune' folder"):
        write_tiny_model_cli(run, 32, "32,64", 32, "epsilon", 0)
    assert not (run / "unet").exists()
