"""`cxrdiff report --checkpoints` on a real tiny run: a kept checkpoint exported as a model holds exactly the
weights the run would have exported at that step, sample reads it, and the report draws one point per kept
checkpoint (reused on a second report, thinned by --checkpoint-every)."""

from __future__ import annotations

import json

import pytest
from fixtures_prepared import tiny_run, weights
from stand_ins import Brightness

from cxrdiff.artifacts import manifest_hash, read_manifest
from cxrdiff.errors import InputError
from cxrdiff.finetune import export_checkpoint, finetune
from cxrdiff.report import ReportConfig, report


def _same(a, b) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def run(tmp_path_factory, phantom_prepared, tiny_model):
    """A learnable-text run of 3 steps keeping a checkpoint at each step."""
    out = tmp_path_factory.mktemp("ckpt") / "learnable"
    config = tiny_run(phantom_prepared, tiny_model, out, frozen_text=False, per_device_batch_size=None, batch_size=2,
                      checkpoint_every=1, keep_checkpoints=3)  # fmt: skip
    finetune(config)
    return out


def test_exported_checkpoint_is_the_run_at_that_step(tmp_path, run, tiny_model):
    last = tmp_path / "step3"
    export_checkpoint(run, 3, last)
    assert read_manifest(last)["step"] == "checkpoint" and read_manifest(last)["steps"] == 3
    for part in ("unet", "text_encoder"):  # the newest checkpoint is what the run exported
        assert _same(weights(last / part), weights(run / part)), part
    first = tmp_path / "step1"
    export_checkpoint(run, 1, first)
    assert not _same(weights(first / "unet"), weights(run / "unet"))
    assert not _same(weights(first / "text_encoder"), weights(tiny_model / "text_encoder"))  # trained at step 1
    before = manifest_hash(first)
    export_checkpoint(run, 1, first)  # done: returns at once
    assert manifest_hash(first) == before
    with pytest.raises(InputError, match=r"no kept checkpoint at step 7 \(kept: 1, 2, 3\)"):
        export_checkpoint(run, 7, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()

    from cxrdiff.sample import SampleConfig, sample

    sample(SampleConfig(model=first, prompt="Mild pulmonary edema.", steps=2, out=tmp_path / "samples"))
    assert (tmp_path / "samples" / "000000.png").is_file()
    assert read_manifest(tmp_path / "samples")["inputs"]["model"]["manifest_sha256"] == manifest_hash(first)


@pytest.mark.slow
def test_report_checkpoints_draws_one_point_per_kept_checkpoint(tmp_path, run, phantom_prepared):
    base = dict(
        runs=(run,),
        out=tmp_path / "report",
        real=phantom_prepared,
        fid=False,
        fid_xrv=False,
        n_fid=2,
        diversity_prompts=1,
        sample_steps=2,
        ground_steps=4,
        ground_window=2,
        ground_limit=3,
        min_word_count=0,
        checkpoints=True,
    )
    first = report(ReportConfig(**base), classifier=Brightness())
    assert "checkpoints: export 1,samples 1,ground 1,metrics 1,export 2" in first["recomputed"]["learnable"]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    entry = metrics["runs"]["learnable"]
    points = entry["checkpoints"]
    assert [p["step"] for p in points] == [1, 2, 3]
    assert [p["source"] for p in points] == ["checkpoint", "checkpoint", "the run's final model"]
    for p in points:  # both curves have a value at every step
        assert isinstance(p["grounding"]["cnr"]["mean"], float) and isinstance(p["fidelity"]["value"], float)
        assert p["fidelity"]["name"] == "FD (brightness features)"
    assert points[-1]["grounding"] == entry["grounding"]["average"]
    assert points[-1]["fidelity"] == entry["fidelity"][0]
    assert points[0]["fidelity"]["value"] != points[-1]["fidelity"]["value"]  # other weights, other images
    folder = tmp_path / "report" / "runs" / "learnable" / "checkpoints" / "step-0000001"
    assert read_manifest(folder / "model")["step"] == "checkpoint"
    assert read_manifest(folder / "samples")["inputs"]["model"]["manifest_sha256"] == manifest_hash(folder / "model")
    assert (tmp_path / "report" / "checkpoints.png").stat().st_size > 5000
    assert "checkpoints.png" in (tmp_path / "report" / "report.md").read_text()

    again = report(ReportConfig(**base), classifier=Brightness())  # the same inputs: nothing recomputed
    assert again["recomputed"]["learnable"] == "nothing; checkpoints: nothing"
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["runs"]["learnable"]["checkpoints"] == points

    report(ReportConfig(**{**base, "checkpoint_every": 2}), classifier=Brightness())
    thinned = json.loads((tmp_path / "report" / "metrics.json").read_text())["runs"]["learnable"]["checkpoints"]
    assert [p["step"] for p in thinned] == [1, 3]  # every 2nd, counted back from the newest
    assert thinned[0] == points[0]


def test_checkpoint_every_below_one_is_refused(tmp_path, run, phantom_prepared):
    config = ReportConfig(runs=(run,), out=tmp_path / "r", real=phantom_prepared, checkpoints=True, checkpoint_every=0)
    with pytest.raises(InputError, match="--checkpoint-every 0: must be at least 1"):
        report(config)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # two fresh interpreters importing torch and diffusers
def test_model_checkpoint_command(tmp_path, run):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "cxrdiff", *args], capture_output=True, text=True)

    bad = cli("model", "checkpoint", str(run), str(tmp_path / "x"), "--step", "9")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {run}: no kept checkpoint at step 9 (kept: 1, 2, 3)"
    ]
    good = cli("--json", "model", "checkpoint", str(run), str(tmp_path / "two"), "--step", "2")
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout) == {"out": str(tmp_path / "two"), "step": 2}
    assert read_manifest(tmp_path / "two")["steps"] == 2


def test_export_of_a_run_that_exported_ema_weights_holds_the_ema(tmp_path, tiny_model):
    from fixtures_prepared import build_prepared

    data = build_prepared(tmp_path / "prepared", n=8, model=tiny_model)
    out = tmp_path / "ema-run"
    options = dict(steps=2, batch_size=2, per_device_batch_size=None, checkpoint_every=1, keep_checkpoints=2)
    finetune(tiny_run(data, tiny_model, out, **options, ema=True, ema_decay=0.5, export_weights="ema"))
    export_checkpoint(out, 2, tmp_path / "two")
    assert read_manifest(tmp_path / "two")["weights"] == "ema"
    assert _same(weights(tmp_path / "two" / "unet"), weights(out / "unet"))  # the run's exported (EMA) UNet
    assert not _same(weights(tmp_path / "two" / "unet"), weights(out / "unet_raw"))
