"""`cxrdiff report`'s orchestration: for each run, what is missing is made, what is on disk is reused.

For each run folder the report calls the sample step twice (test prompts; the diversity set, 4 images per
prompt) and the ground step once (MS-CXR), each into a sub-folder of its own `--out`; a run trained on
another text than impressions (labels, a `file:` set) is only grounded, as the paper measures it (Table 7),
unless `--other-sources full`. Reuse is the steps' own: a step folder finished with the same settings makes
the step return at once; one made with other settings (a changed option, or a retrained model / re-prepared
data, whose manifest hash is part of the settings) makes the step raise `OtherSettings`, and the report
removes that sub-folder and runs the step again. Fidelity (FID, FID_XRV, MS-SSIM, classifier AUC) is cached
beside them, keyed by the metric settings and the identity of the folders it was measured on.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cxrdiff.artifacts import (
    MANIFEST,
    OtherSettings,
    StepFolder,
    input_identity,
    manifest_hash,
    read_manifest,
    settings_key,
    write_json,
)
from cxrdiff.choices import ClassifierPositives, OtherSources
from cxrdiff.config import settings, to_dict
from cxrdiff.console import log
from cxrdiff.data import MS_CXR_CATEGORIES
from cxrdiff.errors import InputError
from cxrdiff.metrics.score import Score
from cxrdiff.report.render import render
from cxrdiff.report.text_source import text_source_of
from cxrdiff.report.trainings import GROUPED_BY, TRAININGS_DDOF, group_runs, run_summary
from cxrdiff.report.trainings import groups as training_groups

STEP = "report"

StepFn = Callable[[Any], Any]
Steps = Mapping[str, tuple[StepFn, type]]  # "sample" / "ground" → (step function, its config class)


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Settings of `cxrdiff report` (sampling and grounding defaults follow the paper). Plain data: the
    classifier, an object, is passed to `report` beside it."""

    NOT_SETTINGS: ClassVar[tuple[str, ...]] = ("out", "batch_size", "device", "workers")

    runs: tuple[Path, ...] = ()
    out: Path | None = None
    real: Path | None = None  # prepared folder: test.parquet (real p19 images, prompts), ms_cxr.parquet
    inception_weights: Path | None = None
    xrv_weights: Path | None = None
    n_fid: int = 5000
    diversity_prompts: int = 100
    random_features: bool = False
    names: tuple[str, ...] = ()  # display names, one per run; default: the folder names
    label: tuple[str, ...] = ()  # NAME=DIR: names the setting group of the run in DIR (groups: trainings.py)
    fid: bool = True  # FID on InceptionV3 (needs weights or random_features)
    fid_xrv: bool = True  # FID_XRV and the torchxrayvision classifier check (needs weights or random_features)
    sample_steps: int = 75
    guidance: float = 4.0
    scheduler: str = "pndm"
    ground_steps: int = 50
    ground_window: int = 40
    ground_limit: int | None = None
    min_word_count: int = 25  # Table 6: a word ranks in a class when it occurs in more than this many phrases
    classifier_positives: ClassifierPositives = "only"  # only: d is the image's only label (the paper's)
    checkpoints: bool = False  # also evaluate each run's kept checkpoints: CNR and fidelity over training steps
    checkpoint_every: int = 1  # with checkpoints: every Nth kept checkpoint, counted back from the newest
    table4_p19_only: bool = False  # Table 4 from the p19 prompts only: the MS-CXR phrases are not sampled
    other_sources: OtherSources = "grounding"  # runs trained on labels / file: texts: Table 7's grounding only
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"  # for the fidelity feature networks
    workers: int = 1  # runs measured side by side on a multi-core CPU (one process each; ignored with CUDA)


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
        _run_kind(Path(r))
    if config.n_fid < 2 or config.diversity_prompts < 1:
        raise InputError(f"--n-fid {config.n_fid} / --diversity-prompts {config.diversity_prompts}: too small")
    if config.min_word_count < 0:
        raise InputError(f"--min-word-count {config.min_word_count}: must be at least 0")
    if config.workers < 1:
        raise InputError(f"--workers {config.workers}: must be at least 1")
    if config.checkpoint_every < 1:
        raise InputError(f"--checkpoint-every {config.checkpoint_every}: must be at least 1")
    from cxrdiff.metrics.fid import resolve_weights

    if not config.random_features:  # check weights before any sampling starts
        if config.fid:
            resolve_weights(config.inception_weights, "inception")
        if config.fid_xrv:
            resolve_weights(config.xrv_weights, "xrv")
    real = _real_folder(config)
    names = _names(config)
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
        inception_weights=_identity(config.inception_weights),
        xrv_weights=_identity(config.xrv_weights),
        classifier=classifier,
    )
    return StepFolder.claim(config.out, STEP, wanted, take_over=True)


