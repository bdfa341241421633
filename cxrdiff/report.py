"""`cxrdiff report`: both sides of the trade-off, measured for each run and shown beside the paper's.

Two parts. The orchestration (`report`) runs for each run folder what is missing — test-prompt samples,
the diversity set (4 images per prompt), grounding on MS-CXR — reusing step folders whose recorded key
(the step's config plus a fingerprint of every input: its manifest hash, or for a folder without one,
its files' sizes and times) still matches, and recomputing those whose inputs changed; then it measures
fidelity (FID, FID_XRV, MS-SSIM, classifier AUC) with the same key-or-recompute rule. The rendering
(`render`) is a pure function from the metrics dict to metrics.json, report.md and a self-contained
report.html (figures inlined as base64 PNG).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import io
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import MANIFEST, manifest_hash, read_manifest, write_json, write_manifest, write_text
from cxrdiff.config import to_dict
from cxrdiff.console import log
from cxrdiff.data import MS_CXR_CATEGORIES
from cxrdiff.errors import InputError
from cxrdiff.metrics.score import UNTRAINED_LABEL, Score

STEP = "report"


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Settings of `cxrdiff report` (sampling and grounding defaults follow the paper)."""

    runs: tuple[Path, ...] = ()
    out: Path | None = None
    real: Path | None = None  # prepared folder: test.parquet (real p19 images, prompts), ms_cxr.parquet
    inception_weights: Path | None = None
    xrv_weights: Path | None = None
    n_fid: int = 5000
    diversity_prompts: int = 100
    random_features: bool = False
    names: tuple[str, ...] = ()  # display names, one per run; default: the folder names
    fid: bool = True  # FID on InceptionV3 (needs weights or random_features)
    fid_xrv: bool = True  # FID_XRV and the torchxrayvision classifier check (needs weights or random_features)
    sample_steps: int = 75
    guidance: float = 4.0
    scheduler: str = "pndm"
    ground_steps: int = 50
    ground_window: int = 40
    ground_limit: int | None = None
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"  # for the fidelity feature networks
    classifier: Any = None  # an object with name, classes, scores(images) [and features(x)]: used instead of xrv


# --- the paper's numbers (REFERENCE.md) --------------------------------------------------------

PUBLISHED_LOCALIZATION = {  # Table 1: AUC-ROC %, Top-1 %, CNR
    "SDv2": {
        "Atelectasis": (58.5, 0.0, 0.23),
        "Cardiomegaly": (53.1, 8.4, 0.14),
        "Consolidation": (59.3, 2.6, 0.21),
        "Edema": (80.2, 15.2, 0.37),
        "Lung Opacity": (64.7, 1.2, 0.87),
        "Pleural Effusion": (48.8, 1.0, 0.34),
        "Pneumonia": (61.3, 0.5, 0.64),
        "Pneumothorax": (71.0, 10.2, 0.01),
        "Average": (60.6, 5.7, 0.321),
    },
    "Finetune_L": {
        "Atelectasis": (45, 2, -0.15),
        "Cardiomegaly": (45, 2, -0.16),
        "Consolidation": (53, 14, 0.05),
        "Edema": (54, 29, 0.09),
        "Lung Opacity": (53, 7, 0.05),
        "Pleural Effusion": (40, 3, -0.27),
        "Pneumonia": (49, 3, -0.05),
        "Pneumothorax": (81, 27, 0.97),
        "Average": (54, 10, 0.133),
    },
    "Finetune_F": {
        "Atelectasis": (86, 80, 1.25),
        "Cardiomegaly": (73, 40, 0.67),
        "Consolidation": (86, 48, 1.22),
        "Edema": (89, 70, 1.36),
        "Lung Opacity": (83, 38, 1.06),
        "Pleural Effusion": (83, 66, 1.05),
        "Pneumonia": (85, 59, 1.16),
        "Pneumothorax": (74, 20, 0.68),
        "Average": (79, 45, 0.920),
    },
}
_T3 = {
    "ConVIRT": (0.86, 0.64, 1.25, 0.78, 0.68, 1.03, 0.28, 1.02, 0.818),
    "GLoRIA": (0.98, 0.53, 1.38, 1.05, 0.66, 1.18, 0.47, 1.20, 0.930),
    "BioViL-L": (1.17, 0.95, 1.45, 1.19, 0.96, 1.19, 0.74, 1.50, 1.142),
}
PUBLISHED_CNR_METHODS = {m: dict(zip((*MS_CXR_CATEGORIES, "Average"), v, strict=True)) for m, v in _T3.items()}
PUBLISHED_FIDELITY = {  # Table 4: FID, FID_XRV, MS-SSIM %
    "SDv2": (237.6, 104.9, 12.9),
    "Finetune_L": (61.9, 7.7, 10.3),
    "Finetune_F": (75.5, 10.1, 10.1),
}
_T5_ORDER = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Lung Opacity",
    "Edema",
    "Pneumonia",
    "Pneumothorax",
    "Pleural Effusion",
    "Average",
)
_T5 = {
    "real p19": (83.0, 85.5, 87.7, 80.2, 91.4, 75.6, 84.4, 88.7, 84.6),
    "Finetune_L": (75.8, 78.7, 77.8, 75.1, 85.9, 66.2, 79.6, 79.6, 77.3),
    "Finetune_F": (76.8, 79.0, 77.9, 77.5, 84.1, 66.7, 70.1, 84.5, 77.1),
}
PUBLISHED_CLASSIFIER = {m: dict(zip(_T5_ORDER, v, strict=True)) for m, v in _T5.items()}
PUBLISHED_TEXT_SOURCE = {  # Table 7: CNR (learnable, frozen)
    "impressions": (0.15, 0.95),
    "synthetic impressions": (0.22, 0.42),
    "class labels": (0.29, 0.80),
}
PAPER = "Dombrowski et al., AAAI 2024"

