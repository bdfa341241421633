"""`cxrdiff prepare`: MIMIC-CXR (JPG or DICOM) + reports + MS-CXR → latent Parquet shards.

A fixed series of named steps, as the paper prepared its data (docs/method.md, "Data preparation"):
check inputs (CSV headers, model folder, output folder) → plan (views, held-out sets, impressions,
image files, the test sample; saved in `.prepare/` so a re-run need not re-read 227k reports) →
encode each unit (`test`, `ms_cxr`, `train-NNNNN`) with the VAE under accelerate → `skipped.csv` →
`manifest.json`. A unit's Parquet file appears only when complete, so a killed run resumes at the
first missing unit and never trusts a half-written one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np

from cxrdiff.artifacts import MANIFEST, StepFolder, atomic_path, write_json, write_text
from cxrdiff.choices import DataFormat, DicomContrast, TextFallback
from cxrdiff.config import settings, to_dict
from cxrdiff.console import log, progress
from cxrdiff.data import (
    LABELS,
    MIMIC_TABLES,
    MS_CXR_COLUMNS,
    TEST_PATIENT_FOLDER,
    VIEWS_KEPT,
    check_columns,
    files_root,
    find_table,
    latent_to_bytes,
    parse_id,
    patient_folder,
    read_chexpert,
    read_metadata,
    read_ms_cxr,
    read_split,
)
from cxrdiff.errors import InputError
from cxrdiff.images import ImageRefused, box_to_frame, load_grayscale, load_rgb, resize_center_crop, to_model_input
from cxrdiff.impressions import SOURCES, read_report, report_path
from cxrdiff.models import Components, check_model_folder, vae_fingerprint
from cxrdiff.speed import limit_cpu_threads

STEP = "prepare"
STATE = ".prepare"  # plan and per-unit skip lists; hidden, not part of the artifact
MIN_IMPRESSION_CHARS = 8  # the paper keeps impressions longer than 7 characters
MAX_UPSCALE = 2  # an image whose short side is under half the resolution is skipped ("image too small")
SKIPPED_COLUMNS = ("part", "dicom_id", "subject_id", "study_id", "reason", "detail", "path")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    # Inputs count by their identity (tables by size and time, the VAE by its fingerprint), not by path.
    NOT_SETTINGS: ClassVar[tuple[str, ...]] = (
        "out",
        "batch_size",
        "workers",
        "mimic",
        "reports",
        "ms_cxr",
        "base_model",
        "format",
        "coco",
        "coco_splits",
        "coco_words",
        "coco_val_fraction",
    )

    mimic: Path | None = None
    reports: Path | None = None
    ms_cxr: Path | None = None
    base_model: Path | None = None
    out: Path | None = None
    resolution: int | None = None
    test_size: int = 5000
    seed: int = 0
    batch_size: int = 16
    shard_size: int = 4096
    exclude_ms_cxr_patients: bool = False
    test_no_finding_max: float = 0.1  # at most this fraction of the test prompts are "No Finding"
    workers: int | None = None  # image-decoding processes per accelerate process; None: from the CPU count
    dicom_contrast: DicomContrast = "mimic-jpg"  # DICOM → 8 bit: MIMIC-CXR-JPG's conversion, or the file's window
    text_fallback: TextFallback = "none"  # none: a report without an IMPRESSION is dropped (the paper's choice)
    # --format coco (cxrdiff.prepare_coco): a COCO-layout root instead of MIMIC-CXR. These fields are left out of a
    # MIMIC run's settings (so its key is as before); a COCO run adds them (see prepare_coco.coco_settings).
    format: DataFormat = "mimic"
    coco: Path | None = None  # COCO root: annotations/{captions,instances}_{split}.json and {split}/ images
    coco_splits: str = "train2017,val2017"  # TRAIN,TEST: the official train split (→ train + val) and the test split
    coco_words: Path | None = None  # CSV (category, word): synonyms that also name a category in a test caption
    coco_val_fraction: float = 0.0983  # share of the train split held out for validation (10,702 of 108,871)


# --- checks ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Inputs:
    mimic: Path
    files: Path
    reports: Path
    tables: dict[str, Path]
    ms_cxr: Path
    base_model: Path
    out: Path
    resolution: int
    latent_shape: tuple[int, int, int]
    scaling_factor: float
    text_fallback: str = "none"


def text_fallbacks(choice: str) -> tuple[str, ...]:
    """`--text-fallback` → the parser's fallback sources, in its order ("last-paragraph" → "last_paragraph")."""
    return () if choice == "none" else tuple(part.replace("-", "_") for part in choice.split(","))


