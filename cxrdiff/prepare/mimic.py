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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import MANIFEST, StepFolder, atomic_path, write_json
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
    parse_id,
    patient_folder,
    read_chexpert,
    read_metadata,
    read_ms_cxr,
    read_split,
)
from cxrdiff.distributed import accelerator
from cxrdiff.errors import InputError
from cxrdiff.images import box_to_frame
from cxrdiff.impressions import MIN_IMPRESSION_CHARS, SOURCES, read_report, report_path
from cxrdiff.models import check_model_folder, model_geometry, vae_fingerprint
from cxrdiff.prepare import jobs
from cxrdiff.prepare.config import PrepareConfig, check_out, input_folder, require_flags, text_fallbacks
from cxrdiff.prepare.encode import (
    STATE,
    Layout,
    encode_unit,
    load_base_tokenizer,
    load_vae,
    loader_workers,
    skipped_row,
)
from cxrdiff.prepare.results import gather_units, latent_record, prepared_result, warn_empty_parts, write_skipped
from cxrdiff.shards import label
from cxrdiff.speed import limit_cpu_threads

# --- checks ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MimicInputs:
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


def check_mimic_inputs(config: PrepareConfig) -> MimicInputs:
    """Every structural fault, before any image, report or weight is read."""
    require_flags(config, ("mimic", "ms_cxr", "base_model", "out"))
    mimic = input_folder("mimic", config.mimic, " (give the MIMIC-CXR-JPG root: files/ and the CSVs)")
    files = files_root(mimic)
    if not any(files.glob("p1[0-9]")):
        raise InputError(f"--mimic {mimic}: no files/p10..p19 patient folders (is it the MIMIC-CXR-JPG root?)")
    reports = input_folder("reports", config.reports if config.reports is not None else mimic,
                           " (give the MIMIC-CXR reports root: files/pXX/...)")  # fmt: skip
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
    inputs = MimicInputs(
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
    check_out(out, prepare_settings(config, inputs))  # the kind of folder, early
    return inputs


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


def _with_prompts(frame, inputs: MimicInputs, part: str, counts: dict, skipped: list):
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
            skipped.append(skipped_row(part, row, fault, path=report))
        elif source == "none" and not fallbacks:
            counts["no_impression"] += 1  # the paper's filter (impressions only): counted and listed
            skipped.append(skipped_row(part, row, "no impression", path=report))
        elif source == "none":
            counts["no_usable_text"] += 1
            skipped.append(skipped_row(part, row, "no usable text", path=report))
        elif len(text) < MIN_IMPRESSION_CHARS:
            counts["short_impression"] += 1  # a filter of the paper's: counted and listed
            skipped.append(skipped_row(part, row, "short impression", f"{len(text)} characters", path=report))
        elif image is None:
            counts["image_not_found"] += 1
            expected = Path(report).with_suffix("") / f"{row['dicom_id']}.jpg"
            skipped.append(skipped_row(part, row, "image not found", path=str(expected)))
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


def _ms_cxr_rows(ms, meta, inputs: MimicInputs, counts: dict, skipped: list):
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
            try:
                subject, study = parse_id(parts[-3]), parse_id(parts[-2])  # .../p{subject}/s{study}/{dicom}.jpg
            except ValueError:
                raise InputError(
                    f"{inputs.ms_cxr}: column 'path' has {pair['path']!r}, not files/pXX/p<subject>/s<study>/<id>.jpg"
                ) from None
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
            detail = f"boxes {boxes.tolist()} in {width}x{height}"
            skipped.append(skipped_row("ms_cxr", row, "box outside image", detail, str(inputs.ms_cxr)))
            continue
        if subject != subject:
            counts["not_in_metadata"] += 1
            skipped.append(skipped_row("ms_cxr", row, "dicom_id not in metadata", path=str(inputs.ms_cxr)))
            continue
        image = _image_file(inputs.files, subject, study, pair["dicom_id"])
        if image is None:
            counts["image_not_found"] += 1
            skipped.append(skipped_row("ms_cxr", row, "image not found", path=str(inputs.files)))
            continue
        rows.append({**row, "image_path": image})
    frame = pd.DataFrame(rows, columns=[*pairs[0].keys(), "subject_id", "study_id", "image_path"] if pairs else None)
    if "split" in frame.columns:
        frame = frame.rename(columns={"split": "ms_cxr_split"})
    return frame.drop(columns=["path"], errors="ignore")


def mark_truncated(train, test, tokenizer: Any):
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


def prepare_settings(config: PrepareConfig, inputs: MimicInputs) -> dict[str, Any]:
    """What the plan and every unit depend on: settings, input tables (size and mtime) and the VAE."""
    tables = {}
    for name, path in [*inputs.tables.items(), ("ms_cxr", inputs.ms_cxr)]:
        stat = Path(path).stat()
        tables[name] = [str(Path(path).absolute()), stat.st_size, stat.st_mtime_ns]
    roots = {"mimic": str(inputs.mimic), "reports": str(inputs.reports.absolute())}
    return settings(
        config, resolution=inputs.resolution, vae=vae_fingerprint(inputs.base_model), tables=tables, **roots
    )


def build_plan(config: PrepareConfig, inputs: MimicInputs, tokenizer: Any = None) -> dict[str, Any]:
    """Every row to encode, grouped in units, with the counts at every filter and the plan-time skips."""
    import pandas as pd

    meta = read_metadata(inputs.tables["metadata"])
    split = read_split(inputs.tables["split"])
    chexpert = read_chexpert(inputs.tables["chexpert"])
    ms = read_ms_cxr(inputs.ms_cxr)
    skipped: list[dict[str, Any]] = []
    duplicates = {}
    for kind, table in (("metadata", meta), ("split", split), ("chexpert", chexpert), ("ms_cxr", ms)):
        duplicates[kind] = len(table.attrs.get("duplicates", []))
        skipped.extend(table.attrs.get("duplicates", []))
        if duplicates[kind]:
            where = inputs.tables.get(kind, inputs.ms_cxr)
            log.warning("%s: %d duplicate row(s) dropped (listed in skipped.csv)", where, duplicates[kind])
    counts: dict[str, Any] = {
        "duplicate_rows": duplicates,
        "metadata": {
            "images": len(meta),
            "studies": int(meta["study_id"].nunique()),
            "patients": int(meta["subject_id"].nunique()),
            "views": {str(k): int(v) for k, v in meta["ViewPosition"].value_counts().sort_index().items()},
            "official_split": {str(k): int(v) for k, v in split["split"].value_counts().sort_index().items()},
        },
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
    if not len(ms_rows):  # prepare can still train, but `ground` and `report` will have no phrase to score
        why = "no rows (only a header)" if ms.empty else f"none of its {len(ms)} boxes is usable (see skipped.csv)"
        log.warning("--ms-cxr %s: %s; ms_cxr.parquet will be empty: nothing to ground", inputs.ms_cxr, why)

    sources = {
        part: {s: int((frame["impression_source"] == s).sum()) for s in SOURCES}
        for part, frame in (("train", train), ("test", test))
    }
    train, test, over = mark_truncated(train, test, tokenizer)

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


def mimic_schema(unit: str):
    """The columns of a MIMIC unit: ids, the text and labels (or MS-CXR's phrase and boxes), the latents last."""
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


def ms_cxr_columns(unit: str, rows, sizes: list[tuple[int, int]], resolution: int) -> dict[str, list]:
    """MS-CXR's boxes in the prepared frame (given for MS-CXR's image size, rescaled to the file's, then
    resized and cropped as the image), the original boxes, and MS-CXR's own split."""
    if unit != "ms_cxr":
        return {}
    original = [json.loads(b) for b in rows["boxes_original"]]
    split = rows["ms_cxr_split"] if "ms_cxr_split" in rows.columns else [None] * len(rows)
    return {
        "boxes_original": original,
        "boxes": [
            [box_to_frame(_rescale(box, row, size), *size, resolution) for box in boxes]
            for boxes, (_, row), size in zip(original, rows.iterrows(), sizes, strict=True)
        ],
        "split": [s if isinstance(s, str) else None for s in split],
    }


def _rescale(box: list[float], row: Any, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A box given for MS-CXR's image_width × image_height, on the image as it is on disk (same unless resized)."""
    sx, sy = size[0] / float(row["image_width"]), size[1] / float(row["image_height"])
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


# --- the step -------------------------------------------------------------------------------


LAYOUT = Layout(schema=mimic_schema, columns=ms_cxr_columns)


def _plan(config: PrepareConfig, inputs: MimicInputs) -> None:
    """Build and save the plan, or keep the one this (claimed, same-settings) folder already has."""
    import pandas as pd

    state = inputs.out / STATE
    saved = state / "plan.json"
    if saved.is_file() and (state / "plan.parquet").is_file():
        log.info("resuming: %d of the units are complete", len(list(inputs.out.glob("*.parquet"))))
        return
    plan = build_plan(config, inputs, load_base_tokenizer(inputs.base_model))
    items = plan.pop("items")
    with atomic_path(state / "plan.parquet") as tmp:
        pd.DataFrame(items).to_parquet(tmp, index=False)
    write_json(saved, plan)


def prepare_mimic(config: PrepareConfig) -> dict[str, Any]:
    """Run `prepare` on MIMIC-CXR (or resume it); return the counts and paths."""
    import pandas as pd

    start = time.perf_counter()
    inputs = check_mimic_inputs(config)
    acc = accelerator(config.dist_timeout)
    limit_cpu_threads(acc.device)  # several processes on one CPU box: processes × threads ≤ cores
    folder, part = jobs.claim(config, inputs.out, prepare_settings(config, inputs), acc)
    if folder.finished:
        # Finished before with the same settings and inputs: leave the manifest (and with it the hash
        # that later steps recorded) untouched, so nothing downstream is recomputed.
        log.info("%s: already prepared; nothing to do", inputs.out)
        return {} if not acc.is_main_process else _summary(inputs.out)
    jobs.plan_once(folder, acc, lambda: _plan(config, inputs))
    state = inputs.out / STATE
    plan = json.loads((state / "plan.json").read_text())
    items = pd.read_parquet(state / "plan.parquet")
    todo = jobs.units_to_do(plan["units"], inputs.out, part, config.finalize)
    encode_start = time.perf_counter()
    if todo:
        vae = load_vae(inputs.base_model, acc.device)
        workers = loader_workers(config, acc.num_processes)

        def encode(unit: str) -> None:
            rows = items[items["unit"] == unit]
            encode_unit(acc, vae, rows, unit, inputs.out, inputs.resolution, config.batch_size, workers, LAYOUT,
                        config.dicom_contrast)  # fmt: skip

        jobs.encode_units(acc, todo, encode, label(part, acc.process_index, acc.num_processes))
    if not acc.is_main_process:
        return {}
    encode_seconds = round(time.perf_counter() - encode_start, 2)

    def finish() -> dict[str, Any]:
        result = _finish(folder, config, inputs, plan, time.perf_counter() - start)
        warn_empty_parts(inputs.out, {part: result[f"{part}_rows"] for part in ("train", "test", "ms_cxr")})
        return result

    return jobs.complete(folder, plan["units"], inputs.out, config.finalize, finish) | {
        "encode_seconds": encode_seconds
    }


def _summary(out: Path) -> dict[str, Any]:
    """The result of a finished run, from its manifest."""
    manifest = json.loads((out / MANIFEST).read_text())
    rows = {part: manifest["counts"][part]["rows"] for part in ("train", "test", "ms_cxr")}
    shards, skipped = len(manifest["shards"]), manifest["skipped"]
    return prepared_result(out, rows, shards, skipped, manifest["resolution"], manifest["latent_shape"], 0.0)


def _finish(
    folder: StepFolder, config: PrepareConfig, inputs: MimicInputs, plan: dict[str, Any], seconds: float
) -> dict[str, Any]:
    """skipped.csv and the manifest, from the plan and the completed units."""
    out, counts, skipped = inputs.out, plan["counts"], list(plan["skipped"])
    rows, reasons = gather_units(out, plan["units"], skipped)
    for part in rows:  # planned = rows + image_skipped, and image_skipped = the sum of its reasons
        counts[part]["image_skipped"] = sum(reasons[part].values())
        counts[part]["image_skip_reasons"] = dict(sorted(reasons[part].items()))
        counts[part]["rows"] = rows[part]
    write_skipped(out, skipped)
    shards = [f"{unit}.parquet" for unit in plan["units"] if unit.startswith("train-")]
    resolved = to_dict(dataclasses.replace(config, resolution=inputs.resolution))
    folder.finish(
        config=resolved,
        inputs={"mimic": inputs.mimic, "base_model": inputs.base_model},
        seed=config.seed,
        files=[*shards, "test.parquet", "ms_cxr.parquet", "skipped.csv"],
        extra={
            **latent_record(inputs.base_model, inputs.resolution, inputs.latent_shape, inputs.scaling_factor),
            "shards": shards,
            "counts": counts,
            "test_sampling": plan["test_sampling"],
            "impression_sources": plan["impression_sources"],
            "prompts_over_context": plan["prompts_over_context"],
            "dicom_contrast": config.dicom_contrast,
            "skipped": len(skipped),
        },
    )
    return prepared_result(out, rows, len(shards), len(skipped), inputs.resolution, inputs.latent_shape, seconds)