def _identity(path: Path | None) -> str | None:
    return input_identity(path) if path is not None and Path(path).exists() else None


def _run_kind(path: Path) -> str:
    from cxrdiff.models import check_model_folder

    kind = read_manifest(path, ("finetune", "checkpoint"))["step"] if (path / MANIFEST).is_file() else "base model"
    check_model_folder(path)
    return kind


def _real_folder(config: ReportConfig) -> Path:
    if config.real is not None:
        real = Path(config.real)
    else:
        recorded = [read_manifest(r) for r in config.runs if (Path(r) / MANIFEST).is_file()]
        data = [d for m in recorded if (d := m.get("inputs", {}).get("data", {}).get("path"))]
        if not data:
            raise InputError("--real: not given and no run records its prepared folder; pass --real PREPARED")
        real = Path(data[0])
    read_manifest(real, "prepare")
    for name in ("test.parquet", "ms_cxr.parquet"):
        if not (real / name).is_file():
            raise InputError(f"--real {real}: no {name} (expected a `cxrdiff prepare` output folder)")
    return real


def _names(config: ReportConfig) -> tuple[str, ...]:
    names = tuple(config.names) if config.names else tuple(Path(r).name for r in config.runs)
    if len(names) != len(config.runs):
        raise InputError(f"names: {len(names)} given for {len(config.runs)} runs")
    if len(set(names)) != len(names):
        raise InputError(f"runs: names are not unique ({', '.join(names)}); pass names")
    return names


def classifier_key(config: ReportConfig, classifier: Any = None) -> str | None:
    """The classifier's identity for the caches, without loading it: a given classifier's name and
    `cache_key` (without one, its object id: measured afresh every run), else torchxrayvision's weights."""
    if classifier is not None:
        name = getattr(classifier, "name", type(classifier).__name__)
        return f"{name}:{getattr(classifier, 'cache_key', id(classifier))}"
    path = _xrv_path(config)
    if path is None:
        return None
    from cxrdiff.metrics.classifier import XrvClassifier

    return f"{XrvClassifier.name}:{input_identity(path)}"


def _xrv_path(config: ReportConfig) -> Path | None:
    """The torchxrayvision weights the classifier check uses, or None (random features only: a random
    classifier's AUC means nothing, so it is not run)."""
    if not config.fid_xrv:
        return None
    from cxrdiff.metrics.fid import default_xrv_path, resolve_weights

    if config.xrv_weights is None and not default_xrv_path().is_file():
        return None
    return Path(resolve_weights(config.xrv_weights, "xrv"))


def _load_classifier(config: ReportConfig) -> Any:
    path = _xrv_path(config)
    if path is None:
        return None
    from cxrdiff.metrics.classifier import XrvClassifier

    return XrvClassifier(path, device=config.device)


# --- measuring -----------------------------------------------------------------------------------


def _read_table(path: Path) -> Any:
    import pandas as pd

    return pd.read_parquet(path)


def _image_path(value: str, real: Path) -> Path:
    path = Path(value)
    if path.is_absolute() or path.exists():
        return path
    mimic = read_manifest(real).get("config", {}).get("mimic")
    return Path(mimic) / path if mimic else real / path


