"""`cxrdiff report` on MIMIC-CXR data (the paper's Tables 1 and 3–7): for each run, what is missing is made,
what is on disk is reused.

For each run folder the report calls the sample step twice (test prompts; the diversity set, 4 images per
prompt) and the ground step once (MS-CXR), each into a sub-folder of its own `--out`; a run trained on
another text than impressions (labels, a `file:` set) is only grounded, as the paper measures it (Table 7),
unless `--other-sources full`; with `--classifier-prompts-per-class`, a third time on the classifier
check's own prompt set (report/classifier_set.py). Reuse is the steps' own: a step folder finished with the
same settings makes the step return at once; one made with other settings (a changed option, or a retrained
model / re-prepared data, whose manifest hash is part of the settings) makes the step raise `OtherSettings`,
and the report removes that sub-folder and runs the step again. Fidelity (FID, FID_XRV, MS-SSIM, classifier
AUC) is cached beside them, keyed by the metric settings and the identity of the folders it was measured on.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxrdiff.artifacts import (
    MANIFEST,
    StepFolder,
    input_identity,
    read_manifest,
    settings_key,
)
from cxrdiff.config import check_ranges, settings, to_dict
from cxrdiff.distributed import process_state
from cxrdiff.errors import InputError
from cxrdiff.report.benchmark import measure_benchmark_once
from cxrdiff.report.checkpoints import checkpoint_curve
from cxrdiff.report.classifier_set import measure_classifier_set, write_classifier_prompts
from cxrdiff.report.config import STEP, ReportConfig, Steps
from cxrdiff.report.features import check_options
from cxrdiff.report.jobs import check_ranks, follower_steps, run_sub_steps
from cxrdiff.report.laterality import measure_laterality
from cxrdiff.report.measure import (
    classifier_key,
    load_classifier,
    measure_ms_cxr,
    measure_real,
    measured_once,
    metric_settings,
)
from cxrdiff.report.privacy import measure_privacy_once
from cxrdiff.report.render import render
from cxrdiff.report.steps import (
    cached,
    default_steps,
    ground_folders,
    grounding_only,
    identity,
    read_table,
    recorded_real,
    run_kind,
    run_names,
    sample_folders,
)
from cxrdiff.report.text_source import text_source_of
from cxrdiff.report.trainings import GROUPED_BY, TRAININGS_DDOF, group_runs, run_summary
from cxrdiff.report.trainings import groups as training_groups
from cxrdiff.report.verdicts import grounding_intervals, verdicts


@dataclasses.dataclass(frozen=True)
class Checked:
    """What `check_inputs` resolved: the claimed --out, the prepared folder, the runs' display names and
    the identity of the classifier that will be used (None: no classifier check)."""

    folder: StepFolder
    real: Path
    names: tuple[str, ...]
    classifier: str | None
    groups: Mapping[str, list[str]] = dataclasses.field(default_factory=dict)  # group name → run names


# --- inputs ------------------------------------------------------------------------------------


def check_inputs(config: ReportConfig, classifier: Any = None) -> Checked:
    """Every usage error before any weights are loaded or any step runs; then claim --out (see `_claim`)."""
    if not config.runs:
        raise InputError("report: give at least one RUN folder (a finetune output or a base model folder)")
    if config.out is None:
        raise InputError("--out: required (the report folder)")
    for r in config.runs:
        run_kind(Path(r))
    check_ranges(config)  # also here: the MIMIC report is called directly too
    from cxrdiff.metrics.fid import resolve_weights

    if not config.random_features:  # check weights before any sampling starts
        if config.fid:
            resolve_weights(config.inception_weights, "inception")
        if config.fid_xrv:
            resolve_weights(config.xrv_weights, "xrv")
    check_options(config, classifier)  # today's benchmarks and privacy: ranges and feature networks
    real = real_folder(config)
    names = run_names(config)
    groups = group_runs(config.runs, names, config.label)
    key = classifier_key(config, classifier)
    folder = _claim(config, real, key)
    return Checked(folder, real, names, key, groups)


def _claim(config: ReportConfig, real: Path, classifier: str | None) -> StepFolder:
    """Claim --out for the report. A stranger's folder or another step's is refused. A report folder made
    with other settings is not: the report is re-rendered on every run anyway, and what it measured is
    cached per run under the steps' and the metrics' own keys, so that folder is taken over (its stale
    manifest removed, the new settings recorded as an unfinished run) and only what changed is recomputed."""
    wanted = settings(
        config,
        runs=[input_identity(r) for r in config.runs],
        real=input_identity(real),
        inception_weights=identity(config.inception_weights),
        xrv_weights=identity(config.xrv_weights),
        classifier=classifier,
    )
    return StepFolder.claim(config.out, STEP, wanted, take_over=True)


def real_folder(config: ReportConfig) -> Path:
    """The prepared folder (--real, or the one the runs record), checked to hold the test and MS-CXR tables."""
    real = recorded_real(config)
    if real is None:
        raise InputError("--real: not given and no run records its prepared folder; pass --real PREPARED")
    read_manifest(real, "prepare")
    for name in ("test.parquet", "ms_cxr.parquet"):
        if not (real / name).is_file():
            raise InputError(f"--real {real}: no {name} (expected a `cxrdiff prepare` output folder)")
    import pyarrow.parquet as pq

    held_out = pq.read_metadata(real / "test.parquet").num_rows
    if held_out < MIN_TEST_IMAGES:  # refused here, not after every run has been sampled
        raise InputError(
            f"--real {real}: test.parquet holds {held_out} image(s); the fidelity metrics need at least "
            f"{MIN_TEST_IMAGES} (prepare with a larger --test-size, or on more p19 studies)"
        )
    return real


MIN_TEST_IMAGES = 2  # a Fréchet distance's covariance needs two images on each side


def grounding_rows(real: Path) -> int:
    """The prepared folder's grounding rows (ms_cxr.parquet), from the Parquet footer."""
    import pyarrow.parquet as pq

    return pq.read_metadata(real / "ms_cxr.parquet").num_rows


