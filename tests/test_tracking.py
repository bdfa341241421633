"""`finetune --report-to`: TensorBoard's event file re-read from disk holds the logged scalars and the validation
image; a tracker that is not installed is refused with one line, exit 2, before the folder is claimed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from fixtures_prepared import build_prepared
from PIL import Image

from cxrdiff.artifacts import CLAIM
from cxrdiff.errors import InputError
from cxrdiff.finetune import FinetuneConfig, finetune
from cxrdiff.finetune.tracking import chosen_tracker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model):
    from cxrdiff.models import vae_fingerprint

    return build_prepared(tmp_path_factory.mktemp("prep") / "prepared", vae_fingerprint=vae_fingerprint(tiny_model))


def test_tensorboard_event_file_holds_the_scalars_and_the_validation_image(tmp_path, prepared, tiny_model):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    config = FinetuneConfig(data=prepared, base_model=tiny_model, out=out, frozen_text=True, steps=2, batch_size=2,
                            log_every=1, validation_prompts=("a chest x-ray",), validate_every=2, validation_steps=2,
                            report_to="tensorboard")  # fmt: skip
    finetune(config)
    # accelerate's run folder, logs/finetune: the run's events (its hyperparameters go to a sub-folder)
    acc = EventAccumulator(str(out / "logs" / "finetune"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    for tag in ("loss", "lr", "images_per_s", "memory_mb"):
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == [
            (r["step"], pytest.approx(r[tag], rel=1e-6)) for r in logged
        ], tag
    (image,) = acc.Images("validation")
    assert image.step == 2
    decoded = np.asarray(Image.open(BytesIO(image.encoded_image_string)).convert("RGB"))
    on_disk = np.asarray(Image.open(out / "validation" / "step-0000002" / "00.png").convert("RGB"))
    assert np.array_equal(decoded, on_disk)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_tracker_that_is_not_installed_is_refused_with_one_line_exit_2(tmp_path, prepared, tiny_model):
    with pytest.raises(InputError, match=r"--report-to wandb: wandb is not installed \(pip install 'cxrdiff\[track"):
        chosen_tracker("wandb", tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CI": "1"}
    args = ["finetune", "--data", str(prepared), "--base-model", str(tiny_model), "--out", str(out), "--frozen-text",
            "--steps", "1", "--batch-size", "2", "--report-to", "wandb"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "cxrdiff", *args], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --report-to wandb: wandb is not installed (pip install 'cxrdiff[track]'), or choose --report-to none"
    )
    assert not (out / "manifest.json").exists() and not (out / CLAIM).exists()


def test_wandb_runs_offline_unless_wandb_mode_is_set(tmp_path, monkeypatch):
    monkeypatch.setattr("cxrdiff.finetune.tracking.installed", lambda tracker: True)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    assert chosen_tracker("wandb", tmp_path) == "wandb"
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path / "logs")
    monkeypatch.setenv("WANDB_MODE", "online")
    chosen_tracker("wandb", tmp_path)
    assert os.environ["WANDB_MODE"] == "online"
    assert chosen_tracker("none", tmp_path) is None
    monkeypatch.setattr("cxrdiff.finetune.tracking.has_tensorboard", lambda: False)
    assert chosen_tracker("auto", tmp_path) is None  # today's behaviour: TensorBoard only when installed