PROTOCOL = [
    "Images are compared as 8-bit grey; real p19 images are resized (shorter side) and centre-cropped to the "
    "generated images' size.",
    "FID: torch-fidelity's InceptionV3 (2048-d pool features), grey repeated to 3 channels, normalised once "
    "inside torch-fidelity (the reference code normalised twice).",
    "FID_XRV: torchxrayvision DenseNet121 `densenet121-res224-all`, `features2` (1024-d); input grey, resized "
    "to 224 by us (bilinear, antialiased) and scaled to [-1024, 1024]. Note: torchxrayvision's 'all' weights "
    "were trained on data that includes MIMIC-CXR.",
    "Fréchet distances from a custom or untrained feature network are named for their features and never "
    f"called FID; untrained ones are labelled '{UNTRAINED_LABEL}'.",
    "MS-SSIM (torchmetrics, explicit data range 255): the 6 pairs of each prompt's 4 images, never across "
    "prompts; mean per prompt, then mean ± std over prompts, in %. Scales and window in the table notes.",
    "Classifier check: per class d, AUC of the classifier's score for d on images from d-prompts vs images "
    "from 'No Finding' prompts; the same on real p19 images is the reference row ('Pleural Effusion' is "
    "torchxrayvision's 'Effusion').",
    "Grounding: cross-attention maps of the class words, scored against MS-CXR boxes (AUC-ROC and Top-1 in %; "
    "CNR = (mean_in - mean_out) / sqrt(var_in + var_out), convention as recorded per run).",
]

StepFn = Callable[[Any], dict[str, Any]]


# --- keys: reuse what matches, recompute what changed ------------------------------------------


