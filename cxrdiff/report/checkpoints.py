"""`cxrdiff report --checkpoints`: the trade-off over training, not two points.

For each fine-tuning run, its kept checkpoints (or every Nth, counted back from the newest) are exported as
model folders (`cxrdiff.finetune.export_checkpoint`), sampled on the test prompts and grounded on MS-CXR
through the same steps and settings as the run itself, and measured for CNR and fidelity. Everything goes
under `runs/<name>/checkpoints/step-NNNNNNN/` as step folders with their own keys, so a later report with the
same inputs reuses them. The newest checkpoint of a finished run holds the run's exported weights, so its
point is the run's own measurement, not a second one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxrdiff.artifacts import MANIFEST, OtherSettings, input_identity, read_manifest, settings_key
from cxrdiff.console import log
from cxrdiff.errors import InputError
from cxrdiff.report.config import ReportConfig, Steps
from cxrdiff.report.privacy import copy_rates_over_training
from cxrdiff.report.steps import (
    cached,
    grounding_only,
    grounding_settings,
    run_step,
)


def selected(run: Path, every: int) -> list[tuple[int, Path]]:
    """The kept checkpoints to evaluate: every `every`-th, counted back from the newest (always in)."""
    from cxrdiff.finetune import Checkpoints

    if every < 1:
        raise InputError(f"--checkpoint-every {every}: must be at least 1")
    return Checkpoints(run).saved()[::-1][::every][::-1]


def checkpoint_curve(
    config: ReportConfig,
    name: str,
    run: Path,
    entry: dict[str, Any],
    real: Path,
    steps: Steps,
    classifier: Any,
    metric: Mapping[str, Any],
) -> str | None:
    """Add `checkpoints` (a list of points, oldest first) to a fine-tuning run's entry; return what was
    recomputed (as `report` does for the run), or None for a run without a curve (a base model, a checkpoint
    export, a Table 7 run that is grounded only)."""
    run = Path(run)
    if not (run / MANIFEST).is_file() or read_manifest(run).get("step") != "finetune":
        return None
    if grounding_only(config, entry["setting"]):  # no fidelity, so no trade-off curve
        return None
    final = read_manifest(run).get("steps")
    points, done = [], []
    for step, _ in selected(run, config.checkpoint_every):
        if step == final:
            points.append(_final_point(entry, step))
            continue
        folder = Path(config.out) / "runs" / name / "checkpoints" / f"step-{step:07d}"
        points.append(_checkpoint_point(config, run, step, folder, real, steps, classifier, metric, done))
    if not points:
        log.info("report: %s keeps no checkpoints; no curve over training", name)
    copy_rates_over_training(config, name, entry, points, real, classifier, done)  # the privacy side of the front
    entry["checkpoints"] = points
    return ",".join(done) or "nothing"


def _final_point(entry: Mapping[str, Any], step: int) -> dict[str, Any]:
    """The newest checkpoint of a finished run is the run's exported model: its point is the run's."""
    fidelity = (entry.get("fidelity") or [None])[0]
    average = (entry.get("grounding") or {}).get("average")
    return {"step": step, "source": "the run's final model", "grounding": average, "fidelity": fidelity}


def _export(run: Path, step: int, out: Path, done: list[str]) -> Path:
    """The checkpoint as a model folder; an export of another checkpoint (the run was retrained) is redone."""
    from cxrdiff.finetune import export_checkpoint

    before = (out / MANIFEST).is_file()
    try:
        export_checkpoint(run, step, out)
    except OtherSettings:
        log.info("report: %s holds the export of an older checkpoint; exporting again", out)
        shutil.rmtree(out)
        export_checkpoint(run, step, out)
        before = False
    if not before:
        done.append(f"export {step}")
    return out


def _checkpoint_point(
    config: ReportConfig,
    run: Path,
    step: int,
    folder: Path,
    real: Path,
    steps: Steps,
    classifier: Any,
    metric: Mapping[str, Any],
    done: list[str],
) -> dict[str, Any]:
    """One checkpoint: exported, sampled on the test prompts and grounded (union boxes) as the run itself is,
    then its fidelity measured (cached under the metric settings and the samples' identity)."""
    model = _export(run, step, folder / "model", done)
    sample_fn, sample_config = steps["sample"]
    ground_fn, ground_config = steps["ground"]
    samples = sample_config(
        out=folder / "samples",
        model=model,
        prompts=real / "test.parquet",
        n_per_prompt=1,
        limit=config.n_fid,
        steps=config.sample_steps,
        guidance=config.guidance,
        scheduler=config.scheduler,
        seed=config.seed,
        batch_size=config.batch_size,
    )
    ground = ground_config(out=folder / "ground", **grounding_settings(config, model, real))
    made: list[str] = []
    samples_dir = run_step("samples", sample_fn, samples, made)
    ground_dir = run_step("ground", ground_fn, ground, made)
    key = settings_key({**metric, "samples": input_identity(samples_dir), "real": input_identity(real)})
    measured, fresh = cached(
        folder / "metrics.json", key, lambda: {"fidelity": fidelity(config, samples_dir, real, classifier)}
    )
    done += [f"{m} {step}" for m in made] + ([f"metrics {step}"] if fresh else [])
    average = json.loads((ground_dir / "summary.json").read_text()).get("average")
    return {"step": step, "source": "checkpoint", "grounding": average, "fidelity": measured["fidelity"]}


def fidelity(config: ReportConfig, samples: Path, real: Path, classifier: Any) -> dict[str, Any] | None:
    """The first fidelity number the report measures for a run (FID, else FID_XRV, else the classifier's
    feature distance), so a checkpoint's point and its run's are the same measure; None when none is on."""
    from cxrdiff.metrics import fid
    from cxrdiff.report.measure import fidelity_sets

    fake, real_paths, size, kwargs = fidelity_sets(config, samples, real)
    boot = {k: kwargs[k] for k in ("resamples", "seed")}
    if config.fid:
        return fid.fid(real_paths, fake, weights=config.inception_weights, **kwargs).as_dict()
    if config.fid_xrv:
        return fid.fid_xrv(real_paths, fake, weights=config.xrv_weights, **kwargs).as_dict()
    if classifier is not None and hasattr(classifier, "features"):
        name = f"FD ({classifier.name} features)"
        return fid.fd_features(real_paths, fake, classifier.features, name, size=size, **boot).as_dict()
    return None