def data_set_of(real: Path) -> dict[str, Any]:
    """The data set the prepared folder holds and where its text came from, as `prepare` recorded them (a MIMIC
    folder records none: MIMIC-CXR's impressions)."""
    manifest = read_manifest(real, "prepare")
    recorded = manifest.get("data_set") or {
        "name": "MIMIC-CXR layout",
        "text_source": "impressions",
        "text": "the impressions",
    }
    counts = manifest.get("counts") or {}
    rows = counts.get("rows") or {part: (counts.get(part) or {}).get("rows") for part in ("train", "test", "ms_cxr")}
    return {**recorded, "rows": rows, "grounding_classes": grounding_classes(real)}


def grounding_classes(real: Path) -> dict[str, int]:
    """The grounding set's classes (ms_cxr.parquet's `category_name`) and their rows: the classes the report's
    per-class tables show."""
    import pyarrow.parquet as pq

    path = real / "ms_cxr.parquet"
    if not path.is_file():
        return {}
    names = pq.read_table(path, columns=["category_name"]).column("category_name").to_pylist()
    return {str(c): names.count(c) for c in sorted(set(names))}


def _report_run(
    config: ReportConfig, run: Path, folder: Path, real: Path, steps: Steps, classifier: Any, metric: dict
) -> tuple[dict[str, Any], list[str]]:
    """One run's entry of metrics.json, and what was recomputed for it."""
    setting = run_summary(run)
    done: list[str] = []
    sampled = not grounding_only(config, setting)
    samples, diversity = sample_folders(config, run, folder, real, steps, done) if sampled else (None, None)
    grounded = grounding_rows(real) > 0  # Open-i, or a CSV without --boxes: no grounding set
    ground_dirs = ground_folders(config, run, folder, real, steps, done) if grounded else {}
    ground_dir = ground_dirs.get("union", folder / "no-grounding-set")
    measured: dict[str, Any] = {}
    if sampled:
        measured, fresh = measured_once(config, folder / "metrics.json", metric, samples, diversity, real, classifier)
        if fresh:
            done.append("metrics")
        if config.classifier_prompts_per_class and classifier is not None:
            measured.update(measure_classifier_set(config, run, folder, steps, classifier, metric, done))
        measured["benchmark"] = measure_benchmark_once(config, folder, samples, real, classifier, done)
        measured["privacy"] = measure_privacy_once(config, run, folder, samples, real, classifier, done)
        if not config.table4_p19_only and grounded:
            ms_cxr, ms_done = measure_ms_cxr(config, run, folder, real, steps, classifier, metric)
            measured.update(ms_cxr)
            done += ms_done
    manifest = read_manifest(run) if (run / MANIFEST).is_file() else {}
    training = manifest.get("config", {})
    entry = {
        "path": str(run.resolve()),
        "kind": run_kind(run),
        "training": {k: training.get(k) for k in ("frozen_text", "steps", "lr", "seed")} if manifest else {},
        "sampling": {
            "steps": config.sample_steps,
            "guidance": config.guidance,
            "scheduler": config.scheduler,
            "seed": config.seed,
            "batch_size": config.batch_size,
        }
        if sampled
        else {"skipped": "grounding only: trained on another text than impressions (--other-sources)"},
        "grounding": _grounding_summary(ground_dir) if grounded else {},
        "grounding_per_phrase": _per_phrase(ground_dirs, config) if grounded else {"same_as_union": True},
        "overlays": _overlays(ground_dir),
        **measured,
    }
    entry.update(setting=setting, text_source=text_source_of(ground_dir, setting["prompt_source"]))
    entry["eos"] = _eos(entry["grounding"])
    entry["grounding_intervals"] = grounding_intervals(ground_dir, config.seed, config.resamples)
    entry["laterality"] = measure_laterality(ground_dir, config.seed, config.resamples)
    return entry, done