def _label_groups(frame: Any, paths: list[Path], rule: str = "only") -> tuple[dict[str, list[Path]], list[Path]]:
    """Images per class and the 'No Finding' images, from a table's CheXpert columns (1.0 = positive).

    `only` (the paper's reference protocol): an image counts for d when d is its only positive label, and
    as No Finding when that is its only one. `any`: every image with d = 1.0, every one with No Finding."""
    from cxrdiff.data import LABELS

    labels = [c for c in LABELS if c in frame]
    positive = (frame[labels] == 1.0).to_numpy() if labels else np.zeros((len(paths), 0), bool)  # (n, labels)
    alone = positive.sum(axis=1) == 1 if rule == "only" else np.ones(len(paths), bool)  # (n,)

    def chosen(column: str) -> list[Path]:
        hit = positive[:, labels.index(column)] & alone
        return [p for p, keep in zip(paths, hit, strict=True) if keep]

    by_class = {c: chosen(c) for c in MS_CXR_CATEGORIES if c in labels}
    return by_class, chosen("No Finding") if "No Finding" in labels else []


def _grey(paths: Sequence[Path], size: int) -> np.ndarray:
    from cxrdiff.images import load_grayscale, resize_center_crop

    out = []
    for p in paths:
        img = load_grayscale(p)
        out.append(img if img.shape == (size, size) else resize_center_crop(img, size))
    return np.stack(out) if out else np.zeros((0, size, size), np.uint8)


def _scores(table: Mapping[str, Score]) -> dict[str, Any]:
    return {k: v.as_dict() for k, v in table.items()}


