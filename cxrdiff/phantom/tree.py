"""The phantom step: plan the studies, then write the MIMIC-CXR-JPG tree (JPG, some DICOM, reports, the three
CSVs), the MS-CXR box table and `phantom_truth.json` into a step folder that resumes and refuses strangers.

Everything random comes from seeds derived from `seed` and the image's position in the plan, so the same
settings write the same bytes whatever the number of workers and however often a killed run is resumed.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import StepFolder, atomic_path, write_bytes, write_json, write_text
from cxrdiff.config import to_dict
from cxrdiff.data import LABELS, MS_CXR_CATEGORIES, MS_CXR_FILE_COLUMNS, patient_folder
from cxrdiff.images import mimic_cxr_jpg
from cxrdiff.phantom.anatomy import Finding, picture_to_uint8, render, sample_anatomy, sample_finding
from cxrdiff.phantom.config import MS_CXR_FILE, TRUTH_FILE, PhantomConfig
from cxrdiff.phantom.preview import write_preview
from cxrdiff.phantom.report_text import label_text, write_report_text

FOLDERS = (19, 10, 11, 12, 13, 14, 15, 16, 17, 18)  # round robin from p19, so p19 exists and holds ~10%
REPORT_CASES = ("standard", "no_impression", "short_impression", "conclusion_heading")
METADATA_COLUMNS_FULL = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
_FINDING_STUDIES = 0.6  # share of frontal studies with at least one finding
_UNCERTAIN = 0.12  # share of findings whose text hedges (CheXpert -1.0)
_MS_CXR_SHARE = 0.3  # share of eligible (certain, outside p19) images per category that get boxes


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, 5))


def plan_studies(patients: int, seed: int, size: int, dicom_fraction: float) -> tuple[list[dict], np.random.Generator]:
    """Every study and image, decided up front from one generator (the pictures get seeds of their own)."""
    rng = np.random.default_rng(seed)
    suffixes = rng.choice(10**6, patients, replace=False)
    n_studies = rng.integers(1, 5, patients)
    study_ids = 50_000_000 + rng.choice(10**7, int(n_studies.sum()), replace=False)
    studies, k = [], 0
    for p in range(patients):
        subject = FOLDERS[p % len(FOLDERS)] * 10**6 + int(suffixes[p])
        split = ("validate", "test", "train")[int(np.searchsorted([0.02, 0.04], rng.random(), side="right"))]
        date = int(rng.integers(2110, 2200)) * 10000 + int(rng.integers(1, 13)) * 100 + int(rng.integers(1, 29))
        for s in range(int(n_studies[p])):
            study = int(study_ids[k])
            k += 1
            view = "PA" if rng.random() < 0.6 else "AP"
            findings: list[Finding] = []
            if rng.random() < _FINDING_STUDIES:
                count = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
                for c in sorted(rng.choice(len(MS_CXR_CATEGORIES), count, replace=False)):
                    f = sample_finding(rng, MS_CXR_CATEGORIES[c])
                    certain = f.category == "Cardiomegaly" or rng.random() >= _UNCERTAIN
                    findings.append(dataclasses.replace(f, certain=certain))
            weights = [0.86, 0.07, 0.0, 0.07] if findings else [0.8, 0.05, 0.08, 0.07]
            case = REPORT_CASES[int(rng.choice(len(REPORT_CASES), p=weights))]
            phrases = [label_text(f, int(rng.integers(3))) for f in findings]
            extra_blank = bool(rng.random() < 0.1)
            text, labels = write_report_text(rng, findings, phrases, view, case, extra_blank)
            views = [view] + [view] * int(rng.random() < 0.05) + ["LATERAL"] * int(rng.random() < 0.35)
            images = []
            for i, v in enumerate(views):
                height = int(round(size * (1.0, 1.125, 1.25)[rng.integers(3)]))
                dicom = None
                if rng.random() < dicom_fraction:
                    dicom = {
                        "photometric": "MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2",
                        "bits": 12 if rng.random() < 0.6 else 16,
                        "low": int(rng.integers(0, 300)),
                    }
                images.append(
                    {
                        "dicom_id": _dicom_id(rng),
                        "view": v,
                        "width": size,
                        "height": height,
                        "dicom": dicom,
                        "image_seed": [seed, p, s, i],
                        "anatomy_seed": [seed, p],
                    }
                )
            studies.append(
                {
                    "subject_id": subject,
                    "study_id": study,
                    "split": split,
                    "date": date + s,  # consecutive days (de-identified dates are shifted, not real)
                    "time": _study_time(rng),
                    "view": view,
                    "findings": findings,
                    "phrases": phrases,
                    "case": case,
                    "extra_blank": extra_blank,
                    "report": text,
                    "labels": labels,
                    "images": images,
                }
            )
    return studies, rng


def _study_time(rng: np.random.Generator) -> float:
    """MIMIC's StudyTime: HHMMSS.fff as a number."""
    ms = int(rng.integers(0, 86_400_000))
    hours, minutes, seconds = ms // 3_600_000, ms // 60_000 % 60, ms // 1000 % 60
    return round(hours * 10000 + minutes * 100 + seconds + (ms % 1000) / 1000, 3)


