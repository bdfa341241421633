"""COCO's annotation format: captions, instance masks and which captions name which category.

The paper's in-domain experiment (docs/method.md, "MS-COCO") and any captioned, segmented data set ship
in this layout: `annotations/captions_{split}.json`, `annotations/instances_{split}.json` and the images
in `{split}/`. Masks are decoded with pycocotools (polygons, uncompressed and compressed RLE, as COCO's
own tools do) and stored as compressed RLE in JSON text, so any COCO tool reads them back.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.data import read_keyed_csv
from cxrdiff.errors import InputError

DEFAULT_SPLITS = ("train2017", "val2017")  # (training, test): the paper's test set is the official val split
# Plurals that adding -s/-es does not give, for COCO's 80 category names.
IRREGULAR_PLURALS = {"person": ("people", "persons"), "mouse": ("mice",), "knife": ("knives",), "sheep": ("sheep",),
                     "skis": ("skis",), "scissors": ("scissors",), "wine glass": ("wine glasses",)}  # fmt: skip


def parse_splits(text: str) -> tuple[str, str]:
    """`--coco-splits TRAIN,TEST` → the two split names (their annotation files and image folders)."""
    parts = tuple(p.strip() for p in str(text).split(","))
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise InputError(f"--coco-splits {text!r}: expected two different split names, e.g. train2017,val2017")
    return parts  # type: ignore[return-value]


def split_files(root: str | os.PathLike, split: str) -> tuple[Path, Path, Path]:
    """(captions JSON, instances JSON, image folder) of a split, each checked to exist."""
    root = Path(root)
    captions = root / "annotations" / f"captions_{split}.json"
    instances = root / "annotations" / f"instances_{split}.json"
    images = root / split
    for path in (captions, instances):
        if not path.is_file():
            raise InputError(f"--coco {root}: no {path.relative_to(root)} (COCO's layout: annotations/, {split}/)")
    if not images.is_dir():
        raise InputError(f"--coco {root}: no image folder {split}/")
    return captions, instances, images


def _load_json(path: Path, keys: Iterable[str]) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable COCO JSON ({type(exc).__name__}: {exc})") from None
    missing = [k for k in keys if k not in data]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(missing)}")
    return data


def unique_records(records: list[dict[str, Any]], path: Path, what: str, dropped: list[dict[str, Any]]) -> list:
    """COCO records (images, annotations) less those that repeat an earlier record with the same `id` whole:
    dropped and appended to `dropped` as skipped.csv rows (reason `duplicate row`), as
    `cxrdiff.data.drop_duplicate_rows` does for tables; two different records with one `id` are refused."""
    seen: dict[Any, tuple[int, dict[str, Any]]] = {}
    kept = []
    for position, record in enumerate(records):
        ident = record.get("id")
        if ident is not None and ident in seen:
            first, earlier = seen[ident]
            if earlier != record:
                raise InputError(f"{path}: {what} {first} and {position} share id {ident} but differ; keep one")
            image = record.get("image_id", ident)
            dropped.append({"part": path.name, "dicom_id": str(image), "subject_id": -1, "study_id": -1,
                            "reason": "duplicate row", "detail": f"{what} {position} repeats {what} {first}",
                            "path": os.fspath(path)})  # fmt: skip
            continue
        if ident is not None:
            seen[ident] = (position, record)
        kept.append(record)
    return kept


def read_split(root: str | os.PathLike, split: str) -> dict[str, Any]:
    """A split's images (id → file, width, height), captions (id → list, file order), annotations
    (id → instances) and categories (id → name); `duplicates`: the records dropped as repeats."""
    captions_path, instances_path, folder = split_files(root, split)
    captions = _load_json(captions_path, ("images", "annotations"))
    instances = _load_json(instances_path, ("images", "annotations", "categories"))
    dropped: list[dict[str, Any]] = []
    images = {}
    for image in unique_records(instances["images"], instances_path, "image", dropped):
        name = str(image["file_name"])
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:  # joined to the split's folder
            raise InputError(f"{instances_path}: image {image['id']}: file_name {name!r} is not a file name")
        images[int(image["id"])] = {"path": str(folder / name), "width": int(image["width"]),
                                    "height": int(image["height"])}  # fmt: skip
    texts: dict[int, list[str]] = {}
    for ann in unique_records(captions["annotations"], captions_path, "annotation", dropped):
        texts.setdefault(int(ann["image_id"]), []).append(" ".join(str(ann["caption"]).split()))
    objects: dict[int, list[dict[str, Any]]] = {}
    for ann in unique_records(instances["annotations"], instances_path, "annotation", dropped):
        objects.setdefault(int(ann["image_id"]), []).append(ann)
    categories = {int(c["id"]): str(c["name"]) for c in instances["categories"]}
    return {"images": images, "captions": texts, "objects": objects, "categories": categories, "duplicates": dropped}


def read_words(path: str | os.PathLike | None, categories: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """`--coco-words FILE`: a CSV with columns category and word, one synonym a row (e.g. `bird,seagull`)."""
    if path is None:
        return {}
    words: dict[str, list[str]] = {}
    rows = read_keyed_csv(Path(path), "--coco-words ", "category", "word", tuple(categories))
    for category, word in rows:
        if word.strip():
            words.setdefault(category, []).append(word.strip())
    return {c: tuple(w) for c, w in words.items()}


def plurals(name: str) -> tuple[str, ...]:
    """English plurals of a category name (the last word's): bus → buses, teddy bear → teddy bears."""
    if name in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[name]
    head, _, last = name.rpartition(" ")
    if re.search(r"(s|x|z|ch|sh)$", last):
        plural = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return (f"{head} {plural}" if head else plural,)


def caption_word(caption: str, category: str, synonyms: Mapping[str, tuple[str, ...]]) -> str | None:
    """The word (as written in the caption) by which it names the category: its name, its plural or one of
    `synonyms[category]` (and their plurals), as a whole word, case ignored; None when it names none of them."""
    terms = [category, *plurals(category)]
    for synonym in synonyms.get(category, ()):
        terms += [synonym, *plurals(synonym)]
    found = []
    for term in dict.fromkeys(terms):
        match = re.search(rf"(?<![\w-]){re.escape(term)}(?![\w-])", caption, flags=re.IGNORECASE)
        if match:
            found.append((match.start(), -len(term), match.group(0)))
    return min(found)[2] if found else None


def union_mask(annotations: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """The union of instances (polygons, uncompressed or compressed RLE) as a boolean (H, W) mask."""
    from pycocotools import mask as mask_utils

    out = np.zeros((height, width), dtype=bool)
    for ann in annotations:
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):  # polygons
            rles = mask_utils.frPyObjects(segmentation, height, width) if segmentation else []
            rle = mask_utils.merge(rles) if rles else None
        elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE (crowds)
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        if rle is not None:
            out |= mask_utils.decode(rle).astype(bool)
    return out


def mask_to_frame(mask: np.ndarray, resolution: int) -> np.ndarray:
    """A mask in the image's pixels → the prepared frame (shorter side to `resolution`, centre crop), with
    the images' own geometry; the resized coverage is thresholded at one half."""
    from PIL import Image

    from cxrdiff.images import crop_geometry

    height, width = mask.shape
    scale, left, top = crop_geometry(width, height, resolution)
    coverage = Image.fromarray(mask.astype(np.float32)).resize((round(width * scale), round(height * scale)),
                                                                Image.BILINEAR)  # fmt: skip
    return (np.asarray(coverage) >= 0.5)[top : top + resolution, left : left + resolution]


def encode_rle(mask: np.ndarray) -> str:
    """A boolean mask as COCO compressed RLE in JSON text: `{"size": [h, w], "counts": "..."}`."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return json.dumps({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})


def decode_rle(text: str) -> np.ndarray:
    """`encode_rle`'s JSON text (or any COCO compressed RLE as JSON) → a boolean (H, W) mask."""
    from pycocotools import mask as mask_utils

    rle = json.loads(text)
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)
