"""`cxrdiff finetune` on the tiny model and a synthetic prepared folder: what trains, what stays frozen,
exact resume after a preemption signal, the UCG rule, batch arithmetic, and refused inputs."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_prepared import PINNED_FROZEN_LOSSES, build_prepared, tiny_run, train_log, weights

from cxrdiff.artifacts import OtherSettings, StepFolder, manifest_hash
from cxrdiff.config import load_config
from cxrdiff.data import LABELS
from cxrdiff.errors import InputError, RunError, Stopped
from cxrdiff.finetune import (
    FinetuneConfig,
    TrainData,
    TrainingText,
    batch_plan,
    check_inputs,
    finetune,
    run_settings,
)


def _fingerprint(model: Path) -> str:
    from cxrdiff.models import vae_fingerprint

    return vae_fingerprint(model)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model):
    return build_prepared(tmp_path_factory.mktemp("prep") / "prepared", model=tiny_model)


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory, prepared, tiny_model):
    out = tmp_path_factory.mktemp("frozen") / "run"
    return out, finetune(tiny_run(prepared, tiny_model, out))


@pytest.fixture(scope="module")
def learnable_run(tmp_path_factory, prepared, tiny_model):
    out = tmp_path_factory.mktemp("learnable") / "run"
    return out, finetune(tiny_run(prepared, tiny_model, out, frozen_text=False, steps=4, ema=True))


# --- batch arithmetic and data order ---------------------------------------------------------


def test_batch_plan_splits_the_global_batch():
    assert batch_plan(256, None, 16) == (16, 1)  # the paper: 16 per GPU on 16 GPUs
    assert batch_plan(256, None, 1) == (16, 16)
    assert batch_plan(256, 8, 4) == (8, 8)
    assert batch_plan(80, None, 2) == (10, 4)  # 16 does not divide 40: the largest divisor below it
    with pytest.raises(InputError, match="not divisible by the 3 processes"):
        batch_plan(256, None, 3)
    with pytest.raises(InputError, match="per-device 5"):
        batch_plan(12, 5, 1)


def test_ranks_read_disjoint_parts_and_the_global_batch_does_not_depend_on_the_split(prepared):
    one = TrainData(prepared, (4, 16, 16), seed=3, rank=0, world=1, with_logvar=True)
    two = [TrainData(prepared, (4, 16, 16), seed=3, rank=r, world=2, with_logvar=True) for r in (0, 1)]
    try:
        for step in range(8):  # 8 × 4 samples crosses the 24-row epoch boundary
            single = np.concatenate([one.micro_batch(step, a, 2, 4)[0] for a in (0, 1)])
            split = [d.micro_batch(step, 0, 2, 4) for d in two]
            assert sorted(single) == sorted(np.concatenate([s[0] for s in split]))
            assert not set(split[0][0]) & set(split[1][0])
        epoch0 = np.concatenate([one.micro_batch(s, a, 2, 4)[0] for s in range(6) for a in (0, 1)])
        assert sorted(epoch0) == list(range(24))  # every row exactly once per epoch
        rows, stored = one.micro_batch(0, 0, 2, 4)
        assert stored.shape == (2, 2, 4, 16, 16)
        import pyarrow.parquet as pq

        from cxrdiff.data import latent_from_bytes

        table = [r for shard in sorted(prepared.glob("train-*.parquet")) for r in pq.read_table(shard).to_pylist()]
        for i, row in enumerate(rows):
            for c, column in enumerate(("latent_mean", "latent_logvar")):
                expected = latent_from_bytes(table[row][column], table[row]["latent_shape"])
                assert np.array_equal(stored[i, c], expected)
    finally:
        one.close()
        for d in two:
            d.close()


# --- prompts and unconditional guidance --------------------------------------------------------


def test_ucg_drops_only_no_finding_only_samples_at_the_configured_rate(prepared):
    data = TrainData(prepared, (4, 16, 16), seed=0, rank=0, world=1, with_logvar=False)
    prompts = TrainingText("impression", data.impressions, data.labels, 0.3)
    rng = np.random.default_rng(0)
    eligible = dropped = 0
    try:
        for step in range(1500):
            rows, _ = data.micro_batch(step, 0, 4, 4)
            texts, elig, drop = prompts.batch(rows, rng)
            finding = data.labels[rows][:, [i for i, n in enumerate(LABELS) if n != "No Finding"]] == 1
            assert not (drop & finding.any(axis=1)).any()  # never for a sample with a finding
            assert all((t == "") == d for t, d in zip(texts, drop, strict=True))
            eligible, dropped = eligible + elig.sum(), dropped + drop.sum()
    finally:
        data.close()
    assert eligible == 1500 * 4 * 2 // 3  # two rows in three are No Finding only (some with uncertain devices)
    assert 0.28 < dropped / eligible < 0.32  # 4000 draws: the std of the rate is 0.007


def test_prompt_sources(tmp_path):
    labels = np.full((3, len(LABELS)), np.nan, np.float32)
    labels[0, LABELS.index("Cardiomegaly")] = labels[0, LABELS.index("Edema")] = 1.0
    labels[1, LABELS.index("No Finding")] = 1.0
    rng = np.random.default_rng(0)
    by_labels = TrainingText("labels", ["a", "b", "c"], labels, 0.0)
    orders = [by_labels.text(0, rng) for _ in range(40)]  # class names in random order, space-joined
    assert set(orders) == {"Cardiomegaly Edema", "Edema Cardiomegaly"}
    assert 10 < orders.count("Edema Cardiomegaly") < 30  # 40 fair coin flips
    assert by_labels.text(1, rng) == "No Finding"
    csv = tmp_path / "alt.csv"
    csv.write_text("label,text\nCardiomegaly,big heart\nCardiomegaly,enlarged heart\nNo Finding,normal chest\n")
    source = TrainingText(f"file:{csv}", ["a", "b", "c"], labels, 0.0)
    assert {source.text(0, rng) for _ in range(50)} == {"big heart", "enlarged heart"}
    assert source.text(1, rng) == "normal chest"
    assert source.text(2, rng) == "normal chest"  # no positive label: read as normal
    csv.write_text("label,text\nHeart,big heart\n")
    with pytest.raises(InputError, match="unknown label"):
        TrainingText(f"file:{csv}", [], labels, 0.0)
    with pytest.raises(InputError, match="expected impression, labels or file:PATH"):
        TrainingText("findings", [], labels, 0.0)


# --- input checks ------------------------------------------------------------------------------


def test_mismatched_or_incomplete_inputs_are_refused_before_training(tmp_path, tiny_model, prepared):
    with pytest.raises(InputError, match="--frozen-text .* or --learnable-text"):
        finetune(tiny_run(prepared, tiny_model, tmp_path / "a", frozen_text=None))
    small = build_prepared(tmp_path / "small", n=3, latent_shape=(4, 8, 8), resolution=32)
    with pytest.raises(InputError, match=r"latents \[4, 8, 8\] at 32 px do not fit"):
        finetune(tiny_run(small, tiny_model, tmp_path / "b"))
    other = build_prepared(tmp_path / "other", n=3, scaling_factor=0.13025)
    with pytest.raises(InputError, match="scaling factor 0.13025 differs"):
        finetune(tiny_run(other, tiny_model, tmp_path / "c"))
    if _fingerprint(tiny_model) is not None:
        foreign = build_prepared(tmp_path / "foreign", n=3, vae_fingerprint="sha256:another-vae")
        with pytest.raises(InputError, match="different VAE"):
            finetune(tiny_run(foreign, tiny_model, tmp_path / "d"))
    with pytest.raises(InputError, match="this is a 'prepare' folder, expected 'finetune'"):
        finetune(tiny_run(prepared, tiny_model, prepared))
    with pytest.raises(InputError, match="not per-device 2 × 1 processes × an integer"):
        finetune(tiny_run(prepared, tiny_model, tmp_path / "e", batch_size=3))
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_cli_exit_code_and_message_for_a_missing_choice(tmp_path, tiny_model, prepared):
    cmd = [sys.executable, "-m", "cxrdiff", "finetune", "--data", str(prepared), "--base-model", str(tiny_model)]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "choose --frozen-text (Finetune_F) or --learnable-text (Finetune_L)" in done.stderr


# --- training ----------------------------------------------------------------------------------


def test_frozen_keeps_the_text_encoder_bit_identical_and_trains_the_unet(frozen_run, tiny_model):
    import torch

    out, result = frozen_run
    assert result["text_encoder"] == "frozen" and result["weights"] == "raw" and result["steps"] == 3
    base_text, text = weights(tiny_model / "text_encoder"), weights(out / "text_encoder")
    assert base_text.keys() == text.keys() and all(torch.equal(base_text[k], text[k]) for k in text)
    base_unet, unet = weights(tiny_model / "unet"), weights(out / "unet")
    assert any(not torch.equal(base_unet[k], unet[k]) for k in unet)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == "finetune" and manifest["text_encoder"] == "frozen" and manifest["weights"] == "raw"
    assert manifest["global_batch_size"] == 4 and manifest["gradient_accumulation_steps"] == 2
    assert set(manifest["inputs"]) == {"data", "base_model"}


def test_losses_are_pinned_for_a_fixed_seed(frozen_run):
    out, result = frozen_run
    log = train_log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert [r["loss"] for r in log] == pytest.approx(PINNED_FROZEN_LOSSES, rel=1e-4)
    assert result["final_loss"] == pytest.approx(PINNED_FROZEN_LOSSES[-1], rel=1e-4)
    assert all(r["lr"] == 5e-5 and r["text_lr"] is None and r["images_per_s"] > 0 for r in log)
    seen = np.random.default_rng([0, 0]).permutation(24)[:12]  # epoch 0's order (seed 0), 3 steps × 4
    assert sum(r["ucg_eligible"] for r in log) == sum(row % 3 != 2 for row in seen)  # fixture: No Finding only


def test_output_loads_in_diffusers_and_checkpoints_are_pruned(frozen_run):
    import torch
    from diffusers import StableDiffusionPipeline

    out, _ = frozen_run
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("small left pleural effusion", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]


def test_rerunning_a_finished_run_does_nothing(frozen_run, prepared, tiny_model, monkeypatch):
    monkeypatch.setattr("cxrdiff.models.load_components", _no_load)
    out, result = frozen_run
    before = (out / "train_log.jsonl").read_text()
    assert finetune(tiny_run(prepared, tiny_model, out)) == {
        "out": str(out),
        **{k: result[k] for k in result if k != "out"},
    }
    assert (out / "train_log.jsonl").read_text() == before


def test_learnable_trains_both(learnable_run, tiny_model):
    import torch

    out, result = learnable_run
    assert result["text_encoder"] == "learnable"
    for part in ("unet", "text_encoder"):
        base, new = weights(tiny_model / part), weights(out / part)
        assert any(not torch.equal(base[k], new[k]) for k in new), part
    assert (out / "unet_ema").is_dir()  # the EMA weights beside the raw ones the folder holds
    assert json.loads((out / "manifest.json").read_text())["weights"] == "raw"


@pytest.mark.slow
def test_preempted_and_resumed_equals_uninterrupted(tmp_path, prepared, tiny_model, learnable_run):
    import torch

    reference, _ = learnable_run
    out = tmp_path / "run"
    config = tiny_run(prepared, tiny_model, out, frozen_text=False, steps=4, ema=True, checkpoint_every=3)
    with pytest.raises(Stopped, match="stopped by a signal after step 2"):
        finetune(FinetuneConfig(**{**config.__dict__, "stop_after_step": 2}))
    assert [r["step"] for r in train_log(out)] == [1, 2]
    assert (out / "checkpoints" / "step-0000002" / "state.json").is_file()
    assert not (out / "manifest.json").exists()
    finetune(config)
    for part in ("unet", "text_encoder", "unet_ema"):
        a, b = weights(reference / part), weights(out / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert [r["loss"] for r in train_log(out)] == [r["loss"] for r in train_log(reference)]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_state(tmp_path, tiny_model):
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    bad = build_prepared(tmp_path / "bad", n=4, fill=float("nan"), model=tiny_model)
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"loss is nan at step 1; the last good state \(step 0\)"):
        finetune(tiny_run(bad, tiny_model, out, steps=2, batch_size=2))
    state = json.loads((out / "checkpoints" / "step-0000000" / "state.json").read_text())
    assert state["step"] == 0 and state["samples_seen"] == 0
    assert not (out / "manifest.json").exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's SIGTERM/SIGUSR1 handlers are gone


@pytest.mark.slow
def test_cli_run_with_v_prediction_ema_export_min_snr_and_validation(tmp_path, prepared):
    from cxrdiff.model.tiny import TinySpec, write_tiny_model

    model = write_tiny_model(tmp_path / "vpred", TinySpec(prediction_type="v_prediction"))
    data = build_prepared(tmp_path / "prep", n=8, model=model)
    out = tmp_path / "run"
    args = ["--data", str(data), "--base-model", str(model), "--out", str(out), "--learnable-text"]
    args += ["--steps", "2", "--batch-size", "2", "--ema", "--export-weights", "ema", "--snr-gamma", "5"]
    args += ["--latent-sampling", "mean", "--validation-prompt", "small left pleural effusion", "--validate-every", "1"]
    env = {**os.environ, "CI": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "cxrdiff", "--json", "finetune", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["weights"] == "ema" and result["steps"] == 2 and np.isfinite(result["final_loss"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prediction_type"] == "v_prediction" and manifest["weights"] == "ema"
    assert manifest["config"]["snr_gamma"] == 5.0 and manifest["config"]["latent_sampling"] == "mean"
    assert sorted(p.parent.name for p in (out / "validation").glob("*/00.png")) == ["step-0000001", "step-0000002"]
    assert (out / "unet_raw").is_dir()  # the folder holds EMA weights; the raw ones stay beside them
    assert "step 2/2 loss" in done.stderr  # plain lines in a batch job
    with pytest.raises(InputError, match="'latent_sampling' = 'median' is not a valid"):
        load_config(FinetuneConfig, None, latent_sampling="median")


@pytest.mark.slow
def test_two_processes_split_the_batch_save_every_rank_and_resume(tmp_path, prepared, tiny_model, frozen_run):
    """Two gloo processes on the CPU (DDP via accelerate): the drill signal stops both at step 2."""
    (tmp_path / "drill.toml").write_text("stop_after_step = 2\n")
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cxrdiff"]
    args = ["finetune", "--data", str(prepared), "--base-model", str(tiny_model), "--out", str(out), "--frozen-text"]
    args += ["--steps", "3", "--batch-size", "4", "--log-every", "1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "CI": "1"}
    env["CXRDIFF_EXIT_FILE"] = str(tmp_path / "exit-codes")
    first = subprocess.run(
        [*launch, *args, "--config", str(tmp_path / "drill.toml")], capture_output=True, text=True, timeout=300, env=env
    )
    assert first.returncode != 0 and "stopped by a signal after step 2" in first.stderr
    # torchrun exits 1 when a worker fails; each rank's own code, 75 (requeue), is in the exit file
    assert (tmp_path / "exit-codes").read_text().split() == ["75", "75"]
    assert sorted(p.name for p in (out / "checkpoints" / "step-0000002").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    second = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "2 per device × 2 processes × 1 accumulation" in first.stderr
    log = train_log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    # the same global batches as the single-process run, split over the ranks
    assert [r["ucg_eligible"] for r in log] == [r["ucg_eligible"] for r in train_log(frozen_run[0])]
    assert json.loads((out / "manifest.json").read_text())["processes"] == 2


def test_gradient_checkpointing_changes_memory_not_numbers(tmp_path, prepared, tiny_model):
    out = tmp_path / "run"
    finetune(tiny_run(prepared, tiny_model, out, steps=1, gradient_checkpointing=True))
    assert [r["loss"] for r in train_log(out)] == pytest.approx(PINNED_FROZEN_LOSSES[:1], rel=1e-6)


# --- the run folder: claimed through StepFolder, refused or resumed before any weight is read ----


def _no_load(*args, **kwargs):
    raise AssertionError("weights loaded before the folder check")


def test_a_strangers_folder_or_another_steps_folder_is_refused(tmp_path, prepared, tiny_model, monkeypatch):
    monkeypatch.setattr("cxrdiff.models.load_components", _no_load)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"not empty and not a 'finetune' folder \(has notes.txt\)"):
        finetune(tiny_run(prepared, tiny_model, stranger))
    assert sorted(p.name for p in stranger.iterdir()) == ["notes.txt"]
    sampling = tmp_path / "sampling"
    StepFolder.claim(sampling, "sample", {"steps": 5})
    (sampling / "images").mkdir()
    with pytest.raises(InputError, match="holds an unfinished 'sample' run"):
        finetune(tiny_run(prepared, tiny_model, sampling))


def test_resuming_with_other_settings_is_refused_before_loading_weights(frozen_run, prepared, tiny_model, monkeypatch):
    monkeypatch.setattr("cxrdiff.models.load_components", _no_load)
    out, _ = frozen_run
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(
        OtherSettings, match=r"finished 'finetune' run made with other settings \(frozen_text True → False; text_lr"
    ):
        finetune(tiny_run(prepared, tiny_model, out, frozen_text=False, text_lr=1e-4))
    with pytest.raises(OtherSettings, match=r"other settings \(seed 0 → 1\)"):
        finetune(tiny_run(prepared, tiny_model, out, seed=1))
    again = build_prepared(out.parent / "again", seed=1, model=tiny_model)
    with pytest.raises(OtherSettings, match=r"other settings \(data '[0-9a-f]{12}"):
        finetune(tiny_run(again, tiny_model, out))
    with pytest.raises(InputError, match="holds a run already at step 3, past --steps 2"):
        finetune(tiny_run(prepared, tiny_model, out, steps=2))
    assert (out / "manifest.json").read_bytes() == before
    assert run_settings(check_inputs(tiny_run(prepared, tiny_model, out)).config)["data"] == manifest_hash(prepared)


def test_a_stopped_run_resumes_and_a_finished_one_extends_with_more_steps(tmp_path, prepared, tiny_model, frozen_run):
    out = tmp_path / "run"
    config = tiny_run(prepared, tiny_model, out, steps=2)
    with pytest.raises(Stopped, match="stopped by a signal after step 1"):
        finetune(dataclasses.replace(config, stop_after_step=1))
    assert check_inputs(config).folder.state == "resume" and not (out / "manifest.json").exists()
    with pytest.raises(
        OtherSettings, match=r"unfinished 'finetune' run made with other settings \(lr 5e-05 → 0.0001; text_lr"
    ):
        finetune(dataclasses.replace(config, lr=1e-4))
    assert finetune(dataclasses.replace(config, log_every=2))["steps"] == 2  # not a setting: resumes
    reference = [r["loss"] for r in train_log(frozen_run[0])]
    assert [r["step"] for r in train_log(out)] == [1, 2] and [r["loss"] for r in train_log(out)] == reference[:2]
    assert check_inputs(config).folder.state == "finished"
    assert finetune(dataclasses.replace(config, steps=3))["steps"] == 3  # more steps: on from step 2
    assert [r["loss"] for r in train_log(out)] == reference
    assert json.loads((out / "manifest.json").read_text())["steps"] == 3
    assert not (out / ".cxrdiff-claim.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_checkpoint_is_named_and_the_previous_one_taken(tmp_path, prepared, tiny_model, frozen_run, caplog):
    """A cut model.safetensors in the newest checkpoint: extending the finished run falls back to the one
    before (said, naming the file) and trains on exactly as the run would have; with every checkpoint cut,
    the extension is refused naming the file, and the finished run's manifest is still there."""
    import shutil

    from cxrdiff.finetune import export_checkpoint

    out = tmp_path / "run"
    shutil.copytree(frozen_run[0], out)
    cut = out / "checkpoints" / "step-0000003" / "model.safetensors"
    _truncate(cut)
    with pytest.raises(InputError, match=rf"^{cut}: damaged, truncated or unreadable .*intact: 2\)$"):
        export_checkpoint(out, 3, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    reference = [r["loss"] for r in train_log(frozen_run[0])]
    with caplog.at_level("WARNING"):
        assert finetune(tiny_run(prepared, tiny_model, out, steps=4))["steps"] == 4
    assert f"{cut}: damaged, truncated or unreadable" in caplog.text and "step-0000002, instead" in caplog.text
    assert [r["loss"] for r in train_log(out)][:3] == reference  # step 3 trained again from step 2's state

    again = tmp_path / "again"
    shutil.copytree(frozen_run[0], again)
    for step in ("step-0000002", "step-0000003"):
        _truncate(again / "checkpoints" / step / "optimizer.bin")
    before = (again / "manifest.json").read_bytes()
    first = again / "checkpoints" / "step-0000002" / "optimizer.bin"
    with pytest.raises(InputError, match=rf"^{first}: damaged, .* keeps no earlier checkpoint: delete "):
        finetune(tiny_run(prepared, tiny_model, again, steps=4))
    assert (again / "manifest.json").read_bytes() == before


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_says_so_and_a_rerun_resumes_there(tmp_path, prepared, tiny_model, monkeypatch):
    """The first Ctrl-C (SIGINT) finishes the step it interrupts, saves its checkpoint (none is due: every 1000)
    and stops with exit 130 and one line naming the step; the same command then resumes at that step."""
    import re
    import signal
    import time

    import cxrdiff.finetune.loop as loop

    out = tmp_path / "run"
    args = ["--data", str(prepared), "--base-model", str(tiny_model), "--out", str(out), "--frozen-text"]
    args += ["--steps", "1000", "--batch-size", "4", "--per-device-batch-size", "2", "--checkpoint-every", "1000"]
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "cxrdiff", "finetune", *args, "--log-every", "1"],
                               stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        lines, deadline = [], time.monotonic() + 240
        while time.monotonic() < deadline and not any(re.search(r"step \d+/1000 loss", x) for x in lines):
            lines.append(process.stderr.readline())  # a log line per step: the loop is running
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=120)
    finally:
        process.kill()
    stderr = "".join(lines) + rest
    assert process.returncode == 130, stderr[-2000:]
    assert "Ctrl-C: finishing this step, saving it and stopping" in stderr
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"error: stopped by Ctrl-C after step (\d+), saved in (\S+); re-run the same command to "
                         r"resume", last)  # fmt: skip
    assert match, last
    step = int(match[1])
    assert Path(match[2]) == out / "checkpoints" / f"step-{step:07d}" and (Path(match[2]) / "state.json").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step:07d}"]  # the stop's own save
    assert [r["step"] for r in train_log(out)] == list(range(1, step + 1)) and not (out / "manifest.json").exists()

    ran = []
    monkeypatch.setattr(loop, "train_step", lambda *a, real=loop.train_step: ran.append(a[-1]) or real(*a))
    config = tiny_run(prepared, tiny_model, out, steps=step + 1, checkpoint_every=1000)  # steps: not a setting
    assert finetune(config)["steps"] == step + 1
    assert ran == [step]  # resumed at the saved step: only the one step left was trained
    if step + 1 <= len(PINNED_FROZEN_LOSSES):  # exact resume: the same losses as an uninterrupted run
        assert [r["loss"] for r in train_log(out)] == pytest.approx(PINNED_FROZEN_LOSSES[: step + 1], rel=1e-4)