def _relative(study: dict, image: dict | None = None, suffix: str = ".jpg") -> str:
    subject, sid = study["subject_id"], study["study_id"]
    base = f"files/{patient_folder(subject)}/p{subject}"
    return f"{base}/s{sid}.txt" if image is None else f"{base}/s{sid}/{image['dicom_id']}{suffix}"


def _render_task(task: dict) -> tuple[np.ndarray, dict[str, list[list[int]]]]:
    anatomy = sample_anatomy(np.random.default_rng(task["anatomy_seed"]))
    findings = [Finding(**f) for f in task["findings"]] if task["view"] != "LATERAL" else []
    picture, _, boxes = render(
        np.random.default_rng(task["image_seed"]), task["width"], task["height"], findings, anatomy, task["view"]
    )
    return picture, boxes


def rerender(entry: dict) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, list[list[int]]]]:
    """Draw an image of the phantom again from its `phantom_truth.json` entry: (its JPG before compression,
    masks, boxes)."""
    anatomy = sample_anatomy(np.random.default_rng(entry["anatomy_seed"]))
    findings = [
        Finding(**{k: f[k] for k in ("category", "side", "lobe", "severity", "certain")}) for f in entry["findings"]
    ]
    picture, masks, boxes = render(
        np.random.default_rng(entry["image_seed"]), entry["width"], entry["height"], findings, anatomy, entry["view"]
    )
    return mimic_cxr_jpg(picture_to_uint8(picture)), masks, boxes


