"""The `mimic` format's grounding set: rows of `prepare`'s ms_cxr.parquet (MS-CXR's phrases and boxes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from cxrdiff.ground.config import GroundConfig, GroundingInput
from cxrdiff.ground.rows import check_one_shape, checked_rows, row_latents
from cxrdiff.metrics.laterality import named_side

DATA_COLUMNS = (
    "dicom_id",
    "category_name",
    "label_text",
    "boxes",
    "boxes_original",
    "image_width",
    "image_height",
    "latent_mean",
    "latent_shape",
)


def read_mscxr(table: Any, config: GroundConfig, path: Path) -> list[GroundingInput]:
    """One `GroundingInput` per phrase, with its boxes in both frames (all of its image and class's boxes
    under `--boxes union`)."""
    samples = []
    for i, row in enumerate(checked_rows(table, DATA_COLUMNS, config, path, "an ms_cxr.parquet")):
        latent, logvar = row_latents(row, config)
        phrase = str(row["label_text"])
        samples.append(
            GroundingInput(
                sample=f"{i:06d}",
                phrase=phrase,
                latent=latent,
                logvar=logvar,
                dicom_id=str(row["dicom_id"]),
                category=str(row["category_name"]),
                boxes=[list(map(float, b)) for b in row["boxes"] or []],
                boxes_original=[list(map(float, b)) for b in row["boxes_original"] or []],
                width=int(row["image_width"]),
                height=int(row["image_height"]),
                image_path=str(row.get("image_path") or ""),
                side=named_side(phrase),
            )
        )
    check_one_shape(samples, path)
    return union_boxes(samples) if config.boxes == "union" else samples


def union_boxes(samples: list[GroundingInput]) -> list[GroundingInput]:
    """`--boxes union`: every phrase of an image and class is scored against all of that pair's boxes (the
    paper's segmentation protocol), not only its own phrase's (`per-phrase`, the phrase-grounding one)."""
    boxes: dict[tuple[str, str], list[list[float]]] = {}
    original: dict[tuple[str, str], list[list[float]]] = {}
    for s in samples:
        key = (s.dicom_id, s.category)
        for found, own in ((boxes.setdefault(key, []), s.boxes), (original.setdefault(key, []), s.boxes_original)):
            found += [b for b in own if b not in found]  # a box two phrases share counts once
    return [
        dataclasses.replace(s, boxes=boxes[(s.dicom_id, s.category)], boxes_original=original[(s.dicom_id, s.category)])
        for s in samples
    ]
