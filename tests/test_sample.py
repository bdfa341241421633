"""`cxrdiff sample`: pixels equal plain diffusers per image, independent of batching and sharding, resumable."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cxrdiff.artifacts import CLAIM, read_manifest, write_manifest
from cxrdiff.data import LABELS
from cxrdiff.errors import InputError
from cxrdiff.sample import SampleConfig, image_seed, sample

STEPS = 3
PROMPTS = ["small left pleural effusion", "cardiomegaly without edema", "no acute cardiopulmonary process"]
CXRDIFF = Path(sys.executable).with_name("cxrdiff")


def _test_parquet(path, column="impression"):
    rng = np.random.default_rng(0)
    labels = rng.choice([1.0, 0.0, -1.0, np.nan], size=(len(PROMPTS), len(LABELS))).astype(np.float32)
    columns = {
        "dicom_id": [f"d{i}" for i in range(len(PROMPTS))],
        "subject_id": pa.array([19000000 + i for i in range(len(PROMPTS))], pa.int64()),
        "study_id": pa.array([50000000 + i for i in range(len(PROMPTS))], pa.int64()),
        column: PROMPTS,
        **{name: pa.array(labels[:, j]) for j, name in enumerate(LABELS)},
    }
    pq.write_table(pa.table(columns), path)
    return path, labels


def _grey(folder, names):
    return np.stack([np.asarray(Image.open(Path(folder) / n)) for n in names])


@pytest.fixture(scope="module")
def prompts_parquet(tmp_path_factory):
    return _test_parquet(tmp_path_factory.mktemp("prepared") / "test.parquet")


@pytest.fixture(scope="module")
def reference_run(tiny_model, prompts_parquet, tmp_path_factory):
    """2 prompts (of 3, --limit) × 2 images, batch 3, PLMS: the run the other tests compare with."""
    out = tmp_path_factory.mktemp("samples") / "ref"
    config = SampleConfig(
        model=tiny_model, out=out, prompts=prompts_parquet[0], n_per_prompt=2, steps=STEPS, batch_size=3, limit=2
    )
    result = sample(config)
    return config, result


def _plain_diffusers(model, scheduler, rows):
    """What a user without cxrdiff runs to regenerate rows of samples.parquet (the README snippet)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = {
        "pndm": lambda c: PNDMScheduler.from_config(c, skip_prk_steps=True),
        "ddim": lambda c: DDIMScheduler.from_config(c, clip_sample=False),
        "dpm": DPMSolverMultistepScheduler.from_config,
    }[scheduler](pipe.scheduler.config)
    images = []
    for row in rows:
        image = pipe(
            row["prompt"],
            negative_prompt="",
            generator=torch.Generator().manual_seed(row["seed"]),
            num_inference_steps=row["steps"],
            guidance_scale=row["guidance"],
            output_type="np",
        ).images[0]  # (height, width, 3) in [0, 1]
        images.append(np.round(image.mean(axis=-1) * 255).astype(np.uint8))
    return np.stack(images)


def test_image_seed_follows_the_documented_rule():
    digest = hashlib.sha256(b"cxrdiff-sample:7:12:3").digest()
    assert image_seed(7, 12, 3) == int.from_bytes(digest[:8], "big") >> 1
    seeds = {image_seed(s, p, r) for s in range(2) for p in range(20) for r in range(4)}
    assert len(seeds) == 160 and all(0 <= s < 2**63 for s in seeds)


def test_table_and_manifest_describe_every_image(reference_run, prompts_parquet, tiny_model):
    config, result = reference_run
    parquet, labels = prompts_parquet
    assert result["complete"] and result["images"] == 4 and result["generated"] == 4
    table = pq.read_table(config.out / "samples.parquet").to_pylist()
    assert [r["index"] for r in table] == [0, 1, 2, 3]
    assert [r["file"] for r in table] == ["000000.png", "000001.png", "000002.png", "000003.png"]
    assert [(r["prompt_index"], r["repeat"]) for r in table] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["prompt"] for r in table] == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert [r["seed"] for r in table] == [image_seed(0, p, r) for p, r in ((0, 0), (0, 1), (1, 0), (1, 1))]
    assert [r["dicom_id"] for r in table] == ["d0", "d0", "d1", "d1"]
    assert [r["study_id"] for r in table] == [50000000, 50000000, 50000001, 50000001]
    got = np.array([[r[name] for name in LABELS] for r in table], dtype=np.float32)
    np.testing.assert_array_equal(got, labels[[0, 0, 1, 1]])
    assert {(r["scheduler"], r["steps"], r["guidance"], r["dtype"]) for r in table} == {("pndm", STEPS, 4.0, "no")}
    assert {r["model"] for r in table} == {str(Path(tiny_model).resolve())}
    manifest = read_manifest(config.out, "sample")
    assert set(manifest["files"]) == {r["file"] for r in table} | {"samples.parquet"}
    assert manifest["scheduler_class"] == "PNDMScheduler" and manifest["config"]["limit"] == 2
    images = _grey(config.out, [r["file"] for r in table])
    assert images.shape == (4, 64, 64) and images.dtype == np.uint8
    assert np.abs(images[0].astype(int) - images[1]).max() > 0  # repeats differ