def _write_dicom(path: Path, grey: np.ndarray, task: dict) -> None:
    """The picture's 8-bit grey levels as a DX DICOM's stored values, each level a fixed step of the stored
    range (inverted for MONOCHROME1), so that MIMIC-CXR-JPG's conversion (`mimic_cxr_jpg`: min-max, invert,
    equalise) gives exactly the phantom's JPG before compression: distinct levels stay distinct and keep
    their order, and equalisation depends on nothing else. Its window maps that range onto black..white,
    so `--dicom-contrast window` gives back the grey levels before equalisation."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    spec = task["dicom"]
    top = 2 ** spec["bits"] - 1
    low = spec["low"]
    step = ((top - spec["low"] if spec["bits"] == 16 else top - 2 * spec["low"]) - low) // 255
    high = low + 255 * step
    levels = grey.astype(np.int64)
    if spec["photometric"] == "MONOCHROME1":
        levels = 255 - levels
    stored = (low + levels * step).astype("<u2")  # (H, W)
    digits = int(task["dicom_id"].replace("-", "")[:32], 16)
    sop = f"2.25.{digits}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop
    ds.StudyInstanceUID = f"2.25.{task['study_id'] * 10**6 + task['subject_id'] % 10**6}"
    ds.SeriesInstanceUID = f"2.25.{digits // 7}"
    ds.Modality, ds.PatientID, ds.PatientName = "DX", str(task["subject_id"]), "___"
    ds.StudyID, ds.StudyDate, ds.StudyTime = str(task["study_id"]), str(task["date"]), f"{task['time']:010.3f}"
    ds.ViewPosition = task["view"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, spec["photometric"]
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, spec["bits"], spec["bits"] - 1, 0
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    ds.WindowCenter = f"{(low + high) / 2 + 0.5:g}"
    ds.WindowWidth = f"{high - low + 1:g}"
    ds.PixelData = stored.tobytes()
    with atomic_path(path) as tmp:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)


def _image_worker(args: tuple[str, dict]) -> tuple[str, dict[str, list[list[int]]]]:
    """Render one image and write its JPG (and DICOM) unless already there; return its boxes."""
    from PIL import Image

    root, task = args
    picture, boxes = _render_task(task)
    grey = picture_to_uint8(picture)  # what the phantom's DICOM stores, one step per level
    jpg = Path(root) / task["path"]
    if not jpg.is_file():  # as MIMIC-CXR-JPG's JPGs were made from the DICOMs, at quality 95
        with atomic_path(jpg) as tmp:
            Image.fromarray(mimic_cxr_jpg(grey)).save(tmp, format="JPEG", quality=95)
    if task["dicom"] is not None and not (Path(root) / task["dicom_path"]).is_file():
        _write_dicom(Path(root) / task["dicom_path"], grey, task)
    return task["dicom_id"], boxes


def _csv_gz(frame) -> bytes:
    """A CSV, gzipped with mtime 0 and no file name in the header, so the same table gives the same bytes."""
    return gzip.compress(frame.to_csv(index=False, lineterminator="\n").encode(), compresslevel=6, mtime=0)


# --- the step -------------------------------------------------------------------------------------------


def write_mimic_tree(config: PhantomConfig, folder: StepFolder) -> dict[str, Any]:
    """Write the phantom MIMIC-CXR tree into the claimed `folder`; return its paths and counts."""
    from cxrdiff.console import log, progress

    out = Path(config.out)
    if folder.finished:
        log.info("%s: phantom already complete with these settings", out)
        return _result(out, folder.manifest["counts"])
    studies, rng = plan_studies(config.patients, config.seed, config.size, config.dicom_fraction)
    tasks = _write_reports(out, studies)
    boxes = dict(_run_images(out, tasks, config.workers, progress))
    chexpert = _write_tables(out, studies)
    ms_cxr = _write_ms_cxr(out, studies, boxes, rng)
    _write_truth(out, studies, boxes)
    if config.preview:
        write_preview(out, out / "preview.png")
    counts = _counts(studies, ms_cxr, chexpert)
    folder.finish(config=to_dict(config), seed=config.seed, extra={"counts": counts, "truth": TRUTH_FILE})
    return _result(out, counts)


def _write_reports(out: Path, studies: list[dict]) -> list[dict]:
    """Write every report; return one rendering task per image (what a worker process needs to draw it)."""
    tasks = []
    for study in studies:
        write_text(out / _relative(study), study["report"])
        for image in study["images"]:
            tasks.append(
                image
                | {
                    "path": _relative(study, image),
                    "dicom_path": _relative(study, image, ".dcm") if image["dicom"] else None,
                    "findings": [dataclasses.asdict(f) for f in study["findings"]],
                    "subject_id": study["subject_id"],
                    "study_id": study["study_id"],
                    "date": study["date"],
                    "time": study["time"],
                }
            )
    return tasks


def _write_tables(out: Path, studies: list[dict]):
    """The metadata, split and CheXpert tables, as the real files have them; return the CheXpert frame."""
    import pandas as pd

    procedure = {"PA": "CHEST (PA AND LAT)", "AP": "CHEST (PORTABLE AP)"}
    view_meaning = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}
    metadata, split, chexpert = [], [], []
    for study in studies:
        chexpert.append({"subject_id": study["subject_id"], "study_id": study["study_id"], **study["labels"]})
        for image in study["images"]:
            metadata.append(
                {
                    "dicom_id": image["dicom_id"],
                    "subject_id": study["subject_id"],
                    "study_id": study["study_id"],
                    "PerformedProcedureStepDescription": procedure[study["view"]],
                    "ViewPosition": image["view"],
                    "Rows": image["height"],
                    "Columns": image["width"],
                    "StudyDate": study["date"],
                    "StudyTime": study["time"],
                    "ProcedureCodeSequence_CodeMeaning": procedure[study["view"]],
                    "ViewCodeSequence_CodeMeaning": view_meaning[image["view"]],
                    "PatientOrientationCodeSequence_CodeMeaning": "Erect" if study["view"] == "PA" else "Recumbent",
                }
            )
            split.append(
                {
                    k: image["dicom_id"] if k == "dicom_id" else study[k]
                    for k in ("dicom_id", "study_id", "subject_id", "split")
                }
            )
    metadata_frame = pd.DataFrame(metadata, columns=list(METADATA_COLUMNS_FULL))
    write_bytes(out / "mimic-cxr-2.0.0-metadata.csv.gz", _csv_gz(metadata_frame))
    write_bytes(out / "mimic-cxr-2.0.0-split.csv.gz", _csv_gz(pd.DataFrame(split)))
    chexpert_frame = pd.DataFrame(chexpert, columns=["subject_id", "study_id", *LABELS])
    write_bytes(out / "mimic-cxr-2.0.0-chexpert.csv.gz", _csv_gz(chexpert_frame))
    return chexpert_frame


def _write_ms_cxr(out: Path, studies: list[dict], boxes: dict, rng: np.random.Generator):
    """MS-CXR: a share of the certain findings' first frontal images outside p19, one row per box."""
    import pandas as pd

    eligible: dict[str, list[tuple[dict, dict, int]]] = {c: [] for c in MS_CXR_CATEGORIES}
    for study in studies:
        if patient_folder(study["subject_id"]) == "p19":
            continue
        first = next(im for im in study["images"] if im["view"] != "LATERAL")
        for n, f in enumerate(study["findings"]):
            if f.certain and boxes[first["dicom_id"]].get(f.category):
                eligible[f.category].append((study, first, n))
    rows = []
    for category in MS_CXR_CATEGORIES:
        candidates = eligible[category]
        if not candidates:
            continue
        take = max(1, round(_MS_CXR_SHARE * len(candidates)))
        for index in sorted(rng.choice(len(candidates), take, replace=False)):
            study, image, n = candidates[index]
            for x, y, w, h in boxes[image["dicom_id"]][category]:
                rows.append(
                    {
                        "dicom_id": image["dicom_id"],
                        "category_name": category,
                        "label_text": study["phrases"][n],
                        "path": _relative(study, image),
                        "x": x,
                        "y": y,
                        "w": w,
                        "h": h,
                        "image_width": image["width"],
                        "image_height": image["height"],
                    }
                )
    ms_cxr = pd.DataFrame(rows, columns=list(MS_CXR_FILE_COLUMNS))
    write_text(out / MS_CXR_FILE, ms_cxr.to_csv(index=False, lineterminator="\n"))
    return ms_cxr