def _image_size(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as img:
        return int(min(img.size))


def measure_run(
    config: ReportConfig, samples: Path, diversity_dir: Path, real: Path, classifier: Any
) -> dict[str, Any]:
    """Fidelity of one run: Fréchet distances, MS-SSIM, classifier AUC; each a `Score` as a dict."""
    from cxrdiff.metrics import classifier as clf
    from cxrdiff.metrics import diversity, fid

    table = _read_table(samples / "samples.parquet")
    fake = [samples / f for f in table["file"]]
    size = _image_size(fake[0])
    test = _read_table(real / "test.parquet").head(config.n_fid)
    real_paths = [_image_path(p, real) for p in test["image_path"]]
    cache = Path(config.out) / ".fidelity_cache"
    kwargs = dict(random_features=config.random_features, size=size, cache_root=cache, device=config.device)
    fidelity: list[Score] = []
    if config.fid:
        fidelity.append(fid.fid(real_paths, fake, weights=config.inception_weights, **kwargs))
    if config.fid_xrv:
        fidelity.append(fid.fid_xrv(real_paths, fake, weights=config.xrv_weights, **kwargs))
    if classifier is not None and hasattr(classifier, "features"):
        fidelity.append(
            fid.fd_features(real_paths, fake, classifier.features, f"FD ({classifier.name} features)", size=size)
        )
    div_table = _read_table(diversity_dir / "samples.parquet")
    groups = [
        [diversity_dir / f for f in g.sort_values("repeat")["file"]] for _, g in div_table.groupby("prompt_index")
    ]
    result: dict[str, Any] = {
        "fidelity": [s.as_dict() for s in fidelity],
        "diversity": diversity.diversity(groups).as_dict(),
        "image_size": size,
        "n_generated": len(fake),
        "n_real": len(real_paths),
    }
    if classifier is not None:
        by_class, no_finding = _label_groups(table, fake, config.classifier_positives)
        if no_finding:
            result["classifier"] = _scores(
                clf.classifier_check(
                    classifier, {c: _grey(p, size) for c, p in by_class.items()}, _grey(no_finding, size)
                )
            )
    return result


def measure_real(config: ReportConfig, real: Path, classifier: Any, size: int) -> dict[str, Any]:
    """The reference row: the classifier check on the real p19 test images."""
    from cxrdiff.metrics import classifier as clf

    if classifier is None:
        return {}
    test = _read_table(real / "test.parquet").head(config.n_fid)
    paths = [_image_path(p, real) for p in test["image_path"]]
    by_class, no_finding = _label_groups(test, paths, config.classifier_positives)
    if not no_finding:
        return {}
    aucs = clf.classifier_check(classifier, {c: _grey(p, size) for c, p in by_class.items()}, _grey(no_finding, size))
    return {"classifier": _scores(aucs)}


def _metric_settings(config: ReportConfig, classifier: str | None) -> dict[str, Any]:
    """What decides the measured numbers besides the folders measured (they join per cache)."""
    return {
        **{
            k: getattr(config, k)
            for k in ("n_fid", "random_features", "fid", "fid_xrv", "diversity_prompts", "classifier_positives")
        },
        "classifier": classifier,
        "weights": {"inception": _identity(config.inception_weights), "xrv": _identity(config.xrv_weights)},
    }


def _cached(path: Path, key: str, measure: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """The numbers saved in `path` if they were measured with this key, else measured now and saved;
    and whether they were measured now."""
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("key") == key:
        return {k: v for k, v in saved.items() if k != "key"}, False
    measured = measure()
    write_json(path, {"key": key, **measured})
    return measured, True


# --- the orchestration ---------------------------------------------------------------------------


def _default_steps() -> dict[str, tuple[StepFn, type]]:
    from cxrdiff import ground, sample

    return {"sample": (sample.sample, sample.SampleConfig), "ground": (ground.ground, ground.GroundConfig)}


def _run_step(name: str, fn: StepFn, config: Any, done: list[str]) -> Path:
    """Call a step on its sub-folder: it returns at once when that is finished with these settings; one
    made with other settings is removed and made again. `name` joins `done` when the folder's manifest
    changed (something was computed), which is also what invalidates the metrics measured on it."""
    out = Path(config.out)
    before = manifest_hash(out)
    try:
        fn(config)
    except OtherSettings:
        log.info("report: %s in %s was made with other settings or inputs; recomputing it", name, out)
        shutil.rmtree(out)
        fn(config)
    after = manifest_hash(out)
    if after is None:
        raise InputError(f"{out}: the {name} step finished without a manifest")
    if after == before:
        log.info("report: %s is up to date in %s", name, out)
    else:
        done.append(name)
    return out


def phrases_share_an_image_class(ms_cxr: Path) -> bool:
    """Whether some image and class has several phrases: only then do `union` (Table 1's boxes) and
    `per-phrase` (Table 3's) score differently, and the report grounds a second time for Table 3."""
    table = _read_table(ms_cxr)[["dicom_id", "category_name"]]
    return bool(table.duplicated().any())


# Table 4's two prompt sources: (table in the prepared folder, extra sample options, sub-folder suffix)
PROMPT_SETS = {
    "p19": ("test.parquet", {}, ""),
    "ms-cxr": ("ms_cxr.parquet", {"prompt_column": "label_text"}, "-ms-cxr"),
}


def _sample_folders(
    config: ReportConfig, run: Path, folder: Path, real: Path, steps: Steps, done: list[str], prompts: str = "p19"
) -> tuple[Path, Path]:
    """Samples (one per prompt, --n-fid) and the diversity set (4 images per prompt, --diversity-prompts) of
    one run, made or reused; from the p19 test prompts or, for Table 4's second column, the MS-CXR phrases,
    both made the same way (sampler, seed rule, counts)."""
    table, extra, suffix = PROMPT_SETS[prompts]
    sample_fn, sample_config = steps["sample"]
    common = dict(model=run, steps=config.sample_steps, guidance=config.guidance, scheduler=config.scheduler)
    common.update(seed=config.seed, batch_size=config.batch_size, prompts=real / table, **extra)
    samples = _run_step(
        f"samples{suffix}",
        sample_fn,
        sample_config(out=folder / f"samples{suffix}", n_per_prompt=1, limit=config.n_fid, **common),
        done,
    )
    diversity = _run_step(
        f"diversity{suffix}",
        sample_fn,
        sample_config(out=folder / f"diversity{suffix}", n_per_prompt=4, limit=config.diversity_prompts, **common),
        done,
    )
    return samples, diversity


def _ground_folders(
    config: ReportConfig, run: Path, folder: Path, real: Path, steps: Steps, done: list[str]
) -> dict[str, Path]:
    """The grounding of one run on MS-CXR, made or reused: `union` for Table 1, and `per-phrase` for
    Table 3 (the same folder when they cannot differ)."""
    ground_fn, ground_config = steps["ground"]
    grounding = grounding_settings(config, run, real)
    ground = {"union": _run_step("ground", ground_fn, ground_config(out=folder / "ground", **grounding), done)}
    ground["per-phrase"] = ground["union"]
    if phrases_share_an_image_class(real / "ms_cxr.parquet"):
        per_phrase = ground_config(out=folder / "ground-per-phrase", boxes="per-phrase", **grounding)
        ground["per-phrase"] = _run_step("ground per phrase", ground_fn, per_phrase, done)
    return ground


def grounding_settings(config: ReportConfig, model: Path, real: Path) -> dict[str, Any]:
    """How the report grounds a model (a run or one of its checkpoints) on the MS-CXR phrases."""
    return dict(
        model=model,
        data=real / "ms_cxr.parquet",
        steps=config.ground_steps,
        window=config.ground_window,
        seed=config.seed,
        limit=config.ground_limit,
        min_word_count=config.min_word_count,
    )


def _measured_once(
    config: ReportConfig, path: Path, metric: dict, samples: Path, diversity: Path, real: Path, classifier: Any
) -> tuple[dict[str, Any], bool]:
    """Fidelity and diversity of one sample set, cached in `path` under the key of the metric settings and
    the folders' identities (a changed key measures again); whether it was measured now."""
    key = settings_key(
        {
            **metric,
            "samples": input_identity(samples),
            "diversity": input_identity(diversity),
            "real": input_identity(real),
        }
    )
    return _cached(path, key, lambda: measure_run(config, samples, diversity, real, classifier))


def _measure_ms_cxr(
    config: ReportConfig, run: Path, folder: Path, real: Path, steps: Steps, classifier: Any, metric: dict
) -> tuple[dict[str, Any], list[str]]:
    """Fidelity and diversity of the MS-CXR-phrase images (cached in metrics-ms-cxr.json under its own key,
    so adding this column never measures the p19 one again); the keys renamed `*_ms_cxr`."""
    done: list[str] = []
    samples, diversity = _sample_folders(config, run, folder, real, steps, done, prompts="ms-cxr")
    measured, fresh = _measured_once(
        config, folder / "metrics-ms-cxr.json", metric, samples, diversity, real, classifier
    )
    if fresh:
        done.append("metrics-ms-cxr")
    return {
        "fidelity_ms_cxr": measured.get("fidelity", []),
        "diversity_ms_cxr": measured.get("diversity"),
        "n_generated_ms_cxr": measured.get("n_generated"),
    }, done


def grounding_only(config: ReportConfig, setting: Mapping[str, Any]) -> bool:
    """Whether a run is grounded and not sampled: one trained on another text than impressions (labels, a
    `file:` set), which the paper measures in Table 7 alone, unless `--other-sources full`."""
    return config.other_sources == "grounding" and setting.get("prompt_source") not in (None, "impression")


def _report_run(
    config: ReportConfig, run: Path, folder: Path, real: Path, steps: Steps, classifier: Any, metric: dict
) -> tuple[dict[str, Any], list[str]]:
    """One run's entry of metrics.json, and what was recomputed for it."""
    setting = run_summary(run)
    done: list[str] = []
    sampled = not grounding_only(config, setting)
    samples, diversity = _sample_folders(config, run, folder, real, steps, done) if sampled else (None, None)
    ground_dirs = _ground_folders(config, run, folder, real, steps, done)
    ground_dir = ground_dirs["union"]
    measured: dict[str, Any] = {}
    if sampled:
        measured, fresh = _measured_once(config, folder / "metrics.json", metric, samples, diversity, real, classifier)
        if fresh:
            done.append("metrics")
        if not config.table4_p19_only:
            ms_cxr, ms_done = _measure_ms_cxr(config, run, folder, real, steps, classifier, metric)
            measured.update(ms_cxr)
            done += ms_done
    manifest = read_manifest(run) if (run / MANIFEST).is_file() else {}
    training = manifest.get("config", {})
    entry = {
        "path": str(run.resolve()),
        "kind": _run_kind(run),
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
        "grounding": _grounding_summary(ground_dir),
        "grounding_per_phrase": _per_phrase(ground_dirs),
        "overlays": _overlays(ground_dir),
        **measured,
    }
    entry.update(setting=setting, text_source=text_source_of(ground_dir, setting["prompt_source"]))
    entry["eos"] = _eos(entry["grounding"])
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
        from cxrdiff.report.checkpoints import checkpoint_curve

        curve = checkpoint_curve(config, name, run, entry, real, steps, classifier, metric)
        if curve is not None:
            recomputed += f"; checkpoints: {curve}"
    return entry, recomputed


def report(config: ReportConfig, classifier: Any = None, steps: Steps | None = None) -> dict[str, Any]:
    """Run what is missing for each run, measure, and write metrics.json, report.md, report.html.

    `classifier`: an object with name, classes, scores(images) [and features(x), cache_key], used instead
    of torchxrayvision's. `steps` maps "sample" / "ground" to (function, config class); by default
    `cxrdiff.sample` and `cxrdiff.ground` (tests pass stand-ins).
    """
    from cxrdiff.report.coco import coco_real, report_coco

    if (coco := coco_real(config)) is not None:  # COCO data: the paper's Table 2 (cxrdiff.report.coco)
        return report_coco(config, coco, steps)
    checked = check_inputs(config, classifier)
    out, real = Path(config.out), checked.real
    given_steps = steps is not None  # stand-ins (tests) are closures: they run here, never side by side
    steps = dict(steps or _default_steps())
    if classifier is None:
        classifier = _load_classifier(config)
    metric = _metric_settings(config, checked.classifier)
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
        real_metrics, _ = _cached(
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
        "settings": to_dict(config),
        "classifier": checked.classifier,
    }
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
    (a folder from before they were recorded), with the same threshold."""
    summary = json.loads((ground_dir / "summary.json").read_text())
    analysis = summary.get("word_analysis")
    if analysis is not None and "class_words" not in analysis and (ground_dir / "words.parquet").is_file():
        from cxrdiff.ground import word_analysis

        summary["word_analysis"] = word_analysis(_read_table(ground_dir / "words.parquet"), analysis["min_count"])
    return summary


def _per_phrase(ground_dirs: Mapping[str, Path]) -> dict[str, Any]:
    """Table 3's grounding (per phrase): its per-class CNR and average, or a note that it is Table 1's."""
    if ground_dirs["per-phrase"] == ground_dirs["union"]:
        return {"same_as_union": True}
    summary = json.loads((ground_dirs["per-phrase"] / "summary.json").read_text())
    return {"same_as_union": False, "classes": summary.get("classes", {}), "average": summary.get("average")}


def _overlays(ground_dir: Path) -> dict[str, list[str]]:
    """One or more overlay PNG paths per class, from the ground step's scores table."""
    path = ground_dir / "scores.parquet"
    if not path.is_file():
        return {}
    scores = _read_table(path)
    out: dict[str, list[str]] = {}
    for category, group in scores.groupby("category"):
        files = [ground_dir / "overlays" / f"{s}.png" for s in dict.fromkeys(group["sample"])]
        out[str(category)] = [str(f) for f in files if f.is_file()][:3]
    return out