def check_inputs(config: PrepareConfig) -> _Inputs:
    """Every structural fault, before any image, report or weight is read."""
    if config.format == "coco":
        from cxrdiff.prepare_coco import check_coco_inputs

        return check_coco_inputs(config)  # type: ignore[return-value]
    if config.coco is not None or config.coco_words is not None:
        raise InputError("--coco/--coco-words: only with --format coco")
    for name in ("mimic", "ms_cxr", "base_model", "out"):
        if getattr(config, name) is None:
            raise InputError(f"--{name.replace('_', '-')} is required")
    for name in ("test_size", "batch_size", "shard_size"):
        if getattr(config, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(config, name)}: must be at least 1")
    if not 0.0 <= config.test_no_finding_max <= 1.0:
        raise InputError(f"--test-no-finding-max {config.test_no_finding_max}: must be between 0 and 1")
    mimic = Path(config.mimic)
    if not mimic.is_dir():
        raise InputError(f"--mimic {mimic}: no such folder")
    files = files_root(mimic)
    if not any(files.glob("p1[0-9]")):
        raise InputError(f"--mimic {mimic}: no files/p10..p19 patient folders (is it the MIMIC-CXR-JPG root?)")
    reports = Path(config.reports) if config.reports is not None else mimic
    if not reports.is_dir():
        raise InputError(f"--reports {reports}: no such folder")
    if not any(files_root(reports).glob("p1[0-9]/p*/s*.txt")):
        raise InputError(f"--reports {reports}: no report files (files/pXX/pN/sN.txt); give the MIMIC-CXR reports root")
    tables = {kind: find_table(mimic, kind) for kind in MIMIC_TABLES}
    for kind, path in tables.items():
        check_columns(path, MIMIC_TABLES[kind])
    ms_cxr = Path(config.ms_cxr)
    check_columns(ms_cxr, MS_CXR_COLUMNS)
    base_model = check_model_folder(config.base_model)
    resolution, latent_shape, scaling_factor = model_geometry(base_model, config.resolution)
    out = Path(config.out)
    inputs = _Inputs(
        mimic=mimic.absolute(),
        files=files,
        reports=files_root(reports),
        tables=tables,
        ms_cxr=ms_cxr.absolute(),
        base_model=base_model,
        out=out,
        resolution=resolution,
        latent_shape=latent_shape,
        scaling_factor=scaling_factor,
        text_fallback=config.text_fallback,
    )
    StepFolder.claim(out, STEP, prepare_settings(config, inputs), create=False)  # the kind of folder, early
    return inputs


