"""`cxrdiff prepare --format nih`: NIH ChestX-ray14 with the tables torchxrayvision ships (or the user's copies).

The prompt is the image's labels, as the paper's Table 7 trains on class names: NIH's finding names joined
by spaces in the table's order ("Cardiomegaly Effusion"; "Pleural_Thickening" written "Pleural Thickening";
"No Finding" as it is, which the UCG rule empties 30% of the time as for MIMIC). The labels that NIH shares
with CheXpert fill CheXpert's columns (`NIH_TO_CHEXPERT`); the others are in the text only. The BBox list is
the grounding set: one row per image–finding pair, phrase = the finding's name as the label table spells
it (NIH's "Infiltrate" is "Infiltration"), class = the paper's name where it has the finding ("Effusion" is
"Pleural Effusion", as in the labels), boxes given in the 1024 px frame of NIH's PNGs and rescaled to
each file's actual size at encoding. Only the images found under --images are used.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.data import LABELS, check_columns
from cxrdiff.errors import InputError
from cxrdiff.prepare.boxes import box_row, box_table, boxes_fit, clean_box_table
from cxrdiff.prepare.config import PrepareConfig
from cxrdiff.prepare.encode import skipped_row
from cxrdiff.prepare.public import ROW_COLUMNS, Candidates, PublicFormat, PublicInputs, image_index, read_keyed_table

ENTRY_TABLE = "Data_Entry_2017_v2020.csv.gz"
BOX_TABLE = "BBox_List_2017.csv.gz"
ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position")
BOX_ID_COLUMNS = ("Image Index", "Finding Label")  # then x, y, w, h (NIH's header splits "Bbox [x,y,w,h]")
BOX_FRAME = 1024  # NIH's PNGs, in whose pixels the BBox list is given
BOX_SPELLING = {"Infiltrate": "Infiltration"}  # the BBox list's name → the label table's
NIH_TO_CHEXPERT = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "No Finding": "No Finding",
}
FOLLOW_UP_RANGE = 1000  # study_id = patient × 1000 + follow-up number (NIH's follow-ups stay under 1000)


def shipped_table(name: str) -> Path:
    """A table in torchxrayvision's wheel (`torchxrayvision/data/`), found without importing the package."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"torchxrayvision is not installed: give the table {name} yourself (--table/--boxes)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / name


def nih_tables(config: PrepareConfig) -> dict[str, Path | None]:
    return {"table": config.table or shipped_table(ENTRY_TABLE), "boxes": config.boxes or shipped_table(BOX_TABLE)}


def prompt_and_labels(findings: str) -> tuple[str, dict[str, float]]:
    """NIH's "A|B" → the prompt "A B" and CheXpert's 14 columns (shared labels 1.0 / 0.0, the others NaN)."""
    names = [name.strip() for name in str(findings).split("|") if name.strip()]
    labels = {label: float("nan") for label in LABELS}
    for nih, chexpert in NIH_TO_CHEXPERT.items():
        labels[chexpert] = 1.0 if nih in names else 0.0
    return " ".join(name.replace("_", " ") for name in names), labels


def read_nih(config: PrepareConfig, inputs: PublicInputs) -> Candidates:
    """The label table's rows whose image is under --images, and the BBox list's pairs among them."""
    import pandas as pd

    table = inputs.tables["table"]
    skipped: list[dict[str, Any]] = []
    entry, duplicates = read_keyed_table(table, ENTRY_COLUMNS, "Image Index", skipped)
    files = image_index(inputs.images)
    present = entry["Image Index"].isin(files).to_numpy()
    unknown = sorted(set(files) - set(entry["Image Index"]))
    for name in unknown:
        skipped.append(
            skipped_row("table", {"dicom_id": Path(name).stem}, "not in the table", str(table), str(files[name]))
        )
    entry = entry[present]
    records = []
    for _, row in entry.iterrows():
        text, labels = prompt_and_labels(row["Finding Labels"])
        patient, follow_up = int(row["Patient ID"]), int(row["Follow-up #"])
        records.append(
            {
                "dicom_id": Path(row["Image Index"]).stem,
                "subject_id": patient,
                "study_id": patient * FOLLOW_UP_RANGE + follow_up,
                "view": str(row["View Position"]),
                "impression": text,
                "impression_source": "labels",
                "image_path": str(files[row["Image Index"]]),
                **labels,
            }
        )
    rows = pd.DataFrame(records, columns=list(ROW_COLUMNS))
    counts: dict[str, Any] = {
        "table_rows": int(len(present)) + duplicates,
        "duplicate_rows": duplicates,
        "images_in_folder": len(files),
        "table_rows_with_image": int(present.sum()),
        "images_not_in_table": len(unknown),
        "views": {str(k): int(v) for k, v in rows["view"].value_counts().sort_index().items()},
    }
    boxes = read_boxes(inputs.tables["boxes"], rows, counts, skipped)
    data_set = {
        "name": "NIH ChestX-ray14",
        "format": "nih",
        "text_source": "labels",
        "text": "the image's finding labels, space-joined (the paper's Table 7 label prompts)",
        "labels_in_chexpert_columns": NIH_TO_CHEXPERT,
        "box_frame": f"{BOX_FRAME} px",
        "category_names": {nih: paper for nih, paper in NIH_TO_CHEXPERT.items() if nih != paper},
    }
    return Candidates(rows, boxes, counts, skipped, data_set)


def read_boxes(path: Path, rows, counts: dict[str, Any], skipped: list):
    """The BBox list's boxes of the kept images: one row per image–finding pair (all its boxes), in the 1024 px
    frame; a box outside that frame goes to skipped.csv."""
    import pandas as pd

    columns = check_columns(path, BOX_ID_COLUMNS)
    if len(columns) < 6:
        raise InputError(
            f"{path}: expected Image Index, Finding Label and the box's x, y, w, h; got {len(columns)} columns"
        )
    table = pd.read_csv(path, usecols=list(range(6)))
    table.columns = ["image", "finding", "x", "y", "w", "h"]
    table = clean_box_table(table, path, counts, skipped)
    table["dicom_id"] = table["image"].map(lambda name: Path(str(name)).stem)
    kept = rows.set_index("dicom_id")
    everywhere = len(table)
    table = table[table["dicom_id"].isin(kept.index)]
    counts["boxes"] = {
        "table_boxes": everywhere,
        "boxes_of_kept_images": len(table),
        "box_outside_frame": 0,
    }
    pairs = []
    for (dicom, finding), group in table.groupby(["dicom_id", "finding"], sort=True):
        xywh = group[["x", "y", "w", "h"]].to_numpy(dtype=np.float64)
        row = kept.loc[dicom]
        ids = {"dicom_id": dicom, "subject_id": int(row["subject_id"]), "study_id": int(row["study_id"])}
        if not boxes_fit(xywh, BOX_FRAME, BOX_FRAME, ids, f"{BOX_FRAME} px", path, skipped):
            counts["boxes"]["box_outside_frame"] += 1
            continue
        name = BOX_SPELLING.get(str(finding), str(finding))
        category = NIH_TO_CHEXPERT.get(name, name)  # the paper's class where it has one
        pairs.append(box_row(ids, category, name.replace("_", " "), xywh, BOX_FRAME, BOX_FRAME, row["image_path"]))
    return box_table(pairs, counts)


NIH = PublicFormat("nih", nih_tables, read_nih)