def fingerprint(path: str | os.PathLike) -> str:
    """A folder's identity for reuse checks: its manifest hash, or (no manifest, e.g. a base model
    folder or a single file) the sizes and modification times of its files."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return manifest_hash(path) or ""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for p in files:
        stat = p.stat()
        digest.update(f"{p.relative_to(path) if p != path else p.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return "files:" + digest.hexdigest()


def step_key(config: Any, inputs: Mapping[str, str | os.PathLike | None]) -> str:
    """sha256 of a step's config (without its output path) and its inputs' fingerprints."""
    settings = {k: v for k, v in (to_dict(config) if dataclasses.is_dataclass(config) else dict(config)).items()}
    settings.pop("out", None)
    prints = {name: fingerprint(p) if p is not None and Path(p).exists() else None for name, p in inputs.items()}
    blob = json.dumps({"config": settings, "inputs": prints}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _run_step(
    name: str, fn: StepFn, config: Any, inputs: Mapping[str, Any], keys: dict[str, str], done: list[str]
) -> Path:
    """Run a step unless its folder is complete and was made with the same key; a stale folder is removed."""
    out = Path(config.out)
    key = step_key(config, inputs)
    if keys.get(name) == key and (out / MANIFEST).is_file():
        log.info("report: %s is up to date in %s", name, out)
        return out
    if out.exists():
        log.info("report: %s changed (config or input); recomputing %s", name, out)
        shutil.rmtree(out)
    fn(config)
    if not (out / MANIFEST).is_file():
        raise InputError(f"{out}: the {name} step finished without a manifest")
    keys[name] = key
    done.append(name)
    return out


# --- inputs ------------------------------------------------------------------------------------


def _run_kind(path: Path) -> str:
    from cxrdiff.models import check_model_folder

    if (path / MANIFEST).is_file():
        read_manifest(path, ("finetune",))
    check_model_folder(path)
    return "finetune" if (path / MANIFEST).is_file() else "base model"


def _real_folder(config: ReportConfig) -> Path:
    if config.real is not None:
        real = Path(config.real)
    else:
        data = [read_manifest(r).get("inputs", {}).get("data", {}).get("path") for r in config.runs]
        data = [d for d in data if d]
        if not data:
            raise InputError("--real: not given and no run records its prepared folder; pass --real PREPARED")
        real = Path(data[0])
    read_manifest(real, "prepare")
    for name in ("test.parquet", "ms_cxr.parquet"):
        if not (real / name).is_file():
            raise InputError(f"--real {real}: no {name} (expected a `cxrdiff prepare` output folder)")
    return real


def _image_path(value: str, real: Path) -> Path:
    path = Path(value)
    if path.is_absolute() or path.exists():
        return path
    mimic = read_manifest(real).get("config", {}).get("mimic")
    return Path(mimic) / path if mimic else real / path


def _names(config: ReportConfig) -> list[str]:
    names = list(config.names) if config.names else [Path(r).name for r in config.runs]
    if len(names) != len(config.runs):
        raise InputError(f"names: {len(names)} given for {len(config.runs)} runs")
    if len(set(names)) != len(names):
        raise InputError(f"runs: names are not unique ({', '.join(names)}); pass names")
    return names


def check_config(config: ReportConfig) -> None:
    if not config.runs:
        raise InputError("report: give at least one RUN folder (a finetune output or a base model folder)")
    if config.out is None:
        raise InputError("--out: required (the report folder)")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if (out / MANIFEST).is_file():
        read_manifest(out, "report")  # refuses another step's folder before its manifest is overwritten
    for r in config.runs:
        _run_kind(Path(r))
    if config.n_fid < 2 or config.diversity_prompts < 1:
        raise InputError(f"--n-fid {config.n_fid} / --diversity-prompts {config.diversity_prompts}: too small")
    from cxrdiff.metrics.fid import resolve_weights

    if not config.random_features:  # check weights before any sampling starts
        if config.fid:
            resolve_weights(config.inception_weights, "inception")
        if config.fid_xrv:
            resolve_weights(config.xrv_weights, "xrv")


# --- measuring -----------------------------------------------------------------------------------


def _read_table(path: Path) -> Any:
    import pandas as pd

    return pd.read_parquet(path)


def _label_groups(frame: Any, paths: list[Path]) -> tuple[dict[str, list[Path]], list[Path]]:
    """Images per class (label 1.0) and the 'No Finding' images, from a table's CheXpert columns."""
    by_class = {
        c: [p for p, v in zip(paths, frame[c], strict=True) if v == 1.0] for c in MS_CXR_CATEGORIES if c in frame
    }
    no_finding = (
        [p for p, v in zip(paths, frame["No Finding"], strict=True) if v == 1.0] if "No Finding" in frame else []
    )
    return by_class, no_finding


def _grey(paths: Sequence[Path], size: int) -> np.ndarray:
    from cxrdiff.images import load_grayscale, resize_center_crop

    out = []
    for p in paths:
        img = load_grayscale(p)
        out.append(img if img.shape == (size, size) else resize_center_crop(img, size))
    return np.stack(out) if out else np.zeros((0, size, size), np.uint8)


def _classifier(config: ReportConfig) -> Any:
    if config.classifier is not None:
        return config.classifier
    if not config.fid_xrv:
        return None
    from cxrdiff.metrics.classifier import XrvClassifier
    from cxrdiff.metrics.fid import default_xrv_path

    if config.xrv_weights is None and not default_xrv_path().is_file():
        return None  # random features only: a random classifier's AUC means nothing, so it is not run
    return XrvClassifier(config.xrv_weights, device=config.device)