def model_geometry(base_model: Path, resolution: int | None) -> tuple[int, tuple[int, int, int], float]:
    """(resolution, latent shape, scaling factor) from the folder's configs alone, no weights read."""

    def config(part: str) -> SimpleNamespace:
        path = base_model / part / "config.json"
        try:
            return SimpleNamespace(**json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: unreadable ({exc})") from None

    vae, unet = config("vae"), config("unet")
    comps = Components(unet=SimpleNamespace(config=unet), vae=SimpleNamespace(config=vae), text_encoder=None,
                       tokenizer=None, scheduler=None)  # fmt: skip
    factor = comps.vae_scale_factor
    resolution = comps.resolution if resolution is None else int(resolution)
    if resolution < factor or resolution % factor:
        raise InputError(f"--resolution {resolution}: must be a positive multiple of the VAE's factor {factor}")
    latent_shape = (int(vae.latent_channels), resolution // factor, resolution // factor)
    return resolution, latent_shape, float(getattr(vae, "scaling_factor", 0.18215))


# --- plan -----------------------------------------------------------------------------------


def _image_file(files: Path, subject_id: int, study_id: int, dicom_id: str) -> str | None:
    """The image as MIMIC-CXR-JPG's .jpg, else MIMIC-CXR's .dcm; None when neither exists."""
    folder = files / patient_folder(subject_id) / f"p{subject_id}" / f"s{study_id}"
    for suffix in (".jpg", ".dcm"):
        path = folder / f"{dicom_id}{suffix}"
        if path.is_file():
            return str(path)
    return None


def _threads(fn, items: list, description: str) -> list:
    """Map a latency-bound function (file reads, stats) over items with threads, in order."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(progress(pool.map(fn, items), total=len(items), description=description))


def _skip(part: str, row: Any, reason: str, detail: str = "", path: str = "") -> dict[str, Any]:
    subject, study = row.get("subject_id", float("nan")), row.get("study_id", float("nan"))
    return {
        "part": part,
        "dicom_id": str(row["dicom_id"] if "dicom_id" in row else row.get("image_id", "")),  # COCO: the image id
        "subject_id": int(subject) if subject == subject else -1,
        "study_id": int(study) if study == study else -1,
        "reason": reason,
        "detail": detail,
        "path": path,
    }


def _with_prompts(frame, inputs: _Inputs, part: str, counts: dict, skipped: list):
    """Attach each row's impression and image file; drop (and count) rows without either."""
    studies = sorted(set(zip(frame["subject_id"], frame["study_id"], strict=True)))
    fallbacks = text_fallbacks(inputs.text_fallback)
    texts = _threads(
        lambda key: read_report(report_path(inputs.reports, *key), fallbacks), studies, f"reports ({part})"
    )
    by_study = dict(zip(studies, texts, strict=True))
    images = _threads(
        lambda row: _image_file(inputs.files, *row),
        list(zip(frame["subject_id"], frame["study_id"], frame["dicom_id"], strict=True)),
        f"image files ({part})",
    )
    keep, impressions, sources, paths = [], [], [], []
    counters = ("missing_report", "unreadable_report", "no_impression", "no_usable_text", "short_impression")
    for counter in (*counters, "image_not_found"):
        counts[counter] = 0
    for (_, row), image in zip(frame.iterrows(), images, strict=True):
        text, source, fault = by_study[(row["subject_id"], row["study_id"])]
        report = str(report_path(inputs.reports, row["subject_id"], row["study_id"]))
        if fault is not None:  # missing, or unreadable / undecodable (not text in any encoding it could be)
            counts["missing_report" if fault == "missing report" else "unreadable_report"] += 1
            skipped.append(_skip(part, row, fault, path=report))
        elif source == "none" and not fallbacks:
            counts["no_impression"] += 1  # the paper's filter (impressions only), not a fault: counted, not listed
        elif source == "none":
            counts["no_usable_text"] += 1
            skipped.append(_skip(part, row, "no usable text", path=report))
        elif len(text) < MIN_IMPRESSION_CHARS:
            counts["short_impression"] += 1  # a filter of the paper's, not a fault: counted, not listed
        elif image is None:
            counts["image_not_found"] += 1
            expected = Path(report).with_suffix("") / f"{row['dicom_id']}.jpg"
            skipped.append(_skip(part, row, "image not found", path=str(expected)))
        else:
            keep.append(True)
            impressions.append(text)
            sources.append(source)
            paths.append(image)
            continue
        keep.append(False)
    frame = frame[np.array(keep, dtype=bool)].copy()
    frame["impression"], frame["impression_source"], frame["image_path"] = impressions, sources, paths
    return frame


def _sample_test(studies, size: int, no_finding_max: float, seed: int) -> tuple[Any, dict[str, Any]]:
    """A seeded sample of `size` studies in which at most `no_finding_max` of them are No Finding."""
    rng = np.random.default_rng(seed)
    is_nf = (studies["No Finding"] == 1.0).to_numpy()
    nf, other = np.flatnonzero(is_nf), np.flatnonzero(~is_nf)
    size = min(size, len(studies))
    n_nf = min(len(nf), int(np.floor(no_finding_max * size)))
    n_other = min(len(other), size - n_nf)
    topped_up = size - n_nf - n_other  # too few other studies: fill with No Finding, and say so
    n_nf += topped_up
    chosen = np.sort(np.concatenate([rng.choice(nf, n_nf, replace=False), rng.choice(other, n_other, replace=False)]))
    sample = studies.iloc[chosen]

    def classes(frame) -> dict[str, int]:
        return {label: int((frame[label] == 1.0).sum()) for label in LABELS} | {"studies": len(frame)}

    rule = {
        "rule": "seeded sample of p19 studies (one frontal image each, PA before AP, then dicom_id); "
        "'No Finding' (label 1.0) capped at floor(test_no_finding_max × size) studies, the rest drawn from the "
        "other studies",
        "test_no_finding_max": no_finding_max,
        "seed": seed,
        "topped_up_with_no_finding": int(topped_up),
        "before": classes(studies),
        "after": classes(sample),
    }
    return sample, rule


def _ms_cxr_rows(ms, meta, inputs: _Inputs, counts: dict, skipped: list):
    """One row per image–phrase pair (all of its boxes), with ids from the metadata and the image file."""
    import pandas as pd

    counts["csv_rows"] = len(ms)
    optional = [c for c in ("split", "path") if c in ms.columns]
    pairs = []
    for (dicom, category, text), group in ms.groupby(["dicom_id", "category_name", "label_text"], sort=True):
        first = group.iloc[0]
        pairs.append(
            {
                "dicom_id": dicom,
                "category_name": category,
                "label_text": " ".join(str(text).split()),
                "boxes_original": json.dumps(group[["x", "y", "w", "h"]].to_numpy().tolist()),
                "image_width": int(first["image_width"]),
                "image_height": int(first["image_height"]),
                **{c: first[c] for c in optional},
            }
        )
    counts["pairs"] = len(pairs)
    ids = meta.drop_duplicates("dicom_id").set_index("dicom_id")[["subject_id", "study_id"]]
    for name in ("box_outside_image", "not_in_metadata", "image_not_found"):
        counts[name] = 0
    rows = []
    for pair in pairs:
        subject = study = float("nan")
        if pair["dicom_id"] in ids.index:
            subject, study = (int(v) for v in ids.loc[pair["dicom_id"]])
        elif isinstance(pair.get("path"), str) and len(Path(pair["path"]).parts) >= 3:
            parts = Path(pair["path"]).parts
            subject, study = parse_id(parts[-3]), parse_id(parts[-2])  # .../p{subject}/s{study}/{dicom}.jpg
        row = {**pair, "subject_id": subject, "study_id": study}
        boxes = np.array(json.loads(pair["boxes_original"]), dtype=np.float64)
        width, height = pair["image_width"], pair["image_height"]
        if (
            (boxes[:, 2] <= 0).any()
            or (boxes[:, 3] <= 0).any()
            or (boxes[:, 0] < 0).any()
            or (boxes[:, 1] < 0).any()
            or (boxes[:, 0] + boxes[:, 2] > width).any()
            or (boxes[:, 1] + boxes[:, 3] > height).any()
        ):
            counts["box_outside_image"] += 1
            skipped.append(_skip("ms_cxr", row, "box outside image", f"boxes {boxes.tolist()} in {width}x{height}",
                                 str(inputs.ms_cxr)))  # fmt: skip
            continue
        if subject != subject:
            counts["not_in_metadata"] += 1
            skipped.append(_skip("ms_cxr", row, "dicom_id not in metadata", path=str(inputs.ms_cxr)))
            continue
        image = _image_file(inputs.files, subject, study, pair["dicom_id"])
        if image is None:
            counts["image_not_found"] += 1
            skipped.append(_skip("ms_cxr", row, "image not found", path=str(inputs.files)))
            continue
        rows.append({**row, "image_path": image})
    frame = pd.DataFrame(rows, columns=[*pairs[0].keys(), "subject_id", "study_id", "image_path"] if pairs else None)
    if "split" in frame.columns:
        frame = frame.rename(columns={"split": "ms_cxr_split"})
    return frame.drop(columns=["path"], errors="ignore")


def _mark_truncated(train, test, tokenizer: Any):
    """A `truncated` column on both parts: the prompt has more tokens (start and end included) than the text
    encoder's context, so the tokenizer keeps only its first ones, as finetune and sample tokenize it.
    Counted in the manifest (`prompts_over_context`) and logged, never silent."""
    over: dict[str, Any] = {}
    frames = {"train": train, "test": test}
    if tokenizer is None:  # a plan without the model's tokenizer cannot tell
        return train.assign(truncated=None), test.assign(truncated=None), over
    limit = int(tokenizer.model_max_length)
    for part, frame in frames.items():
        texts = list(frame["impression"])
        lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]] if texts else []
        frames[part] = frame.assign(truncated=[n > limit for n in lengths])
        over[part] = int(sum(n > limit for n in lengths))
        if over[part]:
            log.warning("%d of %d %s prompts are longer than the text encoder's %d tokens: the tokenizer keeps "
                        "their first %d (column `truncated`)", over[part], len(texts), part, limit, limit)  # fmt: skip
    over["context_length"] = limit
    return frames["train"], frames["test"], over