def measure_one_run(
    config: ReportConfig, name: str, run: Path, real: Path, steps: Steps, classifier: Any, metric: dict
) -> tuple[dict[str, Any], str]:
    """Everything the report measures of one run (its curve over checkpoints too, with --checkpoints): its
    entry of metrics.json and what was recomputed, in words. Runs are independent of each other, so the
    report may measure them side by side (--workers)."""
    entry, done = _report_run(config, run, Path(config.out) / "runs" / name, real, steps, classifier, metric)
    recomputed = ",".join(done) or "nothing"
    if config.checkpoints:
        curve = checkpoint_curve(config, name, run, entry, real, steps, classifier, metric)
        if curve is not None:
            recomputed += f"; checkpoints: {curve}"
    return entry, recomputed


def report_mimic(config: ReportConfig, classifier: Any = None, steps: Steps | None = None) -> dict[str, Any] | None:
    """Run what is missing for each run, measure, and write metrics.json, report.md, report.html. Under a
    launcher the other ranks only take part in the sub-steps and return None (`report.jobs`)."""
    state = process_state()
    check_ranks(config, state.num_processes)
    if not state.is_main_process:
        run_sub_steps(config, real_folder(config), follower_steps(dict(steps or default_steps())))
        return None
    checked = check_inputs(config, classifier)
    out, real = Path(config.out), checked.real
    given_steps = steps is not None  # stand-ins (tests) are closures: they run here, never side by side
    steps = dict(steps or default_steps())
    if classifier is None:
        classifier = load_classifier(config)
    metric = metric_settings(config, checked.classifier)
    if config.classifier_prompts_per_class and classifier is not None:
        write_classifier_prompts(config, real)
    named = zip(checked.names, config.runs, strict=True)
    jobs = [(config, name, Path(run), real, steps, classifier, metric) for name, run in named]
    if config.workers > 1 and not given_steps:
        from cxrdiff.speed import side_by_side

        measured = side_by_side(measure_one_run, jobs, config.workers)
    else:
        measured = [measure_one_run(*job) for job in jobs]
    runs = {name: entry for name, (entry, _) in zip(checked.names, measured, strict=True)}
    recomputed = {name: done for name, (_, done) in zip(checked.names, measured, strict=True)}
    size = next((r["image_size"] for r in runs.values() if "image_size" in r), None)
    real_metrics: dict[str, Any] = {}
    if size is not None:  # the classifier's reference row, at the generated images' size
        real_key = settings_key({**metric, "real": input_identity(real), "size": size})
        real_metrics, _ = cached(
            out / "real_metrics.json", real_key, lambda: measure_real(config, real, classifier, size)
        )
    for group, names in checked.groups.items():
        for name in names:
            runs[name]["group"] = group
    metrics = {
        "runs": runs,
        "groups": training_groups(runs, checked.groups),
        "trainings": {"ddof": TRAININGS_DDOF, "grouped_by": GROUPED_BY},
        "real": real_metrics,
        "real_folder": str(real.resolve()),
        "data_set": data_set_of(real),
        "settings": to_dict(config),
        "classifier": checked.classifier,
        "uncertainty": {
            "level": 0.95,
            "seed": config.seed,
            "resamples": config.resamples,
            "fd_resamples": config.fd_resamples,
        },
    }
    metrics["verdicts"] = verdicts(metrics, out, config.seed, config.resamples, config.fd_resamples)
    files = render(metrics, out)
    checked.folder.finish(
        config=to_dict(config),
        inputs={"real": real, **{f"run:{n}": r for n, r in zip(checked.names, config.runs, strict=True)}},
        seed=config.seed,
        files=[f.name for f in files],
    )
    return {"out": str(out), "report": str(out / "report.html"), "recomputed": recomputed}