def _write_truth(out: Path, studies: list[dict], boxes: dict) -> None:
    """`phantom_truth.json`: per frontal image, its seeds and each finding with its phrase and exact boxes."""
    truth: dict[str, Any] = {}
    for study in studies:
        for image in study["images"]:
            if image["view"] == "LATERAL":
                continue
            truth[image["dicom_id"]] = {
                "subject_id": study["subject_id"],
                "study_id": study["study_id"],
                "path": _relative(study, image),
                **{k: image[k] for k in ("view", "width", "height", "image_seed", "anatomy_seed")},
                "findings": [
                    f.as_dict() | {"label_text": phrase, "boxes": boxes[image["dicom_id"]].get(f.category, [])}
                    for f, phrase in zip(study["findings"], study["phrases"], strict=True)
                ],
            }
    write_json(
        out / TRUTH_FILE, {"description": "frontal images only; boxes are (x, y, w, h) in pixels", "images": truth}
    )


def _run_images(out: Path, tasks: list[dict], workers: int | None, progress) -> list:
    """Render and write every image, in worker processes when there are enough images to pay for them."""
    jobs = [(os.fspath(out), task) for task in tasks]
    if workers is None:  # a pool pays for its start-up from about a hundred images on
        workers = min(os.cpu_count() or 1, 8) if len(jobs) >= 64 else 1
    if workers <= 1:
        return [_image_worker(job) for job in progress(jobs, description="phantom images")]
    from concurrent.futures import ProcessPoolExecutor

    from cxrdiff.processes import die_with_parent

    with ProcessPoolExecutor(workers, initializer=die_with_parent) as pool:
        return list(
            progress(pool.map(_image_worker, jobs, chunksize=16), total=len(jobs), description="phantom images")
        )


