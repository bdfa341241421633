"""Model folders: the tiny model loads in plain diffusers, round-trips exactly, and bad folders are refused."""

import json
import shutil

import numpy as np
import pytest
import torch

from cxrdiff.errors import InputError
from cxrdiff.model.tiny import TinySpec, tiny_components
from cxrdiff.models import check_model_folder, load_components, save_components


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


def test_tokenizer_is_loaded_once_per_content(tiny_model, tmp_path):
    # a copy of the same files (every fine-tuned run carries one) reuses the loaded tokenizer; a changed
    # file is loaded afresh and behaves as changed
    from cxrdiff.text_encoders import load_tokenizer

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model / "tokenizer", copy)
    first = load_tokenizer(tiny_model / "tokenizer")
    assert load_tokenizer(copy) is first
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["model_max_length"] = 7
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    edited = load_tokenizer(copy)
    assert edited is not first
    assert (edited.model_max_length, first.model_max_length) == (7, 77)


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="model folder not found"):
        load_components(tmp_path / "stable-diffusion-2-base")


def test_model_tiny_refuses_a_step_folder(tmp_path):
    """`cxrdiff model tiny` over a finetune output would silently swap its weights under its manifest."""
    from cxrdiff.artifacts import write_manifest
    from cxrdiff.model.tiny import write_tiny_model_cli

    run = tmp_path / "run"
    run.mkdir()
    write_manifest(run, "finetune")
    with pytest.raises(InputError, match="'finetune' folder"):
        write_tiny_model_cli(run, 32, "32,64", 32, "epsilon", 0)
    assert not (run / "unet").exists()


def test_model_tiny_into_a_symlinked_folder_writes_through_the_link(tmp_path):
    """`--out` linked to another disk: the model lands in the target, the link stays, nothing is left beside."""
    from cxrdiff.model.tiny import write_tiny_model_cli

    disk = tmp_path / "disk" / "tiny"
    disk.mkdir(parents=True)
    link = tmp_path / "tiny"
    link.symlink_to(disk, target_is_directory=True)
    write_tiny_model_cli(link, 32, "32,64", 32, "epsilon", 0)
    assert link.is_symlink() and (disk / "model_index.json").is_file() and (disk / "unet").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "tiny"]
    assert sorted(p.name for p in disk.parent.iterdir()) == ["tiny"]


def test_model_tiny_refuses_an_existing_model_folder_keeping_its_weights(tiny_model, tmp_path):
    """Writing a tiny model over a model folder would swap the VAE under data prepared with it."""
    import subprocess
    import sys

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    before = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    done = subprocess.run([sys.executable, "-m", "cxrdiff", "model", "tiny", str(model), "--seed", "1"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == f"error: {model}: not empty; give a new folder for the tiny model\n"
    assert {p: p.read_bytes() for p in model.rglob("*") if p.is_file()} == before


def test_vae_fingerprint_sees_the_weights_not_only_their_sizes(tiny_model, tmp_path):
    import hashlib

    from cxrdiff.models import names_and_sizes_fingerprint, vae_fingerprint

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    config = (model / "vae" / "config.json").read_bytes()
    expected = hashlib.sha256(config)
    expected.update(f"diffusion_pytorch_model.safetensors:{hashlib.sha256(weights.read_bytes()).hexdigest()}".encode())
    assert vae_fingerprint(model) == "sha256+weights:" + expected.hexdigest() == vae_fingerprint(tiny_model)

    tiny_components(seed=1).vae.save_pretrained(model / "vae")  # another VAE of the same shapes
    assert weights.stat().st_size == (tiny_model / "vae" / weights.name).stat().st_size
    assert names_and_sizes_fingerprint(model) == names_and_sizes_fingerprint(tiny_model)  # all earlier versions saw
    assert vae_fingerprint(model) != vae_fingerprint(tiny_model)


# --- published architectures (`cxrdiff model random --like`) ----------------------------------
# The released folders' configs, typed here from the Hub's config files, and the released parameter counts.

SD2_BASE_UNET = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}
SD2_BASE_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD2_TEXT = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "vocab_size": 49408,
}
SD2_BASE_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
RELEASED_PARAMETERS = {  # (UNet, text encoder, VAE) of the released weights
    "sd2-base": (865_910_724, 340_387_840, 83_653_863),
    "sd2-768": (865_910_724, 340_387_840, 83_653_863),
    "sd15": (859_520_964, 123_060_480, 83_653_863),
}