def prepare_settings(config: PrepareConfig, inputs: _Inputs) -> dict[str, Any]:
    """What the plan and every unit depend on: settings, input tables (size and mtime) and the VAE."""
    tables = {}
    for name, path in [*inputs.tables.items(), ("ms_cxr", inputs.ms_cxr)]:
        stat = Path(path).stat()
        tables[name] = [str(Path(path).absolute()), stat.st_size, stat.st_mtime_ns]
    roots = {"mimic": str(inputs.mimic), "reports": str(inputs.reports.absolute())}
    return settings(
        config, resolution=inputs.resolution, vae=vae_fingerprint(inputs.base_model), tables=tables, **roots
    )


def build_plan(config: PrepareConfig, inputs: _Inputs, tokenizer: Any = None) -> dict[str, Any]:
    """Every row to encode, grouped in units, with the counts at every filter and the plan-time skips."""
    import pandas as pd

    meta = read_metadata(inputs.tables["metadata"])
    split = read_split(inputs.tables["split"])
    chexpert = read_chexpert(inputs.tables["chexpert"])
    ms = read_ms_cxr(inputs.ms_cxr)
    skipped: list[dict[str, Any]] = []
    counts: dict[str, Any] = {
        "metadata": {
            "images": len(meta),
            "studies": int(meta["study_id"].nunique()),
            "patients": int(meta["subject_id"].nunique()),
            "views": {str(k): int(v) for k, v in meta["ViewPosition"].value_counts().sort_index().items()},
            "official_split": {str(k): int(v) for k, v in split["split"].value_counts().sort_index().items()},
        }
    }
    frontal = meta[meta["ViewPosition"].isin(VIEWS_KEPT)].rename(columns={"ViewPosition": "view"})
    frontal = frontal.merge(chexpert, on=["subject_id", "study_id"], how="left", indicator=True)
    counts["metadata"]["frontal_images"] = len(frontal)
    counts["metadata"]["frontal_images_without_labels"] = int((frontal["_merge"] == "left_only").sum())
    frontal = frontal.drop(columns="_merge")
    frontal = frontal.sort_values(["subject_id", "study_id", "dicom_id"], kind="stable").reset_index(drop=True)
    in_test = frontal["subject_id"].map(patient_folder).eq(TEST_PATIENT_FOLDER).to_numpy()
    ms_ids = set(ms["dicom_id"])
    in_ms = frontal["dicom_id"].isin(ms_ids).to_numpy()
    if config.exclude_ms_cxr_patients:
        ms_patients = set(meta.loc[meta["dicom_id"].isin(ms_ids), "subject_id"])
        in_ms = in_ms | frontal["subject_id"].isin(ms_patients).to_numpy()

    # train: frontal images outside p19 and MS-CXR
    train_counts: dict[str, Any] = {
        "frontal_images": len(frontal),
        "held_out_test_folder": int(in_test.sum()),
        "held_out_ms_cxr": int((in_ms & ~in_test).sum()),
    }
    train = frontal[~in_test & ~in_ms]
    train_counts["candidates"] = len(train)
    train = _with_prompts(train, inputs, "train", train_counts, skipped)
    train_counts["planned"] = len(train)
    for fault, flag in (("missing_report", "--reports"), ("image_not_found", "--mimic")):
        if train_counts["candidates"] and train_counts[fault] > train_counts["candidates"] / 2:
            log.warning("%d of %d training images: %s; is %s right?", train_counts[fault],
                        train_counts["candidates"], fault.replace("_", " "), flag)  # fmt: skip
    counts["train"] = train_counts

    # test: one frontal image per p19 study, then the No-Finding-limited sample
    test_counts: dict[str, Any] = {"images": int(in_test.sum())}
    test = frontal[in_test].copy()
    test["_view_order"] = test["view"].map({v: i for i, v in enumerate(VIEWS_KEPT)})
    test = test.sort_values(["subject_id", "study_id", "_view_order", "dicom_id"], kind="stable")
    test = test.drop_duplicates(["subject_id", "study_id"]).drop(columns="_view_order")
    test_counts["studies"] = len(test)
    test = _with_prompts(test, inputs, "test", test_counts, skipped)
    test_counts["usable_studies"] = len(test)
    test, rule = _sample_test(test.reset_index(drop=True), config.test_size, config.test_no_finding_max, config.seed)
    test_counts["planned"] = len(test)
    counts["test"] = test_counts

    ms_counts: dict[str, Any] = {}
    ms_rows = _ms_cxr_rows(ms, meta, inputs, ms_counts, skipped)
    ms_counts["planned"] = len(ms_rows)
    counts["ms_cxr"] = ms_counts

    sources = {
        part: {s: int((frame["impression_source"] == s).sum()) for s in SOURCES}
        for part, frame in (("train", train), ("test", test))
    }
    train, test, over = _mark_truncated(train, test, tokenizer)

    units = [("test", test), ("ms_cxr", ms_rows)]
    n_shards = (len(train) + config.shard_size - 1) // config.shard_size
    for k in range(n_shards):
        units.append((f"train-{k:05d}", train.iloc[k * config.shard_size : (k + 1) * config.shard_size]))
    items = pd.concat([frame.assign(unit=name) for name, frame in units], ignore_index=True)
    return {
        "items": items,
        "units": [name for name, _ in units],
        "counts": counts,
        "skipped": skipped,
        "test_sampling": rule,
        "impression_sources": sources,
        "prompts_over_context": over,
    }


