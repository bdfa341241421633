"""Is `cxrdiff prepare` bound by image decoding or by the VAE? Images/s measured side by side.

    .venv/bin/python bench/bench_prepare.py [--images 48] [--size 1024] [--workers 0]

1. decode + resize + crop alone (what the DataLoader workers do), on MIMIC-like JPEGs of --size px;
2. the whole step (plan + decode + tiny VAE + Parquet) on a tree of the same images;
3. for reference, JPEG decoding at reduced DCT scale (PIL `draft`), which prepare does NOT use because
   it is not the paper's bilinear resize of the full image.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrdiff.data import LABELS
from cxrdiff.images import load_grayscale, resize_center_crop
from cxrdiff.model.tiny import write_tiny_model
from cxrdiff.prepare import PrepareConfig, prepare


def make_tree(root: Path, n: int, size: int) -> list[Path]:
    """n patients in p10..p18, one PA image and report each; a smooth noisy image compresses like a radiograph."""
    rng = np.random.default_rng(0)
    base = np.linspace(40, 200, size, dtype=np.float32)[None, :] * np.ones((int(size * 1.2), 1), np.float32)
    meta, labels, paths = [], [], []
    for i in range(n):
        subject, study, dicom = 10000000 + i * 1000000 % 9000000 + i, 50000000 + i, f"img{i:05d}"
        folder = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}"
        (folder / f"s{study}").mkdir(parents=True, exist_ok=True)
        image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"s{study}" / f"{dicom}.jpg", quality=95)
        (folder / f"s{study}.txt").write_text(f" FINAL REPORT\n IMPRESSION:  Finding number {i} is stable.\n")
        meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": "PA"})
        labels.append({"subject_id": subject, "study_id": study, **dict.fromkeys(LABELS, np.nan)})
        paths.append(folder / f"s{study}" / f"{dicom}.jpg")
    for name, rows in (("metadata", meta), ("chexpert", labels)):
        with gzip.open(root / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt") as handle:
            pd.DataFrame(rows).to_csv(handle, index=False)
    split = pd.DataFrame(meta)[["dicom_id", "study_id", "subject_id"]].assign(split="train")
    split.to_csv(root / "mimic-cxr-2.0.0-split.csv", index=False)
    ms = {"dicom_id": [], "category_name": [], "label_text": [], "x": [], "y": [], "w": [], "h": [],
          "image_width": [], "image_height": []}  # fmt: skip
    pd.DataFrame(ms).to_csv(root / "ms_cxr.csv", index=False)
    return paths


def rate(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def draft_decode(path: Path, resolution: int) -> np.ndarray:
    with Image.open(path) as img:
        img.draft("L", (resolution, resolution))
        return resize_center_crop(np.asarray(img.convert("L")), resolution)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=1024, help="short side of the JPEGs (MIMIC: ~2500)")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_tree(tmp / "mimic", args.images, args.size)
        write_tiny_model(tmp / "model")
        resolution = 64
        decode = rate(lambda p: resize_center_crop(load_grayscale(p), resolution), paths)
        draft = rate(lambda p: draft_decode(p, resolution), paths)
        start = time.perf_counter()
        result = prepare(
            PrepareConfig(
                mimic=tmp / "mimic",
                ms_cxr=tmp / "mimic" / "ms_cxr.csv",
                base_model=tmp / "model",
                out=tmp / "out",
                test_size=1,
                workers=args.workers,
                batch_size=16,
            )  # fmt: skip
        )
        whole = args.images / (time.perf_counter() - start)
    print(f"images: {args.images} JPEGs of {args.size}x{int(args.size * 1.2)} px → {resolution} px, tiny VAE, CPU")
    print(f"decode + resize alone      : {decode:8.1f} images/s")
    encode = args.images / result["encode_seconds"]
    print(f"encode stage (decode + VAE): {encode:8.1f} images/s  ({encode / decode:.2f} × decode alone)")
    print(f"whole step (+ plan, loads) : {whole:8.1f} images/s  ({whole / decode:.2f} × decode alone)")
    print(f"draft decode (not used)    : {draft:8.1f} images/s  ({draft / decode:.2f} × full decode)")


if __name__ == "__main__":
    main()