def _eos(grounding: Mapping[str, Any]) -> dict[str, Any]:
    """The end-of-text token's CNR over all classes beside the class words' average CNR (the paper: EOS
    0.68 learnable, 0.72 frozen)."""
    eos = (grounding.get("word_analysis") or {}).get("eos_cnr")
    words = ((grounding.get("average") or {}).get("cnr") or {}).get("mean")
    return {"eos_cnr": eos, "class_word_cnr": words}


def _grounding_summary(ground_dir: Path) -> dict[str, Any]:
    """The ground step's summary; its word analysis redone from words.parquet when it lacks `class_words`
    (a summary that records none), with the same threshold."""
    summary = json.loads((ground_dir / "summary.json").read_text())
    analysis = summary.get("word_analysis")
    if analysis is not None and "class_words" not in analysis and (ground_dir / "words.parquet").is_file():
        from cxrdiff.ground import word_analysis

        summary["word_analysis"] = word_analysis(read_table(ground_dir / "words.parquet"), analysis["min_count"])
    return summary


def _per_phrase(ground_dirs: Mapping[str, Path], config: ReportConfig) -> dict[str, Any]:
    """Table 3's grounding (per phrase): its per-class CNR and average with their intervals, or a note that it
    is Table 1's."""
    if ground_dirs["per-phrase"] == ground_dirs["union"]:
        return {"same_as_union": True}
    summary = json.loads((ground_dirs["per-phrase"] / "summary.json").read_text())
    intervals = grounding_intervals(ground_dirs["per-phrase"], config.seed, config.resamples)
    return {"same_as_union": False, "classes": summary.get("classes", {}), "average": summary.get("average"),
            "intervals": intervals}  # fmt: skip


def _overlays(ground_dir: Path) -> dict[str, list[str]]:
    """One or more overlay PNG paths per class, from the ground step's scores table."""
    path = ground_dir / "scores.parquet"
    if not path.is_file():
        return {}
    scores = read_table(path)
    out: dict[str, list[str]] = {}
    for category, group in scores.groupby("category"):
        files = [ground_dir / "overlays" / f"{s}.png" for s in dict.fromkeys(group["sample"])]
        out[str(category)] = [str(f) for f in files if f.is_file()][:3]
    return out
