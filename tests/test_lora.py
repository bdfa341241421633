"""`cxrdiff finetune --lora-rank R` on the tiny model: only the adapters train, the run folder's adapters load in
plain diffusers and give the merged model's image, exact resume, EMA of the adapters, a kept checkpoint's export,
the settings key and refused values."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_prepared import build_prepared, tiny_run, train_log, weights

from cxrdiff.errors import InputError, Stopped
from cxrdiff.finetune import FinetuneConfig, check_inputs, export_checkpoint, finetune, run_settings
from cxrdiff.finetune.lora import ADAPTERS_FILE, TrainingMode

RANK, ALPHA = 4, 8.0  # scale 2: an adapter file that dropped alpha would give another image


def _config(prepared: Path, model: Path, out: Path, **kw) -> FinetuneConfig:
    """LoRA adapters of rank 4 on both the UNet and the learnable text encoder; lr 1e-2, large, so that three
    steps move the adapters visibly."""
    lora = dict(frozen_text=False, lr=1e-2, lora_rank=RANK, lora_alpha=ALPHA, ema=True)
    return tiny_run(prepared, model, out, **{**lora, **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model):

    return build_prepared(tmp_path_factory.mktemp("prep") / "prepared", model=tiny_model)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, prepared, tiny_model):
    out = tmp_path_factory.mktemp("lora") / "run"
    return out, finetune(_config(prepared, tiny_model, out))


def _lora_parameters(module, targets, rank: int) -> int:
    """r × (in + out) for every Linear a target names: what LoRA adds (A: r × in, B: out × r)."""
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in module.named_modules()
        if any(name == t or name.endswith("." + t) for t in targets)
    )


def test_only_the_adapters_train_and_the_manifest_counts_them(lora_run, tiny_model):
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    out, result = lora_run
    assert result["text_encoder"] == "learnable" and result["steps"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training_mode"] == {
        "kind": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["to_q", "to_k", "to_v", "to_out.0"],
        "text_rank": 4, "text_alpha": 8.0, "text_targets": ["q_proj", "k_proj", "v_proj", "out_proj"],
    }  # fmt: skip
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    text = CLIPTextModel.from_pretrained(tiny_model / "text_encoder")
    # By hand for the tiny model: three transformer blocks at 32 channels (down 1, up 2) with 8 projections of
    # 32 → 32 (the text is 32 wide too): 3 × 8 × 4 × 64 = 6144; the mid block at 64 channels: attn1 4 × 4 × 128,
    # attn2 to_q and to_out 4 × 128, to_k and to_v 4 × (32 + 64): 2048 + 1024 + 768 = 3840. Text: 2 layers × 4
    # projections × 4 × 64 = 2048.
    assert _lora_parameters(unet, ("to_q", "to_k", "to_v", "to_out.0"), 4) == 6144 + 3840
    assert _lora_parameters(text, ("q_proj", "k_proj", "v_proj", "out_proj"), 4) == 2048
    base = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in text.parameters())
    assert manifest["parameters"]["unet"]["trainable"] == 9984
    assert manifest["parameters"]["text_encoder"]["trainable"] == 2048
    assert manifest["parameters"]["trainable"] == 12032 and manifest["parameters"]["total"] == base + 12032
    settings = manifest["settings"]
    assert (settings["lora_rank"], settings["lora_alpha"], settings["text_lora_rank"]) == (4, 8.0, 4)
    # the merged folder is the base architecture (no LoRA layers), with every projection moved
    merged, base_unet = weights(out / "unet"), weights(tiny_model / "unet")
    assert merged.keys() == base_unet.keys()
    moved = {k for k in merged if not torch.equal(merged[k], base_unet[k])}
    assert moved and all(any(f".{t}.weight" in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in moved)
    text_base = weights(tiny_model / "text_encoder")
    moved_text = {k for k, v in weights(out / "text_encoder").items() if not torch.equal(v, text_base[k])}
    assert moved_text and all(k.endswith("_proj.weight") for k in moved_text)
    assert (out / "unet_ema").is_dir()


def test_plain_diffusers_loads_the_adapters_and_gets_the_merged_models_image(lora_run, tiny_model):
    import torch
    from diffusers import StableDiffusionPipeline

    out, _ = lora_run
    adapters = _weights_file(out / ADAPTERS_FILE)
    assert {k.split(".")[0] for k in adapters} == {"unet", "text_encoder"}  # diffusers' LoRA format

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        prompt = "small left pleural effusion"
        return pipe(prompt, num_inference_steps=3, output_type="np", generator=generator).images[0]

    merged = image(StableDiffusionPipeline.from_pretrained(out, local_files_only=True, safety_checker=None))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True, safety_checker=None)
    base = image(pipe)
    pipe.load_lora_weights(out)
    with_adapters = image(pipe)
    assert np.abs(merged - with_adapters).max() * 255 <= 1.0  # within one grey level
    assert np.abs(merged - base).max() * 255 > 5.0  # the adapters change the image: the test can fail


def _weights_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def test_preempted_and_resumed_equals_uninterrupted(tmp_path, prepared, tiny_model, lora_run):
    import torch

    reference, _ = lora_run
    out = tmp_path / "run"
    config = _config(prepared, tiny_model, out, checkpoint_every=3)
    with pytest.raises(Stopped, match="stopped by a signal after step 2"):
        finetune(dataclasses.replace(config, stop_after_step=2))
    assert [r["step"] for r in train_log(out)] == [1, 2] and not (out / "manifest.json").exists()
    finetune(config)
    assert [r["loss"] for r in train_log(out)] == [r["loss"] for r in train_log(reference)]
    for part in ("unet", "text_encoder", "unet_ema"):
        a, b = weights(reference / part), weights(out / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    a, b = _weights_file(reference / ADAPTERS_FILE), _weights_file(out / ADAPTERS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_kept_checkpoint_exports_as_the_run_does(lora_run, tmp_path):
    import torch

    out, _ = lora_run
    exported = Path(export_checkpoint(out, 3, tmp_path / "step3")["out"])
    for part in ("unet", "text_encoder"):
        a, b = weights(out / part), weights(exported / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    a, b = _weights_file(out / ADAPTERS_FILE), _weights_file(exported / ADAPTERS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((exported / "manifest.json").read_text())["training_mode"]["rank"] == RANK


def test_a_finished_run_asked_for_another_rank_is_refused_with_exit_2(lora_run, prepared, tiny_model):
    out, _ = lora_run
    before = (out / "manifest.json").read_bytes()
    args = ["--data", str(prepared), "--base-model", str(tiny_model), "--out", str(out), "--learnable-text"]
    args += ["--steps", "3", "--batch-size", "4", "--per-device-batch-size", "2", "--lr", "0.01", "--ema"]
    args += ["--lora-rank", "8", "--lora-alpha", "8"]
    done = subprocess.run([sys.executable, "-m", "cxrdiff", "finetune", *args], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: --out {out}: holds a finished 'finetune' run made with other settings "
        "(lora_rank 4 → 8; text_lora_rank 4 → 8); choose a new folder"
    )
    assert (out / "manifest.json").read_bytes() == before


def test_the_settings_key(prepared, tiny_model, tmp_path):
    full_config = _config(prepared, tiny_model, tmp_path / "a", lora_rank=None, lora_alpha=None)
    full = run_settings(check_inputs(full_config).config)
    assert not any("lora" in k for k in full)  # full fine-tunes keep the key they had before LoRA existed
    same = _config(prepared, tiny_model, tmp_path / "b", lora_alpha=None)
    explicit = _config(prepared, tiny_model, tmp_path / "b", lora_alpha=float(RANK))
    assert run_settings(same) == run_settings(explicit)  # alpha's default is the rank: the same run
    frozen = run_settings(_config(prepared, tiny_model, tmp_path / "c", frozen_text=True))
    assert (frozen["text_lora_rank"], frozen["text_lora_alpha"]) == (None, None)
    other = run_settings(_config(prepared, tiny_model, tmp_path / "d", text_lora_rank=2, lora_alpha=None))
    assert (other["lora_alpha"], other["text_lora_rank"], other["text_lora_alpha"]) == (4.0, 2, 2.0)
    assert TrainingMode.of_config(_config(prepared, tiny_model, tmp_path / "d", text_lora_rank=2)).label() == (
        "LoRA r4, text r2"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lora_rank": 0}, "--lora-rank 0: must be at least 1"),
        ({"lora_alpha": 0.0}, "--lora-alpha 0.0: must be a finite number > 0"),
        ({"lora_dropout": 1.0}, r"--lora-dropout 1.0: must be a finite number in \[0, 1\)"),
        ({"lora_rank": None, "lora_alpha": 16.0}, r"--lora-alpha: needs --lora-rank"),
        ({"lora_rank": None, "lora_alpha": None, "lora_targets": ("to_q",)}, "--lora-target: needs --lora-rank"),
        ({"frozen_text": True, "text_lora_rank": 2}, r"--text-lora-rank: the text encoder is frozen"),
        ({"lora_targets": ("to_q", "to_qq")}, "--lora-target to_qq: no such module in the UNet of"),
        ({"lora_targets": ("attn1",)}, "--lora-target attn1: matches a Attention; LoRA adapts Linear and Conv2d"),
    ],
)
def test_bad_lora_values_are_refused_before_the_folder_is_made(prepared, tiny_model, tmp_path, change, message):
    with pytest.raises(InputError, match=message):
        finetune(_config(prepared, tiny_model, tmp_path / "run", **change))
    assert not (tmp_path / "run").exists()


def test_frozen_text_keeps_the_text_encoder_and_trains_the_unet_adapters_only(prepared, tiny_model, tmp_path):
    import torch

    out = tmp_path / "run"
    finetune(_config(prepared, tiny_model, out, frozen_text=True, steps=1, ema=False))
    base, text = weights(tiny_model / "text_encoder"), weights(out / "text_encoder")
    assert all(torch.equal(base[k], text[k]) for k in text)
    assert {k.split(".")[0] for k in _weights_file(out / ADAPTERS_FILE)} == {"unet"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["text_encoder"]["trainable"] == 0 and manifest["parameters"]["trainable"] == 9984
    assert "text_targets" not in manifest["training_mode"] and manifest["training_mode"]["text_rank"] is None


def test_sd2_base_adapter_counts_are_the_hand_computed_ones():
    """SD2-base's architecture on the meta device (nothing allocated). Per transformer block of width d, rank r:
    self-attention 4 projections d → d, 4 · r · 2d; cross-attention to_q and to_out 2 · r · 2d, to_k and to_v
    2 · r · (1024 + d): 14rd + 2048r. Blocks: 5 at 320, 5 at 640, 6 at 1280 (16): 14r · 12480 + 16 · 2048r =
    207,488r. The text encoder: 23 layers × 4 projections × r × 2048 = 188,416r."""
    from cxrdiff.finetune.lora import parameter_counts, set_trainable
    from cxrdiff.model.published import PUBLISHED, published_modules

    modules = published_modules("sd2-base")
    mode = TrainingMode("lora", 4, 4.0, 0.0, ("to_q", "to_k", "to_v", "to_out.0"), 4, 4.0)
    set_trainable(mode, modules["unet"], modules["text_encoder"], train_text=True, seed=0)
    counts = parameter_counts(modules["unet"], modules["text_encoder"])
    assert counts["unet"]["trainable"] == 207_488 * 4 and counts["text_encoder"]["trainable"] == 188_416 * 4
    base = PUBLISHED["sd2-base"]["parameters"]
    assert counts["total"] == base["unet"] + base["text_encoder"] + (207_488 + 188_416) * 4


def test_gradient_checkpointing_changes_memory_not_numbers(prepared, tiny_model, tmp_path, lora_run):
    """Adapters inside checkpointed blocks whose inputs need no gradient (frozen base weights) still learn: the
    losses after a step equal the plain run's."""
    out = tmp_path / "run"
    finetune(_config(prepared, tiny_model, out, steps=2, gradient_checkpointing=True))
    reference = [r["loss"] for r in train_log(lora_run[0])][:2]
    assert [r["loss"] for r in train_log(out)] == pytest.approx(reference, rel=1e-5)