def _check_fields(config, expected, part):
    for field, value in expected.items():
        got = config[field] if isinstance(config, dict) else getattr(config, field)
        got = list(got) if isinstance(got, tuple) else got
        assert got == (pytest.approx(value) if isinstance(value, float) else value), f"{part}.{field}"


@pytest.mark.parametrize("like", sorted(RELEASED_PARAMETERS))
def test_published_architectures_have_the_released_parameter_counts(like):
    from cxrdiff.model.published import published_modules
    from cxrdiff.models import parameter_counts

    counts = parameter_counts(published_modules(like))  # on the meta device: nothing allocated
    for part, released in zip(("unet", "text_encoder", "vae"), RELEASED_PARAMETERS[like], strict=True):
        assert abs(counts[part] - released) <= 0.001 * released, part


def test_sd2_base_configs_field_by_field():
    from cxrdiff.model.published import published_modules

    modules = published_modules("sd2-base")
    _check_fields(modules["unet"].config, SD2_BASE_UNET, "unet")
    _check_fields(modules["vae"].config, SD2_BASE_VAE, "vae")
    _check_fields(modules["text_encoder"].config, SD2_TEXT, "text_encoder")
    unet = modules["unet"]
    assert sum(name.endswith("attn2") for name, _ in unet.named_modules()) == 16  # cross-attention layers


def test_sd2_768_and_sd15_differ_from_sd2_base_where_released():
    from cxrdiff.model.published import PUBLISHED

    v = PUBLISHED["sd2-768"]
    assert v["unet"]["sample_size"] == 96 and v["vae"]["sample_size"] == 768
    assert v["scheduler"] == ("DDIMScheduler", {**SD2_BASE_SCHEDULER, "prediction_type": "v_prediction"})
    assert PUBLISHED["sd2-base"]["scheduler"] == ("PNDMScheduler", SD2_BASE_SCHEDULER)
    v1 = PUBLISHED["sd15"]
    assert v1["unet"]["attention_head_dim"] == 8 and v1["unet"]["cross_attention_dim"] == 768
    assert "use_linear_projection" not in v1["unet"]  # SD 1.x: convolutional projections
    assert v1["text_encoder"]["hidden_act"] == "quick_gelu" and v1["text_encoder"]["num_hidden_layers"] == 12
    assert (v1["pad_token"], PUBLISHED["sd2-base"]["pad_token"]) == ("<|endoftext|>", "!")


def test_fill_random_is_seeded_and_scaled():
    import torch
    from diffusers import UNet2DConditionModel

    from cxrdiff.model.published import fill_random

    def build(seed):
        with torch.device("meta"):
            unet = UNet2DConditionModel(
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=2,
                norm_num_groups=32,
            )
        return fill_random(unet, torch.Generator().manual_seed(seed))

    a, b, c = build(1), build(1), build(2)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert pa.device.type == "cpu" and torch.equal(pa, pb), name
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)
    assert torch.equal(a.conv_norm_out.weight, torch.ones(32)) and not a.conv_norm_out.bias.any()
    assert not a.conv_in.bias.any()
    fan_in = 4 * 3 * 3  # conv_in: 4 latent channels, 3×3 kernel
    assert a.conv_in.weight.std().item() == pytest.approx((3 * fan_in) ** -0.5, rel=0.1)


def test_model_random_refuses_a_non_empty_folder_and_an_unknown_architecture(tmp_path):
    from cxrdiff.model.published import write_random_model

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        write_random_model(tmp_path / "busy", "sd2-base")
    with pytest.raises(InputError, match="--like 'sd3'"):
        write_random_model(tmp_path / "new", "sd3")
    assert not (tmp_path / "new").exists() and (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_published_choices_match_the_cli():
    from typing import get_args

    from cxrdiff.choices import PublishedModel
    from cxrdiff.model.published import PUBLISHED

    assert set(get_args(PublishedModel)) == set(PUBLISHED)