@pytest.mark.parametrize("scheduler", ["pndm", "ddim"])
def test_pixels_equal_plain_diffusers(scheduler, reference_run, tiny_model, tmp_path):
    if scheduler == "pndm":
        out = reference_run[0].out
    else:
        out = tmp_path / scheduler
        sample(
            SampleConfig(model=tiny_model, out=out, prompt=PROMPTS[2], n_per_prompt=2, steps=STEPS, scheduler=scheduler)
        )
    rows = pq.read_table(out / "samples.parquet").to_pylist()
    assert {r["scheduler"] for r in rows} == {scheduler}
    ours = _grey(out, [r["file"] for r in rows]).astype(int)
    theirs = _plain_diffusers(tiny_model, scheduler, rows).astype(int)
    assert np.abs(ours - theirs).max() <= 1
    assert ours.std() > 1  # not a blank image that would match anything


def test_batch_size_and_shards_do_not_change_images(reference_run, tmp_path):
    """The reference ran in one batch of 3 (+1); here shard 0 runs alone (batch 1), shard 1 as a batch of 2."""
    config, _ = reference_run
    names = [f"{i:06d}.png" for i in range(4)]
    split = tmp_path / "shards"
    first = sample(replace(config, out=split, batch_size=1), shard=(0, 2))
    assert first["generated"] == 2 and not first["complete"] and not (split / "samples.parquet").exists()
    assert sorted(p.name for p in split.glob("*.png")) == ["000000.png", "000002.png"]
    second = sample(replace(config, out=split, batch_size=2), shard=(1, 2))
    assert second["generated"] == 2 and second["complete"]
    assert np.abs(_grey(split, names).astype(int) - _grey(config.out, names)).max() <= 1
    pd.testing.assert_frame_equal(
        pd.read_parquet(split / "samples.parquet"), pd.read_parquet(config.out / "samples.parquet")
    )


def test_half_finished_folder_completes_without_redoing(reference_run, tmp_path):
    config, _ = reference_run
    out = tmp_path / "killed"
    shutil.copytree(config.out, out)
    manifest = read_manifest(out, "sample")  # a killed run has its claim, not yet a manifest
    claim = {"step": "sample", "key": manifest["settings_key"], "settings": manifest["settings"]}
    (out / CLAIM).write_text(json.dumps(claim))
    for name in ("000001.png", "000003.png", "samples.parquet", "manifest.json"):
        (out / name).unlink()
    (out / ".000001.png.tmp-99999").write_bytes(b"half a png")  # what a killed writer leaves
    old = 1_000_000_000
    for name in ("000000.png", "000002.png"):
        os.utime(out / name, (old, old))
    result = sample(replace(config, out=out))
    assert (result["generated"], result["skipped"], result["complete"]) == (2, 2, True)
    assert all((out / n).stat().st_mtime == old for n in ("000000.png", "000002.png"))
    names = [f"{i:06d}.png" for i in range(4)]
    assert np.abs(_grey(out, names).astype(int) - _grey(config.out, names)).max() <= 1
    assert not list(out.glob(".*tmp-*"))
    read_manifest(out, "sample")
    again = sample(replace(config, out=out))  # a finished run: nothing to do
    assert (again["generated"], again["skipped"]) == (0, 4)