def _classifier_key(classifier: Any) -> str:
    return (
        f"{getattr(classifier, 'name', type(classifier).__name__)}:{getattr(classifier, 'cache_key', id(classifier))}"
    )


def _scores(table: Mapping[str, Score]) -> dict[str, Any]:
    return {k: v.as_dict() for k, v in table.items()}


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
        by_class, no_finding = _label_groups(table, fake)
        if no_finding:
            result["classifier"] = _scores(
                clf.classifier_check(
                    classifier, {c: _grey(p, size) for c, p in by_class.items()}, _grey(no_finding, size)
                )
            )
    return result


def _image_size(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as img:
        return int(min(img.size))


def measure_real(config: ReportConfig, real: Path, classifier: Any, size: int) -> dict[str, Any]:
    """The reference row: the classifier check on the real p19 test images."""
    from cxrdiff.metrics import classifier as clf

    if classifier is None:
        return {}
    test = _read_table(real / "test.parquet").head(config.n_fid)
    paths = [_image_path(p, real) for p in test["image_path"]]
    by_class, no_finding = _label_groups(test, paths)
    if not no_finding:
        return {}
    aucs = clf.classifier_check(classifier, {c: _grey(p, size) for c, p in by_class.items()}, _grey(no_finding, size))
    return {"classifier": _scores(aucs)}


# --- the orchestration ---------------------------------------------------------------------------


def _default_steps() -> dict[str, tuple[StepFn, type]]:
    from cxrdiff import ground, sample

    return {"sample": (sample.sample, sample.SampleConfig), "ground": (ground.ground, ground.GroundConfig)}


def report(config: ReportConfig, steps: Mapping[str, tuple[StepFn, type]] | None = None) -> dict[str, Any]:
    """Run what is missing for each run, measure, and write metrics.json, report.md, report.html.

    `steps` maps "sample" / "ground" to (function, config class); by default `cxrdiff.sample` and
    `cxrdiff.ground` (tests pass stand-ins).
    """
    check_config(config)
    real = _real_folder(config)
    names = _names(config)
    steps = dict(steps or _default_steps())
    sample_fn, SampleConfig = steps["sample"]
    ground_fn, GroundConfig = steps["ground"]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    classifier = _classifier(config)
    metric_settings = {
        k: v
        for k, v in to_dict(config).items()
        if k in ("n_fid", "random_features", "fid", "fid_xrv", "diversity_prompts")
    }
    metric_settings["classifier"] = _classifier_key(classifier) if classifier is not None else None
    metric_settings["weights"] = {
        "inception": fingerprint(config.inception_weights) if config.inception_weights else None,
        "xrv": fingerprint(config.xrv_weights) if config.xrv_weights else None,
    }
    recomputed: dict[str, list[str]] = {}
    runs: dict[str, Any] = {}
    size = None
    for name, run in zip(names, config.runs, strict=True):
        run = Path(run)
        folder = out / "runs" / name
        keys_path = folder / "keys.json"
        keys = json.loads(keys_path.read_text()) if keys_path.is_file() else {}
        done: list[str] = []
        common = dict(model=run, steps=config.sample_steps, guidance=config.guidance, scheduler=config.scheduler)
        common.update(seed=config.seed, batch_size=config.batch_size)
        test_cfg = SampleConfig(
            out=folder / "samples", prompts=real / "test.parquet", n_per_prompt=1, limit=config.n_fid, **common
        )
        div_cfg = SampleConfig(
            out=folder / "diversity",
            prompts=real / "test.parquet",
            n_per_prompt=4,
            limit=config.diversity_prompts,
            **common,
        )
        ground_cfg = GroundConfig(
            model=run,
            out=folder / "ground",
            data=real / "ms_cxr.parquet",
            steps=config.ground_steps,
            window=config.ground_window,
            seed=config.seed,
            limit=config.ground_limit,
        )
        inputs = {"model": run, "real": real}
        try:
            samples = _run_step("samples", sample_fn, test_cfg, inputs, keys, done)
            diversity_dir = _run_step("diversity", sample_fn, div_cfg, inputs, keys, done)
            ground_dir = _run_step("ground", ground_fn, ground_cfg, inputs, keys, done)
        finally:
            write_json(keys_path, keys)
        metrics_key = step_key(metric_settings, {"samples": samples, "diversity": diversity_dir, "real": real})
        cached = folder / "metrics.json"
        measured = json.loads(cached.read_text()) if cached.is_file() else {}
        if measured.get("key") != metrics_key:
            measured = {"key": metrics_key, **measure_run(config, samples, diversity_dir, real, classifier)}
            write_json(cached, measured)
            done.append("metrics")
        size = size or measured["image_size"]
        summary = json.loads((ground_dir / "summary.json").read_text())
        manifest = read_manifest(run) if (run / MANIFEST).is_file() else {}
        runs[name] = {
            "path": str(run.resolve()),
            "kind": _run_kind(run),
            "training": {k: manifest.get("config", {}).get(k) for k in ("frozen_text", "steps", "lr", "seed")}
            if manifest
            else {},
            "sampling": {k: v for k, v in common.items() if k != "model"},
            "grounding": summary,
            "overlays": _overlays(ground_dir),
            **{k: v for k, v in measured.items() if k != "key"},
        }
        recomputed[name] = done
    real_key = step_key(metric_settings, {"real": real})
    real_cache = out / "real_metrics.json"
    real_metrics = json.loads(real_cache.read_text()) if real_cache.is_file() else {}
    if real_metrics.get("key") != real_key:
        real_metrics = {"key": real_key, **measure_real(config, real, classifier, size or 64)}
        write_json(real_cache, real_metrics)
    metrics = {
        "runs": runs,
        "real": {k: v for k, v in real_metrics.items() if k != "key"},
        "real_folder": str(real.resolve()),
        "settings": {k: v for k, v in to_dict(config).items() if k not in ("classifier",)},
        "classifier": metric_settings["classifier"],
    }
    files = render(metrics, out)
    write_manifest(
        out,
        STEP,
        config={k: v for k, v in to_dict(config).items() if k != "classifier"},
        inputs={"real": real, **{f"run:{n}": r for n, r in zip(names, config.runs, strict=True)}},
        seed=config.seed,
        files=[f.name for f in files],
    )
    return {
        "out": str(out),
        "report": str(out / "report.html"),
        "recomputed": {n: ",".join(d) or "nothing" for n, d in recomputed.items()},
    }


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


# --- rendering (pure: metrics dict → files) -------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def _pub(value: float) -> str:
    """A published number as printed in the paper (no added or dropped digits)."""
    return f"{value:g}"


def _mean(entry: Any, scale: float = 1.0, digits: int = 1) -> str:
    if not entry:
        return "—"
    mean, std = entry.get("mean"), entry.get("std")
    text = _fmt(None if mean is None else mean * scale, digits)
    return text + (f" ± {std * scale:.{digits}f}" if std else "")


@dataclasses.dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "---|" * len(self.headers))
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in self.rows]
        if self.note:
            lines += ["", f"*{self.note}*"]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        note = f'<p class="note">{html.escape(self.note)}</p>' if self.note else ""
        table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        return f"<h3>{html.escape(self.title)}</h3>{table}{note}"


