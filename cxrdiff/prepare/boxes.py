"""The grounding rows of the public sets that have boxes (`--format nih`, `--format csv`): the box table
cleaned, each image–phrase pair's boxes checked against its image's frame, and the rows in BOX_COLUMNS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxrdiff.prepare.encode import skipped_row
from cxrdiff.prepare.public import BOX_COLUMNS, drop_repeated_rows, numeric_columns


def clean_box_table(table, path: Path, counts: dict[str, Any], skipped: list):
    """The box table (columns image, x, y, w, h and the set's own) with rows repeated whole dropped (listed in
    skipped.csv, counted as `box_duplicate_rows`) and x, y, w, h as numbers."""
    table, counts["box_duplicate_rows"] = drop_repeated_rows(table, "image", path, skipped, unique=False, part="ms_cxr")
    return numeric_columns(table, ("x", "y", "w", "h"), path)


def boxes_fit(xywh, width: int, height: int, ids: dict[str, Any], frame: str, path: Path, skipped: list) -> bool:
    """Whether every box (rows of x, y, w, h) is non-empty and inside a `width` × `height` image; a pair with a
    box that is not goes to skipped.csv as "box outside image" (`frame` names the image size in its detail)."""
    outside = (xywh[:, 2] <= 0) | (xywh[:, 3] <= 0) | (xywh[:, :2] < 0).any(axis=1)
    outside |= (xywh[:, 0] + xywh[:, 2] > width) | (xywh[:, 1] + xywh[:, 3] > height)
    if outside.any():
        skipped.append(skipped_row("ms_cxr", ids, "box outside image", f"{xywh.tolist()} in {frame}", str(path)))
    return not outside.any()


def box_row(ids: dict[str, Any], category: str, text: str, xywh, width: int, height: int, image: str) -> dict[str, Any]:
    """One grounding row (BOX_COLUMNS): an image–phrase pair with all its boxes, in a `width` × `height` frame."""
    return {
        **ids,
        "category_name": category,
        "label_text": text,
        "boxes_original": json.dumps(xywh.tolist()),
        "image_width": width,
        "image_height": height,
        "image_path": image,
    }


def box_table(pairs: list[dict[str, Any]], counts: dict[str, Any]):
    """The grounding rows as a table in BOX_COLUMNS (their number counted as the boxes' `pairs`)."""
    import pandas as pd

    counts["boxes"]["pairs"] = len(pairs)
    return pd.DataFrame(pairs, columns=list(BOX_COLUMNS))