def _counts(studies: list[dict], ms_cxr, chexpert) -> dict[str, Any]:
    """What the generator put in, for the prepare step's tests to compare their filters against."""
    images = Counter(im["view"] for s in studies for im in s["images"])
    dicoms = Counter(im["dicom"]["photometric"] for s in studies for im in s["images"] if im["dicom"])
    cases = Counter(s["case"] for s in studies)
    return {
        "patients": len({s["subject_id"] for s in studies}),
        "studies": len(studies),
        "studies_p19": sum(patient_folder(s["subject_id"]) == "p19" for s in studies),
        "images": {v: images.get(v, 0) for v in ("PA", "AP", "LATERAL")},
        "images_total": sum(images.values()),
        "dicom": {p: dicoms.get(p, 0) for p in ("MONOCHROME1", "MONOCHROME2")},
        "reports": {
            "no_impression": cases.get("no_impression", 0),
            "short_impression": cases.get("short_impression", 0),
            "conclusion_heading": cases.get("conclusion_heading", 0),
            "extra_blank_lines": sum(s["extra_blank"] for s in studies),
        },
        "no_finding_studies": int((chexpert["No Finding"] == 1.0).sum()),
        "studies_with_findings": sum(bool(s["findings"]) for s in studies),
        "label_positive": {name: int((chexpert[name] == 1.0).sum()) for name in LABELS},
        "label_uncertain": {name: int((chexpert[name] == -1.0).sum()) for name in LABELS},
        "label_negative": {name: int((chexpert[name] == 0.0).sum()) for name in LABELS},
        "ms_cxr": {
            "rows": {c: int((ms_cxr["category_name"] == c).sum()) for c in MS_CXR_CATEGORIES},
            "images": {
                c: int(ms_cxr.loc[ms_cxr["category_name"] == c, "dicom_id"].nunique()) for c in MS_CXR_CATEGORIES
            },
            "images_total": int(ms_cxr["dicom_id"].nunique()),
        },
    }


def _result(out: Path, counts: dict[str, Any]) -> dict[str, Any]:
    result = {
        "out": os.fspath(out),
        "metadata": os.fspath(out / "mimic-cxr-2.0.0-metadata.csv.gz"),
        "split": os.fspath(out / "mimic-cxr-2.0.0-split.csv.gz"),
        "chexpert": os.fspath(out / "mimic-cxr-2.0.0-chexpert.csv.gz"),
        "ms_cxr": os.fspath(out / MS_CXR_FILE),
        "truth": os.fspath(out / TRUTH_FILE),
        "patients": counts["patients"],
        "studies": counts["studies"],
        "images": counts["images_total"],
        "ms_cxr_rows": sum(counts["ms_cxr"]["rows"].values()),
        "counts": counts,
    }
    if (out / "preview.png").is_file():
        result["preview"] = os.fspath(out / "preview.png")
    return result