# --- encode ---------------------------------------------------------------------------------


class _ImageSet:
    """Decode + resize + crop, in DataLoader workers so that JPEG decoding overlaps the VAE. An image that
    cannot be used comes back as None with the reason (a `skipped.csv` reason) and the detail."""

    def __init__(self, paths: list[str], resolution: int, dicom_contrast: DicomContrast = "mimic-jpg", rgb=False):
        self.paths, self.resolution, self.dicom_contrast = paths, resolution, dicom_contrast
        self.rgb = rgb  # COCO: colour kept, (H, W, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, int, int, str, str]:
        path = self.paths[i]
        try:
            image = load_rgb(path) if self.rgb else load_grayscale(path, self.dicom_contrast)
            height, width = image.shape[:2]
            if min(height, width) * MAX_UPSCALE < self.resolution:
                raise ImageRefused(path, "image too small", f"{width}x{height} for resolution {self.resolution}")
            return i, resize_center_crop(image, self.resolution), width, height, "", ""
        except ImageRefused as exc:
            return i, None, 0, 0, exc.reason, str(exc)
        except InputError as exc:
            return i, None, 0, 0, "unreadable image", str(exc)
        except Exception as exc:  # a decoder fault in one file must not stop the run
            return i, None, 0, 0, "unreadable image", f"{path}: {type(exc).__name__}: {exc}"


