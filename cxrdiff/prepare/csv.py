"""`cxrdiff prepare --format csv`: any image–text table (CheXpert Plus, PadChest, a hospital's export).

Columns `image` (a path under --images) and `text`; optional `patient`, `split` (train / test; blank: drawn),
`view` (PA, AP or FRONTAL kept, blank kept, any other skipped) and `labels` ("|"-separated; CheXpert's
names fill its columns, listed 1.0 and unlisted 0.0). Boxes (`--boxes`): `image`, `phrase`, `x`, `y`, `w`,
`h` in the pixels of the image as stored, and an optional `category`; one grounding row per image–phrase
pair. Without `patient`, each image is its own patient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxrdiff.data import LABELS, check_columns
from cxrdiff.errors import InputError
from cxrdiff.prepare.boxes import box_row, box_table, boxes_fit, clean_box_table
from cxrdiff.prepare.config import PrepareConfig
from cxrdiff.prepare.encode import skipped_row
from cxrdiff.prepare.public import ROW_COLUMNS, Candidates, PublicFormat, PublicInputs, drop_repeated_rows

TABLE_COLUMNS = ("image", "text")
BOXES_COLUMNS = ("image", "phrase", "x", "y", "w", "h")
FRONTAL = ("PA", "AP", "FRONTAL")
SPLITS = ("train", "test")


def csv_tables(config: PrepareConfig) -> dict[str, Path | None]:
    if config.table is None:
        raise InputError("--table is required with --format csv (columns image, text)")
    return {"table": config.table, "boxes": config.boxes}


def labels_of(cell: Any, unknown: dict[str, int]) -> dict[str, float]:
    """A "|"-separated `labels` cell → CheXpert's 14 columns; names outside them are counted in `unknown`."""
    if not isinstance(cell, str):
        return {label: float("nan") for label in LABELS}
    names = {name.strip() for name in cell.split("|") if name.strip()}
    for name in names - set(LABELS):
        unknown[name] = unknown.get(name, 0) + 1
    return {label: 1.0 if label in names else 0.0 for label in LABELS}


def read_table(config: PrepareConfig, inputs: PublicInputs) -> Candidates:
    """The table's rows whose image exists, with ids, view and labels in MIMIC's layout."""
    import pandas as pd

    path = inputs.tables["table"]
    columns = check_columns(path, TABLE_COLUMNS)
    skipped: list[dict[str, Any]] = []
    table = pd.read_csv(path, dtype=str, keep_default_na=False).replace("", np.nan)
    table, duplicates = drop_repeated_rows(table, "image", path, skipped)
    if "split" in columns:
        bad = sorted(set(table["split"].dropna().str.lower()) - set(SPLITS))
        if bad:
            raise InputError(f"{path}: column 'split' has {bad[0]!r}; expected train, test or blank")
    patients = table["patient"] if "patient" in columns else pd.Series(range(len(table)), dtype=str)
    patient_ids = {p: k + 1 for k, p in enumerate(sorted(set(patients.fillna("").astype(str))))}
    counts: dict[str, Any] = {
        "table_rows": len(table) + duplicates,
        "duplicate_rows": duplicates,
        "image_not_found": 0,
        "not_frontal": 0,
    }
    unknown: dict[str, int] = {}
    records = []
    for number, row in table.iterrows():
        image = inputs.images / str(row["image"])
        ids = {
            "dicom_id": str(row["image"]),
            "subject_id": patient_ids[str(patients.iloc[number] or "")],
            "study_id": int(number) + 1,
        }
        view = row.get("view")
        if isinstance(view, str) and view.strip().upper() not in FRONTAL:
            counts["not_frontal"] += 1
            skipped.append(skipped_row("table", ids, "not a frontal view", f"view {view}", str(image)))
            continue
        if not image.is_file():
            counts["image_not_found"] += 1
            skipped.append(skipped_row("table", ids, "image not found", str(path), str(image)))
            continue
        split = row.get("split")
        records.append(
            {
                **ids,
                "view": view.strip().upper() if isinstance(view, str) else "",
                "impression": " ".join(str(row["text"]).split()) if isinstance(row["text"], str) else "",
                "impression_source": "text",
                "image_path": str(image),
                "split": split.lower() if isinstance(split, str) else None,
                **labels_of(row.get("labels"), unknown),
            }
        )
    rows = pd.DataFrame(records, columns=[*ROW_COLUMNS, "split"])
    counts["labels_outside_chexpert"] = dict(sorted(unknown.items()))
    boxes = read_boxes(inputs.tables["boxes"], rows, counts, skipped) if "boxes" in inputs.tables else None
    data_set = {
        "name": f"image-text table {path.name}",
        "format": "csv",
        "text_source": "text",
        "text": f"the table's `text` column ({path.name})",
    }
    if boxes is None:
        data_set["grounding"] = "none: no --boxes"
    return Candidates(rows, boxes, counts, skipped, data_set)


def read_boxes(path: Path, rows, counts: dict[str, Any], skipped: list):
    """The boxes of the kept images, one row per image–phrase pair, in the pixels of the file as stored."""
    import pandas as pd

    columns = check_columns(path, BOXES_COLUMNS)
    table = pd.read_csv(path, dtype={"image": str, "phrase": str})
    table = clean_box_table(table, path, counts, skipped)
    kept = rows.drop_duplicates("dicom_id").set_index("dicom_id")
    counts["boxes"] = {"table_boxes": len(table), "image_not_in_table": 0, "box_outside_image": 0}
    pairs = []
    for (image, phrase), group in table.groupby(["image", "phrase"], sort=True):
        if image not in kept.index:
            counts["boxes"]["image_not_in_table"] += 1
            skipped.append(skipped_row("ms_cxr", {"dicom_id": image}, "image not in the table", phrase, str(path)))
            continue
        row = kept.loc[image]
        ids = {"dicom_id": image, "subject_id": int(row["subject_id"]), "study_id": int(row["study_id"])}
        try:
            with Image.open(row["image_path"]) as img:
                width, height = img.size
        except (OSError, ValueError) as exc:  # the image itself is skipped at encoding, with its reason
            skipped.append(skipped_row("ms_cxr", ids, "unreadable image", str(exc), row["image_path"]))
            continue
        xywh = group[["x", "y", "w", "h"]].to_numpy(dtype=np.float64)
        if not boxes_fit(xywh, width, height, ids, f"{width}x{height}", path, skipped):
            counts["boxes"]["box_outside_image"] += 1
            continue
        category = group["category"].iloc[0] if "category" in columns else phrase
        text = " ".join(str(phrase).split())
        pairs.append(box_row(ids, str(category), text, xywh, width, height, row["image_path"]))
    return box_table(pairs, counts)


CSV = PublicFormat("csv", csv_tables, read_table)