def _score_cell(entry: Mapping[str, Any] | None, digits: int = 1) -> str:
    return Score.from_dict(dict(entry)).text(digits) if entry else "—"


def tables(metrics: Mapping[str, Any]) -> list[Table]:
    """The paper's tables (published numbers labelled with their source) beside this report's runs."""
    runs = metrics.get("runs", {})
    classes = [*MS_CXR_CATEGORIES, "Average"]
    out: list[Table] = []

    headers = (
        ["class"] + [f"{m} (published, Table 1)" for m in PUBLISHED_LOCALIZATION] + [f"{n} (this report)" for n in runs]
    )
    rows = []
    for c in classes:
        row = [c] + [" / ".join(_pub(v) for v in t[c]) for t in PUBLISHED_LOCALIZATION.values()]
        for r in runs.values():
            g = r.get("grounding", {})
            e = g.get("average") if c == "Average" else g.get("classes", {}).get(c)
            row.append(
                " / ".join((_mean(e.get("auc_roc"), 100), _mean(e.get("top1"), 100), _mean(e.get("cnr"), 1, 2)))
                if e
                else "—"
            )
        rows.append(row)
    out.append(
        Table("Localization on MS-CXR: AUC-ROC % / Top-1 % / CNR", headers, rows, "Published: " + PAPER + ", Table 1.")
    )

    headers = ["class"] + [f"{m} (published, Table 3)" for m in PUBLISHED_CNR_METHODS] + [f"{n} CNR" for n in runs]
    rows = []
    for c in classes:
        row = [c] + [_pub(PUBLISHED_CNR_METHODS[m][c]) for m in PUBLISHED_CNR_METHODS]
        for r in runs.values():
            g = r.get("grounding", {})
            e = g.get("average") if c == "Average" else g.get("classes", {}).get(c)
            row.append(_mean(e.get("cnr"), 1, 2) if e else "—")
        rows.append(row)
    out.append(
        Table(
            "CNR against published phrase-grounding methods",
            headers,
            rows,
            "Published: Table 3 of " + PAPER + "; BioViL-T reports 1.33 ± 0.04 average.",
        )
    )

    titles: dict[str, str] = {}
    for r in runs.values():
        for s in r.get("fidelity", []):
            titles.setdefault(s["name"], Score.from_dict(s).title)
    names = ["FID", "FID_XRV"] + [n for n in titles if n not in ("FID", "FID_XRV")]
    headers = ["model", "source"] + [titles.get(n, n) for n in names] + ["MS-SSIM %"]
    rows = []
    for m, (f1, f2, ms) in PUBLISHED_FIDELITY.items():
        rows.append([m, "published, Table 4", _pub(f1), _pub(f2)] + ["—"] * (len(names) - 2) + [_pub(ms)])
    for n, r in runs.items():
        by_name = {s["name"]: s for s in r.get("fidelity", [])}
        rows.append(
            [n, "this report"] + [_score_cell(by_name.get(k)) for k in names] + [_score_cell(r.get("diversity"))]
        )
    div = next((r["diversity"]["protocol"] for r in runs.values() if r.get("diversity")), None)
    note = "Published: Table 4 of " + PAPER + " (512 px, 5,000 images)."
    if div:
        note += (
            f" MS-SSIM here: {div.get('scales')} scales, {div.get('kernel_size')}-px window σ {div.get('sigma'):.2f}, "
            f"data range {div.get('data_range'):g}, {div.get('prompts')} prompts × 6 pairs."
        )
    out.append(Table("Fidelity and diversity", headers, rows, note))

    headers = ["images", "source", *_T5_ORDER]
    rows = [[m, "published, Table 5"] + [_pub(v[c]) for c in _T5_ORDER] for m, v in PUBLISHED_CLASSIFIER.items()]
    if metrics.get("real", {}).get("classifier"):
        rows.append(
            ["real p19 (reference)", "this report"]
            + [_score_cell(metrics["real"]["classifier"].get(c)) for c in _T5_ORDER]
        )
    for n, r in runs.items():
        if r.get("classifier"):
            rows.append([n, "this report"] + [_score_cell(r["classifier"].get(c)) for c in _T5_ORDER])
    out.append(
        Table(
            "Classifier AUC %: class d vs No Finding",
            headers,
            rows,
            f"Classifier here: {metrics.get('classifier') or 'none'}. Published: Table 5 of {PAPER}, torchxrayvision.",
        )
    )

    headers = ["model", "class", "top words (mean CNR, n)"]
    rows = []
    for n, r in runs.items():
        top = r.get("grounding", {}).get("word_analysis", {}).get("top3", {})
        for c, words in top.items():
            rows.append([n, c, ", ".join(f"{w['word']} ({w['cnr']:.2f}, {w['n']})" for w in words)])
    out.append(Table("Word analysis: the 3 words with the highest mean CNR per class", headers, rows))
    rows = [[src, _pub(a), _pub(b)] for src, (a, b) in PUBLISHED_TEXT_SOURCE.items()]
    out.append(Table("CNR by training text (published, Table 7)", ["text", "learnable", "frozen"], rows))
    return out


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def tradeoff_figure(metrics: Mapping[str, Any]) -> bytes:
    """Fidelity against CNR: the paper's three models (Tables 1, 4) and this report's runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for m, (fid_value, _, _) in PUBLISHED_FIDELITY.items():
        left.scatter(PUBLISHED_LOCALIZATION[m]["Average"][2], fid_value)
        left.annotate(m, (PUBLISHED_LOCALIZATION[m]["Average"][2], fid_value))
    left.set(xlabel="CNR (average)", ylabel="FID", title="published (Tables 1 and 4)")
    ylabel = None
    for n, r in metrics.get("runs", {}).items():
        cnr = (r.get("grounding", {}).get("average") or {}).get("cnr", {}).get("mean")
        fid_entry = (r.get("fidelity") or [None])[0]
        if cnr is None or fid_entry is None:
            continue
        ylabel = Score.from_dict(fid_entry).title
        right.scatter(cnr, fid_entry["value"])
        right.annotate(n, (cnr, fid_entry["value"]))
    right.set(xlabel="CNR (average)", ylabel=ylabel or "fidelity", title="this report (lower is closer to real)")
    return _png(fig)


def grounding_figure(metrics: Mapping[str, Any]) -> bytes | None:
    """One overlay per class (columns) for each run (rows): e.g. frozen vs learnable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    runs = {n: r.get("overlays", {}) for n, r in metrics.get("runs", {}).items()}
    classes = [c for c in MS_CXR_CATEGORIES if any(o.get(c) for o in runs.values())]
    if not classes:
        return None
    fig, axes = plt.subplots(len(runs), len(classes), figsize=(1.8 * len(classes), 2.0 * len(runs)), squeeze=False)
    for i, (n, overlays) in enumerate(runs.items()):
        for j, c in enumerate(classes):
            ax = axes[i][j]
            ax.axis("off")
            if overlays.get(c) and Path(overlays[c][0]).is_file():
                ax.imshow(np.asarray(Image.open(overlays[c][0]).convert("RGB")))
            if i == 0:
                ax.set_title(c, fontsize=8)
            if j == 0:
                ax.text(-0.1, 0.5, n, transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=8)
    return _png(fig)


