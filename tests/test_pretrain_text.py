"""`cxrdiff model pretrain-text`: contrastive pretraining of a tiny text encoder, its retrieval check, resume,
and the encoder in a tiny SD folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxrdiff.errors import InputError
from cxrdiff.model.pretrain import batch_index
from cxrdiff.model.pretrain_text import PretrainTextConfig, pretrain_text, retrieval_accuracy


def test_retrieval_accuracy_counts_identical_reports_and_exact_chance():
    texts = ["a", "a", "b", "c"]
    similarity = np.array(
        [
            [0.1, 0.9, 0.0, 0.0],  # image 0 → text 1, also "a": correct
            [0.0, 0.0, 0.8, 0.1],  # image 1 → "b": wrong
            [0.0, 0.0, 0.9, 0.1],  # image 2 → "b": correct
            [0.5, 0.0, 0.0, 0.4],  # image 3 → "a": wrong
        ]
    )
    result = retrieval_accuracy(similarity, texts)
    assert result["image_to_text_top1"] == 0.5
    assert result["chance"] == pytest.approx((2 / 4 + 2 / 4 + 1 / 4 + 1 / 4) / 4)
    assert result["distinct_texts"] == 3 and result["pairs"] == 4


def test_batches_cover_each_epoch_once_and_depend_on_seed_and_number_only():
    n, size = 10, 4  # two batches an epoch, two pairs left out of each epoch
    epoch = [set(batch_index(n, size, 3, k).tolist()) for k in (0, 1)]
    assert not epoch[0] & epoch[1] and all(len(b) == 4 for b in epoch)
    assert batch_index(n, size, 3, 5).tolist() == batch_index(n, size, 3, 5).tolist()
    assert batch_index(n, size, 3, 0).tolist() != batch_index(n, size, 4, 0).tolist()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from cxrdiff.phantom import PhantomConfig, make_phantom

    root = tmp_path_factory.mktemp("pt") / "phantom"
    make_phantom(PhantomConfig(root, patients=60, seed=5, size=64, dicom_fraction=0.0))
    return root


@pytest.mark.slow
def test_pretraining_lowers_the_loss_and_retrieves_above_chance(phantom, tmp_path):
    out = tmp_path / "pt"
    config = PretrainTextConfig(data=phantom, out=out, steps=150, batch_size=32, held_out=40, resolution=32)
    result = pretrain_text(config)
    losses = [float(line.split(",")[1]) for line in (out / "losses.csv").read_text().splitlines()[1:]]
    assert len(losses) == 150
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 0.3
    manifest = json.loads((out / "manifest.json").read_text())
    retrieval = manifest["retrieval"]
    assert retrieval["pairs"] >= 40 and result["retrieval_top1"] == retrieval["image_to_text_top1"]
    assert retrieval["image_to_text_top1"] > 2 * retrieval["chance"]
    assert (out / "text_encoder" / "model.safetensors").is_file() and not (out / "checkpoint.pt").exists()
    # the same settings again: finished, returned at once; another setting: refused, naming it
    assert pretrain_text(config) == result
    with pytest.raises(InputError, match="steps 150 → 151"):
        pretrain_text(PretrainTextConfig(data=phantom, out=out, steps=151, batch_size=32, held_out=40, resolution=32))


def test_an_interrupted_run_resumes_to_the_same_weights(phantom, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from cxrdiff.model import pretrain_text as module

    def config(out: Path) -> PretrainTextConfig:
        return PretrainTextConfig(
            data=phantom, out=out, steps=4, batch_size=8, held_out=10, max_pairs=40, resolution=32, checkpoint_every=2
        )

    pretrain_text(config(tmp_path / "whole"))
    real_loss, calls = module.contrastive_loss, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(module, "contrastive_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain_text(config(tmp_path / "cut"))
    assert (tmp_path / "cut" / "checkpoint.pt").is_file() and not (tmp_path / "cut" / "manifest.json").exists()
    monkeypatch.setattr(module, "contrastive_loss", real_loss)
    pretrain_text(config(tmp_path / "cut"))
    whole = load_file(tmp_path / "whole" / "text_encoder" / "model.safetensors")
    cut = load_file(tmp_path / "cut" / "text_encoder" / "model.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)


def test_too_few_pairs_is_one_line_naming_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no mimic-cxr-2.0.0-metadata"):
        pretrain_text(PretrainTextConfig(data=tmp_path / "empty", out=tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_the_pretrained_encoder_goes_into_a_tiny_sd_folder_that_diffusers_loads(phantom, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from cxrdiff.cli import app

    pretrained = tmp_path / "pt"
    runner = CliRunner()
    small = ["--steps", "3", "--batch-size", "8", "--held-out", "10", "--max-pairs", "40", "--resolution", "32"]
    result = runner.invoke(app, ["model", "pretrain-text", str(phantom), str(pretrained), *small])
    assert result.exit_code == 0, result.output
    model = tmp_path / "model"
    result = runner.invoke(app, ["model", "tiny", str(model), "--resolution", "32", "--text-encoder", str(pretrained)])
    assert result.exit_code == 0, result.output
    trained = load_file(pretrained / "text_encoder" / "model.safetensors")
    placed = load_file(model / "text_encoder" / "model.safetensors")
    assert all(torch.equal(trained[k], placed[k]) for k in trained)
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, local_files_only=True)
    image = pipe("left pleural effusion", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    wrong = runner.invoke(
        app, ["model", "tiny", str(tmp_path / "m2"), "--text-width", "64", "--text-encoder", str(pretrained)]
    )
    # the CLI's entry point turns this InputError into one line and exit code 2 (tests/test_cli.py checks that)
    assert isinstance(wrong.exception, InputError) and "width 32 does not match --text-width 64" in str(wrong.exception)
    assert not (tmp_path / "m2").exists()


def test_pairs_are_prepares_training_rows(phantom_tree, phantom_prepared):
    """Pretraining reads exactly the images prepare trains on: no p19 patient, no MS-CXR image (the grounding
    test set), impressions only, longer than 7 characters."""
    import pandas as pd

    from cxrdiff.model.pretrain_text import read_pairs

    pairs = read_pairs(phantom_tree, 64, phantom_tree / "MS_CXR_Local_Alignment_v1.0.0.csv")
    trained = pd.concat([pd.read_parquet(p, columns=["dicom_id", "impression"])
                         for p in sorted(phantom_prepared.glob("train-*.parquet"))])  # fmt: skip
    ms_cxr = set(pd.read_csv(phantom_tree / "MS_CXR_Local_Alignment_v1.0.0.csv", dtype=str)["dicom_id"])
    assert sorted(pairs.dicom_ids) == sorted(trained["dicom_id"]) and not set(pairs.dicom_ids) & ms_cxr
    assert dict(zip(pairs.dicom_ids, pairs.texts, strict=True)) == dict(
        zip(trained["dicom_id"], trained["impression"], strict=True)
    )
    assert not any(str(s).startswith("19") for s in pairs.subjects)
