"""The phantom's `preview.png`: one MS-CXR image per category, read back from disk, with its boxes drawn."""

from __future__ import annotations

import os
from pathlib import Path

from cxrdiff.artifacts import atomic_path
from cxrdiff.data import MS_CXR_CATEGORIES
from cxrdiff.phantom.config import MS_CXR_FILE


def write_preview(root: str | os.PathLike, path: str | os.PathLike, tile: int = 256) -> Path:
    """A contact sheet: one MS-CXR image per category read back from disk, with its boxes from the CSV."""
    import pandas as pd
    from PIL import Image, ImageDraw

    root = Path(root)
    frame = pd.read_csv(root / MS_CXR_FILE, dtype={"dicom_id": str})
    cells = []
    for category in MS_CXR_CATEGORIES:
        rows = frame[frame["category_name"] == category]
        if rows.empty:
            continue
        first = rows[rows["dicom_id"] == rows["dicom_id"].iloc[0]]
        with Image.open(root / first["path"].iloc[0]) as img:
            picture = img.convert("RGB")
        draw = ImageDraw.Draw(picture)
        for row in first.itertuples():
            draw.rectangle([row.x, row.y, row.x + row.w - 1, row.y + row.h - 1], outline=(255, 40, 40), width=2)
        scale = tile / picture.width
        picture = picture.resize((tile, round(picture.height * scale)), Image.BILINEAR)
        cells.append((picture, f"{category}: {first['label_text'].iloc[0]}"))
    columns = 4
    height = max((c[0].height for c in cells), default=tile) + 14
    sheet = Image.new("RGB", (columns * tile, max(1, -(-len(cells) // columns)) * height), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for i, (picture, caption) in enumerate(cells):
        x, y = (i % columns) * tile, (i // columns) * height
        sheet.paste(picture, (x, y + 14))
        draw.text((x + 2, y + 1), caption[:48], fill=(120, 255, 120))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)
