"""`cxrdiff phantom --kind coco`: a small synthetic data set in COCO's layout, whose objects have exact masks.

The in-domain chain (the paper's MS-COCO experiment) needs captioned images with instance segmentations;
MS-COCO itself is 19 GB. This writes the same files at toy size: `annotations/captions_{split}.json`,
`annotations/instances_{split}.json` and `{split}/NNNNNNNNNNNN.jpg` for `train2017` and `val2017`.
Each picture is a textured colour background with one to three objects of four COCO categories, each a
distinct shape and colour drawn from its polygon (so the polygon is the exact instance mask); some
images hold a crowd (a cluster of kites, one `iscrowd` RLE annotation). Each image has three captions
that name some of its objects by category name, plural, or a synonym (`synonyms.csv` lists some of
them, for `prepare --coco-words`; "glider" is deliberately left out). Everything random comes from
`seed` and the image's number, so the same settings write the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import StepFolder, atomic_path, write_json, write_text
from cxrdiff.config import to_dict
from cxrdiff.phantom.config import PhantomConfig

# COCO's own ids and names; each drawn as one shape in one colour.
CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 13, "name": "stop sign", "supercategory": "outdoor", "shape": "octagon", "colour": (200, 30, 30)},
    {"id": 34, "name": "frisbee", "supercategory": "sports", "shape": "ellipse", "colour": (240, 220, 40)},
    {"id": 38, "name": "kite", "supercategory": "sports", "shape": "diamond", "colour": (40, 90, 220)},
    {"id": 85, "name": "clock", "supercategory": "indoor", "shape": "circle", "colour": (245, 245, 245)},
)
PLURALS = {"stop sign": "stop signs", "frisbee": "frisbees", "kite": "kites", "clock": "clocks"}
SYNONYMS = {"stop sign": "road sign", "frisbee": "disc", "kite": "glider", "clock": "timepiece"}
LISTED_SYNONYMS = ("stop sign", "frisbee", "clock")  # synonyms.csv: all but "glider" (prepare drops those)
SPLITS = ("train2017", "val2017")
WORDS_FILE = "synonyms.csv"
_COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
_SCENES = ("on a striped wall", "over a textured field", "in front of a patterned background", "on a speckled floor")


def _polygon(shape: str, cx: float, cy: float, r: float, rng: np.random.Generator) -> list[float]:
    """The shape's outline as COCO's flat [x0, y0, x1, y1, ...] polygon, in pixel coordinates."""
    if shape == "diamond":
        points = [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    else:
        n = 8 if shape == "octagon" else 32
        ry = r * (0.6 if shape == "ellipse" else 1.0)
        turn = math.pi / 8 if shape == "octagon" else 0.0
        points = [(cx + r * math.cos(2 * math.pi * k / n + turn), cy + ry * math.sin(2 * math.pi * k / n + turn))
                  for k in range(n)]  # fmt: skip
    return [round(float(v), 2) for p in points for v in p]


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A textured colour background: a tinted gradient, stripes and noise (H, W, 3) float in 0..255."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tint = rng.uniform(60, 160, 3)
    angle, period = rng.uniform(0, math.pi), rng.uniform(8, 24)
    stripes = 18 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    gradient = 30 * (yy / height - 0.5)
    noise = rng.normal(0, 10, (height, width, 3))
    return np.clip(tint + (stripes + gradient)[..., None] + noise, 0, 255)


def _draw(task: dict[str, Any]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One picture and its instance annotations (polygons; a crowd as one RLE of its parts' union)."""
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(task["seed"])
    width, height = task["width"], task["height"]
    image = Image.fromarray(_background(rng, width, height).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    annotations = []
    for obj in task["objects"]:
        cat = CATEGORIES[obj["category"]]
        r = obj["radius"] * min(width, height)
        centres = [(obj["x"] * width, obj["y"] * height)]
        if obj["crowd"]:  # a cluster of small ones: COCO marks such groups iscrowd=1 with one RLE mask
            r *= 0.35
            centres = [(cx + rng.uniform(-2.5, 2.5) * r, cy + rng.uniform(-2.5, 2.5) * r) for cx, cy in centres * 5]
        polygons = [_polygon(cat["shape"], cx, cy, r, rng) for cx, cy in centres]
        for poly in polygons:
            draw.polygon(list(zip(poly[0::2], poly[1::2], strict=True)), fill=cat["colour"])
        rles = mask_utils.frPyObjects(polygons, height, width)
        merged = mask_utils.merge(rles)
        if obj["crowd"]:
            segmentation = {"counts": _uncompressed(mask_utils.decode(merged)), "size": [height, width]}
        else:
            segmentation = polygons
        annotations.append(
            {
                "category_id": cat["id"],
                "segmentation": segmentation,
                "area": float(mask_utils.area(merged)),
                "bbox": [round(float(v), 2) for v in mask_utils.toBbox(merged)],
                "iscrowd": int(obj["crowd"]),
            }
        )
    return np.asarray(image), annotations


def _uncompressed(binary: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts (column-major runs, starting with a run of zeros), as crowds use."""
    flat = np.asarray(binary, dtype=np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(edges).tolist()
    return ([0] + runs) if flat.size and flat[0] == 1 else runs


def _captions(rng: np.random.Generator, objects: list[dict[str, Any]]) -> list[str]:
    """Three captions: each names one or two of the image's categories, a category by its name (plural) in
    every caption, or (about one in three) by its synonym in every caption, like "two seagulls" for bird."""
    present = sorted({o["category"] for o in objects})
    counts = {c: sum(1 for o in objects if o["category"] == c) for c in present}
    by_synonym = {c: bool(rng.random() < 0.3) for c in present}
    captions = []
    for _ in range(3):
        named = [int(c) for c in rng.permutation(present)[: int(rng.integers(1, min(2, len(present)) + 1))]]
        parts = []
        for c in named:
            name = CATEGORIES[c]["name"]
            n = min(counts[c], 3)
            singular, plural = (SYNONYMS[name], SYNONYMS[name] + "s") if by_synonym[c] else (name, PLURALS[name])
            word = plural if n > 1 else singular
            parts.append(f"{_COUNT_WORDS[n]} {word}")
        captions.append(f"{' and '.join(parts)} {_SCENES[int(rng.integers(len(_SCENES)))]}".capitalize())
    return captions


def _plan(images: int, seed: int, size: int) -> dict[str, list[dict[str, Any]]]:
    """Every image of both splits: size, objects (category, place, size, crowd) and captions."""
    rng = np.random.default_rng(seed)
    plan: dict[str, list[dict[str, Any]]] = {}
    image_id = 1
    for split, n in zip(SPLITS, (images, max(4, images // 4)), strict=True):
        tasks = []
        for _ in range(n):
            landscape = rng.random() < 0.7
            width, height = (size * 4 // 3, size) if landscape else (size, size * 5 // 4)
            objects = []
            for _ in range(int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))):
                category = int(rng.integers(len(CATEGORIES)))
                crowd = CATEGORIES[category]["name"] == "kite" and rng.random() < 0.4
                objects.append({"category": category, "x": float(rng.uniform(0.3, 0.7)),
                                "y": float(rng.uniform(0.3, 0.7)), "radius": float(rng.uniform(0.08, 0.18)),
                                "crowd": bool(crowd)})  # fmt: skip
            tasks.append({"id": image_id, "width": width, "height": height, "objects": objects,
                          "seed": int(rng.integers(2**31)), "captions": _captions(rng, objects)})  # fmt: skip
            image_id += 1
        plan[split] = tasks
    return plan


def _write_split(out: Path, split: str, tasks: list[dict[str, Any]]) -> dict[str, int]:
    """`{split}/*.jpg` and the split's two annotation files; returns its counts."""
    from PIL import Image

    images, instances, captions = [], [], []
    for task in tasks:
        name = f"{task['id']:012d}.jpg"
        picture, annotations = _draw(task)
        with atomic_path(out / split / name) as tmp:
            Image.fromarray(picture).save(tmp, format="JPEG", quality=95)
        images.append({"id": task["id"], "file_name": name, "width": task["width"], "height": task["height"]})
        for ann in annotations:
            instances.append({"id": len(instances) + 1, "image_id": task["id"], **ann})
        for text in task["captions"]:
            captions.append({"id": len(captions) + 1, "image_id": task["id"], "caption": text})
    categories = [{k: c[k] for k in ("id", "name", "supercategory")} for c in CATEGORIES]
    info = {"description": "cxrdiff phantom (COCO layout)", "version": "1.0"}
    write_json(out / "annotations" / f"instances_{split}.json",
               {"info": info, "images": images, "annotations": instances, "categories": categories})  # fmt: skip
    write_json(out / "annotations" / f"captions_{split}.json",
               {"info": info, "images": images, "annotations": captions})  # fmt: skip
    return {"images": len(images), "instances": len(instances), "crowd": sum(a["iscrowd"] for a in instances),
            "captions": len(captions)}  # fmt: skip


def write_coco_set(config: PhantomConfig, folder: StepFolder) -> dict[str, Any]:
    """Write the COCO-layout phantom into the claimed `folder` (`--patients` is the number of train2017
    images; val2017 gets a quarter of that, at least 4); return its paths and counts."""
    from cxrdiff.console import log

    out = Path(config.out)
    if folder.finished:
        log.info("%s: COCO phantom already complete with these settings", out)
        return {"out": str(out), **folder.manifest["counts"]}
    plan = _plan(config.patients, config.seed, config.size)
    counts = {split: _write_split(out, split, tasks) for split, tasks in plan.items()}
    words = "".join(f"{name},{SYNONYMS[name]}\n" for name in LISTED_SYNONYMS)
    write_text(out / WORDS_FILE, "category,word\n" + words)
    folder.finish(config=to_dict(config), seed=config.seed, extra={"kind": "coco", "counts": counts})
    return {"out": str(out), **counts}
