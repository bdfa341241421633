"""The `coco` format's grounding set: rows of `prepare --format coco`'s coco_test.parquet: the caption, its
word that names the category, and the category's mask (COCO RLE, in the prepared frame)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrdiff.ground.config import GroundConfig, GroundingInput
from cxrdiff.ground.rows import check_one_shape, checked_rows, row_latents

COCO_COLUMNS = ("image_id", "category_name", "caption", "word", "mask_rle", "latent_mean", "latent_shape")


def read_coco(table: Any, config: GroundConfig, path: Path) -> list[GroundingInput]:
    """One `GroundingInput` per caption and category, its mask decoded."""
    from cxrdiff.coco import decode_rle

    samples = []
    for i, row in enumerate(checked_rows(table, COCO_COLUMNS, config, path, "a coco_test.parquet")):
        latent, logvar = row_latents(row, config)
        samples.append(
            GroundingInput(
                sample=f"{i:06d}",
                phrase=str(row["caption"]),
                latent=latent,
                logvar=logvar,
                dicom_id=str(row["image_id"]),
                category=str(row["category_name"]),
                width=int(row.get("image_width") or 0),
                height=int(row.get("image_height") or 0),
                image_path=str(row.get("image_path") or ""),
                mask=decode_rle(row["mask_rle"]),
                word=str(row["word"]),
            )
        )
    check_one_shape(samples, path)
    return samples