def test_refuses_to_mix_settings_or_folder_kinds(reference_run, tmp_path, tiny_model):
    config, _ = reference_run
    with pytest.raises(InputError, match=r"other settings \(steps 3 → 4\)"):
        sample(replace(config, steps=4))
    wrong = tmp_path / "prepared"
    write_manifest(wrong, "prepare")
    with pytest.raises(InputError, match="this is a 'prepare' folder, expected 'sample'"):
        sample(SampleConfig(model=tiny_model, out=wrong, prompt="x"))
    with pytest.raises(InputError, match="this is a 'prepare' folder, expected 'finetune'"):
        sample(SampleConfig(model=wrong, out=tmp_path / "o", prompt="x"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(InputError, match="no prompts"):
        sample(SampleConfig(model=tiny_model, out=tmp_path / "o", prompts_file=tmp_path / "empty.txt"))


def test_a_model_rebuilt_in_place_is_another_input(tmp_path):
    """`rm -rf base; cxrdiff model tiny base --seed 7`: same path, same sizes; the unfinished (or finished)
    sample folder of the old model is refused, not resumed with the new one's images."""
    from cxrdiff.model.tiny import write_tiny_model

    model = tmp_path / "base"
    write_tiny_model(model, seed=0)
    config = SampleConfig(model=model, out=tmp_path / "s", prompt="effusion", n_per_prompt=1, steps=1)
    sample(config)
    shutil.rmtree(model)
    write_tiny_model(model, seed=7)
    with pytest.raises(InputError, match=r"other settings \(model "):
        sample(config)


def test_prompts_file_one_per_line(tiny_model, tmp_path):
    (tmp_path / "p.txt").write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    result = sample(SampleConfig(model=tiny_model, out=tmp_path / "o", prompts_file=tmp_path / "p.txt", steps=1))
    rows = pq.read_table(tmp_path / "o" / "samples.parquet").to_pylist()
    assert result["images"] == 2 and [r["prompt"] for r in rows] == PROMPTS[:2]
    assert "dicom_id" not in rows[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "{tmp}/o"], "give exactly one prompt source"),
        (["--out", "{tmp}/o", "--prompt", "a", "--prompts-file", "{tmp}/p.txt"], "got --prompts-file, --prompt"),
        (["--model", "{tmp}/nowhere", "--out", "{tmp}/o", "--prompt", "a"], "model folder not found"),
        (["--out", "{tmp}/o", "--prompts", "{tmp}/bad.parquet"], "no 'impression' column"),
        (["--out", "{tmp}/o", "--prompt", "a", "--steps", "2000"], "--steps 2000: above the 1000 steps the scheduler"),
    ],
)
def test_cli_errors_exit_2_with_one_line(args, message, tiny_model, tmp_path):
    _test_parquet(tmp_path / "bad.parquet", column="report")
    argv = [a.format(tmp=tmp_path) for a in args]
    if "--model" not in argv:
        argv = ["--model", str(tiny_model), *argv]
    proc = subprocess.run([str(CXRDIFF), "sample", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()


def test_cli_wires_options_and_prints_json(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from cxrdiff.cli import app

    argv = ["--json", "sample", "--model", str(tiny_model), "--out", str(tmp_path / "o"), "--prompt", "a"]
    result = CliRunner().invoke(
        app, [*argv, "--steps", "1", "--scheduler", "dpm", "--seed", "5", "--n-per-prompt", "2"]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout[result.stdout.index("{") :])
    assert printed["complete"] and printed["images"] == 2
    rows = pq.read_table(tmp_path / "o" / "samples.parquet").to_pylist()
    assert [(r["scheduler"], r["steps"], r["seed"]) for r in rows] == [("dpm", 1, image_seed(5, 0, r)) for r in (0, 1)]
    assert read_manifest(tmp_path / "o", "sample")["scheduler_class"] == "DPMSolverMultistepScheduler"


def test_prompt_column_picks_the_text(tmp_path):
    from cxrdiff.sample import read_prompts

    path, labels = _test_parquet(tmp_path / "test.parquet", column="findings")
    read = read_prompts(SampleConfig(prompts=path, prompt_column="findings"))
    assert read.texts == PROMPTS and read.extra["dicom_id"] == ["d0", "d1", "d2"]
    np.testing.assert_array_equal(np.array(read.extra["Edema"], dtype=np.float32), labels[:, LABELS.index("Edema")])
    with pytest.raises(InputError, match=r"no 'impression' column \(has: dicom_id, subject_id, study_id, findings"):
        read_prompts(SampleConfig(prompts=path))


def test_prompts_longer_than_the_context_are_marked_truncated(tiny_model, tmp_path):
    long = " ".join(["small left pleural effusion"] * 20)  # 80 words: well over CLIP's 77 positions
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{long}\nsmall left pleural effusion\n")
    out = tmp_path / "out"
    sample(SampleConfig(model=tiny_model, out=out, prompts_file=prompts, steps=1, batch_size=2))
    table = pq.read_table(out / "samples.parquet").to_pylist()
    assert [r["truncated"] for r in table] == [True, False]
    assert read_manifest(out, "sample")["prompts_over_context"] == 1