def _untrained(metrics: Mapping[str, Any]) -> bool:
    return UNTRAINED_LABEL in json.dumps(metrics, default=str)


def render(metrics: Mapping[str, Any], out: str | os.PathLike) -> list[Path]:
    """Write metrics.json, report.md and a self-contained report.html from the metrics dict."""
    out = Path(out)
    tabs = tables(metrics)
    figures = {"trade-off": tradeoff_figure(metrics), "grounding": grounding_figure(metrics)}
    write_json(out / "metrics.json", metrics)
    banner = (
        f"**Warning: some Fréchet distances use randomly initialised networks ({UNTRAINED_LABEL}).**"
        if _untrained(metrics)
        else ""
    )
    runs = metrics.get("runs", {})
    settings = [
        f"- **{n}** ({r.get('kind')}, {r.get('path')}): training {json.dumps(r.get('training', {}))}; "
        f"sampling {json.dumps(r.get('sampling', {}))}; "
        f"grounding {json.dumps(r.get('grounding', {}).get('conventions', {}))}"
        for n, r in runs.items()
    ]
    md = ["# cxrdiff report: accuracy vs interpretability", ""]
    if banner:
        md += [banner, ""]
    md += [f"Published numbers are from {PAPER}, labelled with their table; all others were measured here.", ""]
    md += [t.markdown() for t in tabs]
    for name, png in figures.items():
        if png is not None:
            (out / f"{name}.png").write_bytes(png)
            md += [f"![{name}]({name}.png)", ""]
    md += ["## Protocol", ""] + [f"- {p}" for p in PROTOCOL] + ["", "## Runs", ""] + settings
    write_text(out / "report.md", "\n".join(md) + "\n")

    body = ["<h1>cxrdiff report: accuracy vs interpretability</h1>"]
    if banner:
        body.append(f'<p class="warn">{html.escape(banner.strip("*"))}</p>')
    body.append(
        f"<p>Published numbers are from {html.escape(PAPER)}, labelled with their table; "
        "all others were measured here.</p>"
    )
    body += [t.html() for t in tabs]
    for name, png in figures.items():
        if png is not None:
            data = base64.b64encode(png).decode()
            body.append(
                f'<h3>{html.escape(name)}</h3><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
            )
    body.append("<h2>Protocol</h2><ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in PROTOCOL) + "</ul>")
    body.append("<h2>Runs</h2><ul>" + "".join(f"<li>{html.escape(s[2:])}</li>" for s in settings) + "</ul>")
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #999;padding:3px 6px;font-size:13px}th{background:#eee}.note{color:#555;font-size:12px}"
        ".warn{background:#fdd;padding:6px;font-weight:bold}img{max-width:100%}"
    )
    head = f'<meta charset="utf-8"><title>cxrdiff report</title><style>{style}</style>'
    page = f"<!DOCTYPE html><html><head>{head}</head><body>{''.join(body)}</body></html>"
    write_text(out / "report.html", page)
    files = [out / "metrics.json", out / "report.md", out / "report.html"]
    return files + [out / f"{n}.png" for n, png in figures.items() if png is not None]