def _encode_batch(vae: Any, pixels: Any) -> tuple[np.ndarray, np.ndarray]:
    """The VAE posterior's mean and log-variance, before the scaling factor, as float16 arrays."""
    import torch

    with torch.inference_mode():
        posterior = vae.encode(pixels).latent_dist
    mean = posterior.mean.float().cpu().numpy().astype(np.float16)  # (batch, channels, h, w)
    logvar = posterior.logvar.float().cpu().numpy().astype(np.float16)  # (batch, channels, h, w)
    return mean, logvar


def _schema(unit: str):
    import pyarrow as pa

    latent = [("latent_mean", pa.binary()), ("latent_logvar", pa.binary()), ("latent_shape", pa.list_(pa.int32()))]
    ids = [("dicom_id", pa.string()), ("subject_id", pa.int64()), ("study_id", pa.int64())]
    if unit == "ms_cxr":
        box_list = pa.list_(pa.list_(pa.float64()))
        return pa.schema(
            [
                *ids,
                ("category_name", pa.string()),
                ("label_text", pa.string()),
                ("boxes", box_list),
                ("boxes_original", box_list),
                ("image_width", pa.int32()),
                ("image_height", pa.int32()),
                ("split", pa.string()),
                ("image_path", pa.string()),
                *latent,
            ]
        )
    return pa.schema(
        [
            *ids,
            ("view", pa.string()),
            ("impression", pa.string()),
            ("impression_source", pa.string()),
            ("truncated", pa.bool_()),  # longer than the text encoder's context: the tokenizer cuts it
            *[(label, pa.float32()) for label in LABELS],
            ("image_path", pa.string()),
            *latent,
        ]
    )


def _table(unit: str, rows, mean: np.ndarray, logvar: np.ndarray, sizes: list[tuple[int, int]], resolution: int,
           coco: bool = False):  # fmt: skip
    """A unit's Parquet rows: the plan's columns, the prepared boxes (MS-CXR) and the latents."""
    import pyarrow as pa

    if coco:
        from cxrdiff.prepare_coco import coco_schema

    schema = coco_schema(unit) if coco else _schema(unit)
    data: dict[str, list] = {}
    for name in schema.names:
        if name in rows.columns:
            data[name] = rows[name].tolist()
    data["latent_mean"] = [latent_to_bytes(m) for m in mean]
    data["latent_logvar"] = [latent_to_bytes(v) for v in logvar]
    data["latent_shape"] = [list(m.shape) for m in mean]
    if unit == "ms_cxr":
        original = [json.loads(b) for b in rows["boxes_original"]]
        data["boxes_original"] = original
        data["boxes"] = [
            [box_to_frame(_rescale(box, row, size), *size, resolution) for box in boxes]
            for boxes, (_, row), size in zip(original, rows.iterrows(), sizes, strict=True)
        ]
        split = rows["ms_cxr_split"] if "ms_cxr_split" in rows.columns else [None] * len(rows)
        data["split"] = [s if isinstance(s, str) else None for s in split]
    return pa.Table.from_pydict({name: data[name] for name in schema.names}, schema=schema)


