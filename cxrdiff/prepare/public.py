"""The shared part of `cxrdiff prepare` for the public sets (`--format nih | openi | csv`).

Each set's module (`nih`, `openi`, `csv`) reads its own tables into `Candidates`: rows in MIMIC's layout
(ids, view, prompt text, CheXpert's 14 label columns, image file) and, where the set has boxes, the grounding
rows (phrase, boxes in the pixels of a stated image size). This module applies the rules every set shares
(docs/public-sets.md): exact duplicate rows dropped, rows without text skipped, a patient-disjoint seeded
train/test split with every boxed patient out of training, prompts longer than the text encoder's context
marked, then encodes the units in MIMIC's layout (`test`, `ms_cxr`, `train-NNNNN`), so finetune, sample,
ground and report read the folder as they read a MIMIC one. The manifest names the data set and where its
text came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import MANIFEST, StepFolder, atomic_path, write_json
from cxrdiff.config import settings, to_dict
from cxrdiff.console import log
from cxrdiff.data import LABELS, check_columns, drop_duplicate_rows
from cxrdiff.distributed import accelerator
from cxrdiff.errors import InputError
from cxrdiff.models import check_model_folder, model_geometry, vae_fingerprint
from cxrdiff.prepare import jobs
from cxrdiff.prepare.config import PrepareConfig, check_out, input_folder, require_flags
from cxrdiff.prepare.encode import (
    STATE,
    encode_unit,
    load_base_tokenizer,
    load_vae,
    loader_workers,
    skipped_row,
)
from cxrdiff.prepare.mimic import LAYOUT, mark_truncated
from cxrdiff.prepare.results import gather_units, latent_record, prepared_result, write_skipped
from cxrdiff.shards import label
from cxrdiff.speed import limit_cpu_threads

ROW_COLUMNS = ("dicom_id", "subject_id", "study_id", "view", "impression", "impression_source", "image_path", *LABELS)
BOX_COLUMNS = (
    "dicom_id",
    "subject_id",
    "study_id",
    "category_name",
    "label_text",
    "boxes_original",
    "image_width",
    "image_height",
    "image_path",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".tif", ".tiff", ".bmp")


@dataclasses.dataclass(frozen=True)
class PublicInputs:
    data_set: str  # nih | openi | csv
    images: Path
    tables: dict[str, Path]  # role (table, boxes, reports) → file
    base_model: Path
    out: Path
    resolution: int
    latent_shape: tuple[int, int, int]
    scaling_factor: float


@dataclasses.dataclass
class Candidates:
    """What a set's module hands over: the image rows (ROW_COLUMNS, and `split` where the table gives one),
    the grounding rows (BOX_COLUMNS; None where the set has no boxes), counts and plan-time skips."""

    rows: Any
    boxes: Any
    counts: dict[str, Any]
    skipped: list[dict[str, Any]]
    data_set: dict[str, Any]  # name, text_source (labels | impressions | text), notes


@dataclasses.dataclass(frozen=True)
class PublicFormat:
    """One public set: its tables by role (each a default file or None) and the reader of its rows."""

    name: str
    tables: Callable[[PrepareConfig], dict[str, Path | None]]
    read: Callable[[PrepareConfig, PublicInputs], Candidates]


# --- checks -------------------------------------------------------------------------------------


def check_public_inputs(config: PrepareConfig, fmt: PublicFormat) -> PublicInputs:
    """Every structural fault of a public-set run (flags, folders, table headers), before any image is read."""
    require_flags(config, ("images", "base_model", "out"), fmt.name)
    images = input_folder("images", config.images)
    tables = {}
    for role, path in fmt.tables(config).items():
        if path is None:
            continue
        if not Path(path).is_file():
            raise InputError(f"--{role} {path}: file not found")
        tables[role] = Path(path).absolute()
    base_model = check_model_folder(config.base_model)
    resolution, latent_shape, scaling_factor = model_geometry(base_model, config.resolution)
    inputs = PublicInputs(
        fmt.name, images.absolute(), tables, base_model, Path(config.out), resolution, latent_shape, scaling_factor
    )
    check_out(inputs.out, public_settings(config, inputs))
    return inputs


def public_settings(config: PrepareConfig, inputs: PublicInputs) -> dict[str, Any]:
    """Settings, the tables by identity (path, size, mtime), the image folder and the VAE."""
    tables = {}
    for role, path in inputs.tables.items():
        stat = path.stat()
        tables[role] = [str(path), stat.st_size, stat.st_mtime_ns]
    return settings(
        config,
        resolution=inputs.resolution,
        vae=vae_fingerprint(inputs.base_model),
        tables=tables,
        images=str(inputs.images),
    )


def image_index(folder: Path) -> dict[str, Path]:
    """Every image file under `folder` (subfolders too, as NIH's images_001/images/... release) by file name."""
    found: dict[str, Path] = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.setdefault(name, Path(root) / name)
    return found


# --- the shared rules ---------------------------------------------------------------------------


def drop_repeated_rows(table, id_column: str, source: Path, skipped: list, unique: bool = True, part: str = "table"):
    """`cxrdiff.data.drop_duplicate_rows` on a public set's table: rows repeated whole kept once (the others
    listed in skipped.csv under their `id_column` value, with both file lines), rows that share `id_column`
    (with `unique`) but differ refused. Returns the table, indexed afresh, and the number dropped."""
    kept = drop_duplicate_rows(table, source, unique=(id_column,) if unique else (), part=part)
    ids = table.loc[table.duplicated(keep="first"), id_column]  # the same rows, in the same order
    repeated = [{**row, "dicom_id": str(value)} for row, value in zip(kept.attrs["duplicates"], ids, strict=True)]
    skipped.extend(repeated)
    if repeated:
        log.warning("%s: %d duplicate row(s) dropped (listed in skipped.csv)", source, len(repeated))
    return kept.reset_index(drop=True), len(repeated)


def read_keyed_table(path: Path, columns: tuple[str, ...], key: str, skipped: list):
    """`columns` of a set's table (their presence checked first), through `drop_repeated_rows` on `key`:
    returns the table and the number of repeated rows dropped."""
    import pandas as pd

    check_columns(path, columns)
    return drop_repeated_rows(pd.read_csv(path, usecols=list(columns)), key, path, skipped)


def numeric_columns(table, names: tuple[str, ...], path: Path):
    """The table with `names` as numbers; a cell that is not one is a one-line error naming file, column and row."""
    import pandas as pd

    for name in names:
        values = pd.to_numeric(table[name], errors="coerce")
        if values.isna().any():
            row = int(values.isna().to_numpy().argmax()) + 2  # the header is line 1
            raise InputError(f"{path}: column {name!r} has a value that is not a number (line {row})")
        table[name] = values
    return table


def split_patients(rows, boxed_patients: set, config: PrepareConfig, counts: dict[str, Any]):
    """(train, test): the table's own split where it gives one; the other patients drawn, seeded, whole
    (test_fraction of them to test), every boxed patient out of training, the test capped at test_size."""
    given = rows["split"] if "split" in rows.columns else None
    boxed = rows["subject_id"].isin(boxed_patients).to_numpy()
    to_draw = ~boxed if given is None else ~boxed & given.isna().to_numpy()
    patients = np.array(sorted(set(rows.loc[to_draw, "subject_id"])))
    n_test = int(round(config.test_fraction * len(patients)))
    if len(patients) >= 2:
        n_test = min(max(n_test, 1), len(patients) - 1)  # both parts get a patient
    drawn = set(np.random.default_rng(config.seed).choice(patients, n_test, replace=False).tolist())
    in_test = to_draw & rows["subject_id"].isin(drawn).to_numpy()
    in_train = to_draw & ~in_test
    if given is not None:
        in_test |= (given == "test").to_numpy() & ~boxed
        in_train |= (given == "train").to_numpy() & ~boxed
    train, test = rows[in_train], rows[in_test]
    if len(test) > config.test_size:
        keep = np.sort(np.random.default_rng(config.seed).choice(len(test), config.test_size, replace=False))
        test = test.iloc[keep]
    both = set(train["subject_id"]) & set(test["subject_id"])
    if both:
        log.warning("%d patients are in both the table's train and test splits", len(both))
    counts["split"] = {
        "patients": int(rows["subject_id"].nunique()),
        "boxed_patients_held_out": len(boxed_patients),
        "held_out_boxed_patient_images": int(boxed.sum()),
        "patients_drawn_for_test": n_test,
        "patients_in_both_splits": len(both),
        "rule": "patients drawn (seeded) for test: round(test_fraction × patients not boxed, without a given "
        "split), at least one each side; every boxed patient is in neither part; the test set capped at "
        "test_size rows by a seeded sample",
    }
    return train.drop(columns=["split"], errors="ignore"), test.drop(columns=["split"], errors="ignore")


def build_public_plan(config: PrepareConfig, inputs: PublicInputs, fmt: PublicFormat, tokenizer: Any = None):
    """Every row to encode, in units, with the counts at every rule and the plan-time skips."""
    import pandas as pd

    found = fmt.read(config, inputs)
    rows, counts, skipped = found.rows, found.counts, found.skipped
    empty = rows["impression"].fillna("").str.strip().eq("").to_numpy()
    for _, row in rows[empty].iterrows():
        skipped.append(skipped_row("table", row, "no text", path=str(row["image_path"])))
    rows, counts["no_text"] = rows[~empty], int(empty.sum())
    boxes = found.boxes if found.boxes is not None else pd.DataFrame(columns=list(BOX_COLUMNS))
    train, test = split_patients(rows, set(boxes["subject_id"]), config, counts)
    train, test, over = mark_truncated(train.reset_index(drop=True), test.reset_index(drop=True), tokenizer)
    counts["planned"] = {"train": len(train), "test": len(test), "ms_cxr": len(boxes)}
    units = [("test", test), ("ms_cxr", boxes)]
    for k in range((len(train) + config.shard_size - 1) // config.shard_size):
        units.append((f"train-{k:05d}", train.iloc[k * config.shard_size : (k + 1) * config.shard_size]))
    items = pd.concat([frame.assign(unit=name) for name, frame in units], ignore_index=True)
    if found.boxes is None:
        log.info(
            "%s has no finding boxes: ms_cxr.parquet is empty, so there is nothing to ground", found.data_set["name"]
        )
    plan = {
        "units": [name for name, _ in units],
        "counts": counts,
        "skipped": skipped,
        "data_set": found.data_set,
        "prompts_over_context": over,
    }
    return items, plan


# --- the step -----------------------------------------------------------------------------------


def prepare_public(config: PrepareConfig, fmt: PublicFormat) -> dict[str, Any]:
    """Run `prepare` on a public set (or resume it); return the counts and paths."""
    import pandas as pd

    start = time.perf_counter()
    inputs = check_public_inputs(config, fmt)
    acc = accelerator(config.dist_timeout)
    limit_cpu_threads(acc.device)
    state = inputs.out / STATE
    fresh = None
    if acc.is_main_process and not (state / "plan.json").is_file():  # a fault of the tables stops before the claim
        fresh = build_public_plan(config, inputs, fmt, load_base_tokenizer(inputs.base_model))
    folder, part = jobs.claim(config, inputs.out, public_settings(config, inputs), acc)
    if folder.finished:
        log.info("%s: already prepared; nothing to do", inputs.out)
        return json.loads((inputs.out / MANIFEST).read_text())["result"] if acc.is_main_process else {}

    def save_plan() -> None:
        if fresh is not None and not (state / "plan.json").is_file():  # another shard may have saved it
            items, plan = fresh
            with atomic_path(state / "plan.parquet") as tmp:
                items.to_parquet(tmp, index=False)
            write_json(state / "plan.json", plan)

    jobs.plan_once(folder, acc, save_plan)
    plan = json.loads((state / "plan.json").read_text())
    items = pd.read_parquet(state / "plan.parquet")
    todo = jobs.units_to_do(plan["units"], inputs.out, part, config.finalize)
    if todo:
        vae = load_vae(inputs.base_model, acc.device)
        workers = loader_workers(config, acc.num_processes)

        def encode(unit: str) -> None:
            rows = items[items["unit"] == unit]
            encode_unit(acc, vae, rows, unit, inputs.out, inputs.resolution, config.batch_size, workers, LAYOUT)

        jobs.encode_units(acc, todo, encode, label(part, acc.process_index, acc.num_processes))
    if not acc.is_main_process:
        return {}
    finish = lambda: finish_public(folder, config, inputs, plan, time.perf_counter() - start)  # noqa: E731
    return jobs.complete(folder, plan["units"], inputs.out, config.finalize, finish)


def finish_public(
    folder: StepFolder, config: PrepareConfig, inputs: PublicInputs, plan: dict[str, Any], seconds: float
) -> dict[str, Any]:
    """skipped.csv and the manifest (the data set, its text source, the counts), from the plan and the units."""
    out, skipped, counts = inputs.out, list(plan["skipped"]), plan["counts"]
    rows, reasons = gather_units(out, plan["units"], skipped)
    counts["rows"] = rows
    counts["image_skip_reasons"] = {part: dict(sorted(r.items())) for part, r in reasons.items()}
    write_skipped(out, skipped)
    shards = [f"{unit}.parquet" for unit in plan["units"] if unit.startswith("train-")]
    result = prepared_result(
        out, rows, len(shards), len(skipped), inputs.resolution, inputs.latent_shape, seconds, inputs.data_set
    )
    folder.finish(
        config=to_dict(dataclasses.replace(config, resolution=inputs.resolution)),
        inputs={"images": inputs.images, "base_model": inputs.base_model, **inputs.tables},
        seed=config.seed,
        files=[*shards, "test.parquet", "ms_cxr.parquet", "skipped.csv"],
        extra={
            **latent_record(inputs.base_model, inputs.resolution, inputs.latent_shape, inputs.scaling_factor),
            "format": inputs.data_set,
            "data_set": plan["data_set"],
            "shards": shards,
            "counts": counts,
            "prompts_over_context": plan["prompts_over_context"],
            "skipped": len(skipped),
            "result": result,
        },
    )
    log.info(
        "%s: %d train, %d test, %d grounding rows; %d skipped (skipped.csv)",
        plan["data_set"]["name"],
        rows["train"],
        rows["test"],
        rows["ms_cxr"],
        len(skipped),
    )
    return result