def _rescale(box: list[float], row: Any, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A box given for MS-CXR's image_width × image_height, on the image as it is on disk (same unless resized)."""
    sx, sy = size[0] / float(row["image_width"]), size[1] / float(row["image_height"])
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def _encode_unit(
    acc: Any, vae: Any, rows, unit: str, out: Path, resolution: int, batch_size: int, workers: int,
    dicom_contrast: DicomContrast = "mimic-jpg", coco: bool = False,
):  # fmt: skip
    """Each process encodes its contiguous share of the unit into a part; the main process joins the parts in
    order into `<unit>.parquet` (its skips first, then the file, both written atomically). `coco`: colour
    images and the COCO units' columns (cxrdiff.prepare_coco)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from torch.utils.data import DataLoader

    part = "ms_cxr" if unit == "ms_cxr" else unit.split("-")[0]
    state = out / STATE
    mine = rows.iloc[np.array_split(np.arange(len(rows)), acc.num_processes)[acc.process_index]]
    loader = DataLoader(
        _ImageSet(list(mine["image_path"]), resolution, dicom_contrast, rgb=coco),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=list,
        shuffle=False,
    )
    batches = progress(loader, total=len(loader), description=f"encode {unit}") if acc.is_main_process else loader
    tables, skipped = [], []
    dtype = next(vae.parameters()).dtype
    for batch in batches:
        good = [item for item in batch if item[1] is not None]
        for index, _, _, _, reason, detail in (item for item in batch if item[1] is None):
            row = mine.iloc[index]
            skipped.append(_skip(part, row, reason, detail, row["image_path"]))
        if not good:
            continue
        pixels = to_model_input(np.stack([item[1] for item in good]))  # (batch, 3, res, res)
        mean, logvar = _encode_batch(vae, pixels.to(acc.device, dtype))  # (batch, channels, h, w)
        sizes = [(item[2], item[3]) for item in good]
        tables.append(_table(unit, mine.iloc[[item[0] for item in good]], mean, logvar, sizes, resolution, coco))
    if not tables:
        from cxrdiff.prepare_coco import coco_schema

        schema = coco_schema(unit) if coco else _schema(unit)
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    rank = f"{acc.process_index:03d}"
    with atomic_path(state / f"{unit}.part-{rank}.parquet") as tmp:
        pq.write_table(table, tmp)
    write_json(state / f"{unit}.part-{rank}.skipped.json", skipped)
    del tables, table
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    acc.wait_for_everyone()
    if acc.is_main_process:
        parts = [state / f"{unit}.part-{r:03d}.parquet" for r in range(acc.num_processes)]
        skips = [state / f"{unit}.part-{r:03d}.skipped.json" for r in range(acc.num_processes)]
        write_json(state / f"{unit}.skipped.json", [s for path in skips for s in json.loads(path.read_text())])
        with atomic_path(out / f"{unit}.parquet") as tmp:
            pq.write_table(pa.concat_tables([pq.read_table(p) for p in parts]), tmp)
        for path in [*parts, *skips]:
            path.unlink()
    acc.wait_for_everyone()


def _load_vae(base_model: Path, device: Any) -> Any:
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(base_model / "vae", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{base_model / 'vae'}: cannot load the VAE ({str(exc).splitlines()[0]})") from None
    return vae.eval().requires_grad_(False).to(device)  # float32: the latents are stored as float16 anyway


def _load_tokenizer(base_model: Path) -> Any:
    from cxrdiff.models import load_tokenizer

    try:
        return load_tokenizer(base_model / "tokenizer")
    except (OSError, ValueError) as exc:
        raise InputError(f"{base_model / 'tokenizer'}: cannot load the tokenizer ({exc})") from None


# --- the step -------------------------------------------------------------------------------


def _plan(config: PrepareConfig, inputs: _Inputs) -> None:
    """Build and save the plan, or keep the one this (claimed, same-settings) folder already has."""
    import pandas as pd

    state = inputs.out / STATE
    saved = state / "plan.json"
    if saved.is_file() and (state / "plan.parquet").is_file():
        log.info("resuming: %d of the units are complete", len(list(inputs.out.glob("*.parquet"))))
        return
    plan = build_plan(config, inputs, _load_tokenizer(inputs.base_model))
    items = plan.pop("items")
    with atomic_path(state / "plan.parquet") as tmp:
        pd.DataFrame(items).to_parquet(tmp, index=False)
    write_json(saved, plan)


def _workers(config: PrepareConfig, processes: int) -> int:
    if config.workers is not None:
        return max(0, config.workers)
    return max(0, min(8, (os.cpu_count() or 1) // processes - 1))


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Run the step (or resume it); return the counts and paths."""
    import pandas as pd
    from accelerate import Accelerator

    if config.format == "coco":
        from cxrdiff.prepare_coco import prepare_coco

        return prepare_coco(config)
    start = time.perf_counter()
    inputs = check_inputs(config)
    acc = Accelerator()
    limit_cpu_threads(acc.device)  # several processes on one CPU box: processes × threads ≤ cores
    folder = StepFolder.claim(inputs.out, STEP, prepare_settings(config, inputs), create=acc.is_main_process)
    if folder.finished:
        # Finished before with the same settings and inputs: leave the manifest (and with it the hash
        # that later steps recorded) untouched, so nothing downstream is recomputed.
        log.info("%s: already prepared; nothing to do", inputs.out)
        return {} if not acc.is_main_process else _summary(inputs.out)
    if acc.is_main_process:
        _plan(config, inputs)
    acc.wait_for_everyone()
    state = inputs.out / STATE
    plan = json.loads((state / "plan.json").read_text())
    items = pd.read_parquet(state / "plan.parquet")
    todo = [unit for unit in plan["units"] if not (inputs.out / f"{unit}.parquet").is_file()]
    encode_start = time.perf_counter()
    if todo:
        vae = _load_vae(inputs.base_model, acc.device)
        workers = _workers(config, acc.num_processes)
        for number, unit in enumerate(todo, 1):
            if acc.is_main_process:
                log.info("unit %s (%d of %d to do)", unit, number, len(todo))
            rows = items[items["unit"] == unit]
            _encode_unit(acc, vae, rows, unit, inputs.out, inputs.resolution, config.batch_size, workers,
                         config.dicom_contrast)  # fmt: skip
            if acc.is_main_process:
                elapsed = time.perf_counter() - encode_start
                log.info("%s done; about %.0f s left", unit, elapsed / number * (len(todo) - number))
    if not acc.is_main_process:
        return {}
    now = time.perf_counter()
    result = _finish(folder, config, inputs, plan, now - start)
    return result | {"encode_seconds": round(now - encode_start, 2)}


def _summary(out: Path) -> dict[str, Any]:
    """The result of a finished run, from its manifest."""
    manifest = json.loads((out / MANIFEST).read_text())
    counts = manifest["counts"]
    return {
        "out": str(out),
        "train_rows": counts["train"]["rows"],
        "train_shards": len(manifest["shards"]),
        "test_rows": counts["test"]["rows"],
        "ms_cxr_rows": counts["ms_cxr"]["rows"],
        "skipped": manifest["skipped"],
        "resolution": manifest["resolution"],
        "latent_shape": manifest["latent_shape"],
        "seconds": 0.0,
    }


def _finish(
    folder: StepFolder, config: PrepareConfig, inputs: _Inputs, plan: dict[str, Any], seconds: float
) -> dict[str, Any]:
    """skipped.csv and the manifest, from the plan and the completed units."""
    import pandas as pd
    import pyarrow.parquet as pq

    out, state = inputs.out, inputs.out / STATE
    counts = plan["counts"]
    skipped = list(plan["skipped"])
    rows = {"train": 0, "test": 0, "ms_cxr": 0}
    reasons: dict[str, Counter] = {part: Counter() for part in rows}  # images skipped at encoding, by reason
    for unit in plan["units"]:
        part = "ms_cxr" if unit == "ms_cxr" else unit.split("-")[0]
        rows[part] += pq.read_metadata(out / f"{unit}.parquet").num_rows
        unit_skips = json.loads((state / f"{unit}.skipped.json").read_text())
        reasons[part].update(skip["reason"] for skip in unit_skips)
        skipped.extend(unit_skips)
    for part in rows:  # planned = rows + image_skipped, and image_skipped = the sum of its reasons
        counts[part]["image_skipped"] = sum(reasons[part].values())
        counts[part]["image_skip_reasons"] = dict(sorted(reasons[part].items()))
        counts[part]["rows"] = rows[part]
    table = pd.DataFrame(skipped, columns=list(SKIPPED_COLUMNS))
    write_text(out / "skipped.csv", table.to_csv(index=False))
    shards = [f"{unit}.parquet" for unit in plan["units"] if unit.startswith("train-")]
    resolved = to_dict(dataclasses.replace(config, resolution=inputs.resolution))
    folder.finish(
        config=resolved,
        inputs={"mimic": inputs.mimic, "base_model": inputs.base_model},
        seed=config.seed,
        files=[*shards, "test.parquet", "ms_cxr.parquet", "skipped.csv"],
        extra={
            "resolution": inputs.resolution,
            "latent_shape": list(inputs.latent_shape),
            "scaling_factor": inputs.scaling_factor,
            "latent_storage": "mean+logvar",
            "latent_dtype": "float16",
            "vae_fingerprint": vae_fingerprint(inputs.base_model),
            "shards": shards,
            "counts": counts,
            "test_sampling": plan["test_sampling"],
            "impression_sources": plan["impression_sources"],
            "prompts_over_context": plan["prompts_over_context"],
            "dicom_contrast": config.dicom_contrast,
            "skipped": len(skipped),
        },
    )
    return {
        "out": str(out),
        "train_rows": rows["train"],
        "train_shards": len(shards),
        "test_rows": rows["test"],
        "ms_cxr_rows": rows["ms_cxr"],
        "skipped": len(skipped),
        "resolution": inputs.resolution,
        "latent_shape": list(inputs.latent_shape),
        "seconds": round(seconds, 1),
    }
