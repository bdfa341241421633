"""`cxrdiff prepare --format coco`: a COCO-layout data set → latent Parquet units, as the paper's MS-COCO run.

The paper (docs/method.md, "MS-COCO"): the official train split is divided, seeded, into train and
validation images; the official val split is the test set. Every caption of a training image is kept
(finetune draws one per step). Test rows are the image–category pairs one of whose captions names the
category (its name or plural, or a `--coco-words` synonym); each holds the first such caption, the word
matched and the union of the category's instance masks (crowds included, and flagged) in the prepared frame.
Images are resized and centre-cropped as the X-rays are, in colour. The same check → plan → encode →
manifest series as MIMIC (`cxrdiff.prepare.mimic`), with the shared unit encoder (`encode`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import MANIFEST, StepFolder, atomic_path, input_identity, write_json, write_text
from cxrdiff.coco import (
    caption_word,
    encode_rle,
    mask_to_frame,
    parse_splits,
    read_split,
    read_words,
    split_files,
    union_mask,
)
from cxrdiff.config import settings, to_dict
from cxrdiff.console import log
from cxrdiff.distributed import accelerator
from cxrdiff.errors import InputError
from cxrdiff.models import check_model_folder, model_geometry, vae_fingerprint
from cxrdiff.prepare import jobs
from cxrdiff.prepare.config import PrepareConfig, check_out, input_folder, require_flags
from cxrdiff.prepare.encode import (
    STATE,
    Layout,
    encode_unit,
    load_vae,
    loader_workers,
)
from cxrdiff.prepare.results import latent_record, warn_empty_parts, write_skipped
from cxrdiff.shards import label
from cxrdiff.speed import limit_cpu_threads

SPLIT_FILE = "coco_split.csv"  # image_id, part (train / val / test): the seeded division, recorded


@dataclasses.dataclass(frozen=True)
class CocoInputs:
    root: Path
    splits: tuple[str, str]
    base_model: Path
    out: Path
    resolution: int
    latent_shape: tuple[int, int, int]
    scaling_factor: float


def check_coco_inputs(config: PrepareConfig) -> CocoInputs:
    """Every structural fault of a `--format coco` run, before any image or weight is read."""
    require_flags(config, ("coco", "base_model", "out"), "coco")
    root = input_folder("coco", config.coco)
    splits = parse_splits(config.coco_splits)
    for split in splits:
        split_files(root, split)
    if config.coco_words is not None and not Path(config.coco_words).is_file():
        raise InputError(f"--coco-words {config.coco_words}: file not found")
    base_model = check_model_folder(config.base_model)
    resolution, latent_shape, scaling_factor = model_geometry(base_model, config.resolution)
    inputs = CocoInputs(root.absolute(), splits, base_model, Path(config.out), resolution, latent_shape, scaling_factor)
    check_out(inputs.out, coco_settings(config, inputs))
    return inputs


def coco_settings(config: PrepareConfig, inputs: CocoInputs) -> dict[str, Any]:
    """The settings of a COCO run: its own fields, the annotation files (size, mtime), words file and VAE."""
    files = {}
    for split in inputs.splits:
        for path in split_files(inputs.root, split)[:2]:
            stat = path.stat()
            files[path.name] = [str(path), stat.st_size, stat.st_mtime_ns]
    return settings(config, resolution=inputs.resolution, vae=vae_fingerprint(inputs.base_model), annotations=files,
                    coco=str(inputs.root), coco_splits=list(inputs.splits),
                    coco_words=input_identity(config.coco_words) if config.coco_words else None)  # fmt: skip


# --- plan -----------------------------------------------------------------------------------


def _train_rows(split: dict[str, Any], fraction: float, seed: int, counts: dict) -> tuple[list, list]:
    """Images with a caption, divided (seeded) into train and validation rows; each row keeps every caption."""
    ids = sorted(i for i in split["images"] if split["captions"].get(i))
    counts["images"], counts["without_caption"] = len(split["images"]), len(split["images"]) - len(ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = int(round(fraction * len(ids)))
    val = {ids[k] for k in order[:n_val]}
    rows: dict[str, list] = {"train": [], "val": []}
    for image_id in ids:
        image = split["images"][image_id]
        rows["val" if image_id in val else "train"].append(
            {"image_id": image_id, "captions_json": json.dumps(split["captions"][image_id]),
             "image_path": image["path"], "image_width": image["width"], "image_height": image["height"]}
        )  # fmt: skip
    counts["train"], counts["val"] = len(rows["train"]), len(rows["val"])
    return rows["train"], rows["val"]


def _test_rows(split: dict[str, Any], synonyms: dict, resolution: int, counts: dict) -> tuple[list, list]:
    """(one row per test image with its first caption, for sampling and FID; one row per image–category
    pair named by a caption, with its mask in the prepared frame)."""
    images, pairs = [], []
    counts.update(images=0, pairs=0, pairs_named=0, pairs_not_named=0, pairs_named_by_synonym=0, crowd_pairs=0)
    not_named: dict[str, int] = {}
    for image_id in sorted(split["images"]):
        image, captions = split["images"][image_id], split["captions"].get(image_id, [])
        if not captions:
            continue
        counts["images"] += 1
        base = {"image_id": image_id, "image_path": image["path"], "image_width": image["width"],
                "image_height": image["height"]}  # fmt: skip
        images.append({**base, "caption": captions[0]})
        by_category: dict[int, list] = {}
        for ann in split["objects"].get(image_id, []):
            by_category.setdefault(int(ann["category_id"]), []).append(ann)
        for category_id in sorted(by_category):
            name = split["categories"][category_id]
            counts["pairs"] += 1
            match = next(((c, w) for c in captions if (w := caption_word(c, name, synonyms))), None)
            if match is None:
                counts["pairs_not_named"] += 1
                not_named[name] = not_named.get(name, 0) + 1
                continue
            counts["pairs_named"] += 1
            counts["pairs_named_by_synonym"] += int(match[1].lower() not in (name, *_plural_forms(name)))
            anns = by_category[category_id]
            crowd = any(int(a.get("iscrowd", 0)) for a in anns)
            counts["crowd_pairs"] += int(crowd)
            mask = mask_to_frame(union_mask(anns, image["height"], image["width"]), resolution)
            pairs.append({**base, "category_id": category_id, "category_name": name, "caption": match[0],
                          "word": match[1], "mask_rle": encode_rle(mask), "mask_pixels": int(mask.sum()),
                          "crowd": crowd, "instances": len(anns)})  # fmt: skip
    counts["not_named_by_category"] = dict(sorted(not_named.items()))
    return images, pairs


def _plural_forms(name: str) -> tuple[str, ...]:
    from cxrdiff.coco import plurals

    return plurals(name)


def build_coco_plan(config: Any, inputs: CocoInputs) -> dict[str, Any]:
    """Every row to encode, grouped in units (`test`, `coco_test`, `val`, `train-NNNNN`), with the counts."""
    import pandas as pd

    train_split, test_split = (read_split(inputs.root, s) for s in inputs.splits)
    synonyms = read_words(config.coco_words, test_split["categories"].values())
    counts: dict[str, Any] = {"train_split": {}, "test_split": {}}
    duplicates = train_split["duplicates"] + test_split["duplicates"]
    counts["duplicate_rows"] = len(duplicates)
    if duplicates:
        log.warning("--coco %s: %d repeated record(s) dropped (listed in skipped.csv)", inputs.root, len(duplicates))
    train, val = _train_rows(train_split, config.coco_val_fraction, config.seed, counts["train_split"])
    test_images, pairs = _test_rows(test_split, synonyms, inputs.resolution, counts["test_split"])
    image = ["image_path", "image_width", "image_height"]
    train_columns = ["image_id", "captions_json", *image]
    pair_columns = [n for n in coco_schema("coco_test").names if not n.startswith("latent_")]
    units = {"test": pd.DataFrame(test_images, columns=["image_id", *image, "caption"]),
             "coco_test": pd.DataFrame(pairs, columns=pair_columns),
             "val": pd.DataFrame(val, columns=train_columns)}  # fmt: skip
    frame = pd.DataFrame(train, columns=train_columns)
    for k in range(max(1, (len(frame) + config.shard_size - 1) // config.shard_size)):
        units[f"train-{k:05d}"] = frame.iloc[k * config.shard_size : (k + 1) * config.shard_size]
    division = [{"image_id": r["image_id"], "part": part} for part, rows in (("train", train), ("val", val))
                for r in rows] + [{"image_id": r["image_id"], "part": "test"} for r in test_images]  # fmt: skip
    return {"units": units, "counts": counts, "division": division, "synonyms": synonyms, "skipped": duplicates}


# --- the step -------------------------------------------------------------------------------


def coco_schema(unit: str):
    """The columns of a COCO unit (the latents last, as in every prepared file)."""
    import pyarrow as pa

    latent = [("latent_mean", pa.binary()), ("latent_logvar", pa.binary()), ("latent_shape", pa.list_(pa.int32()))]
    image = [("image_path", pa.string()), ("image_width", pa.int32()), ("image_height", pa.int32())]
    if unit == "coco_test":
        return pa.schema([("image_id", pa.int64()), ("category_id", pa.int64()), ("category_name", pa.string()),
                          ("caption", pa.string()), ("word", pa.string()), ("mask_rle", pa.string()),
                          ("mask_pixels", pa.int64()), ("crowd", pa.bool_()), ("instances", pa.int32()),
                          *image, *latent])  # fmt: skip
    if unit == "test":
        return pa.schema([("image_id", pa.int64()), ("caption", pa.string()), *image, *latent])
    return pa.schema([("image_id", pa.int64()), ("captions", pa.list_(pa.string())), *image, *latent])


LAYOUT = Layout(schema=coco_schema, rgb=True)


def _plan(config: Any, inputs: CocoInputs) -> dict[str, Any]:
    """Build and save the plan (one Parquet file per unit), or read the one this folder already has."""
    import pandas as pd

    state = inputs.out / STATE
    if (state / "plan.json").is_file():
        return json.loads((state / "plan.json").read_text())
    plan = build_coco_plan(config, inputs)
    for unit, frame in plan["units"].items():
        with atomic_path(state / f"plan-{unit}.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
    write_text(
        inputs.out / SPLIT_FILE, pd.DataFrame(plan["division"], columns=["image_id", "part"]).to_csv(index=False)
    )
    saved = {"units": list(plan["units"]), "counts": plan["counts"], "synonyms": plan["synonyms"],
             "skipped": plan["skipped"]}  # fmt: skip
    write_json(state / "plan.json", saved)
    return saved


def prepare_coco(config: PrepareConfig) -> dict[str, Any]:
    """Run `prepare --format coco` (or resume it); return the counts and paths."""
    import pandas as pd

    start = time.perf_counter()
    inputs = check_coco_inputs(config)
    acc = accelerator(config.dist_timeout)
    limit_cpu_threads(acc.device)
    folder, part = jobs.claim(config, inputs.out, coco_settings(config, inputs), acc)
    if folder.finished:
        log.info("%s: already prepared; nothing to do", inputs.out)
        return _summary(inputs.out) if acc.is_main_process else {}
    jobs.plan_once(folder, acc, lambda: _plan(config, inputs))
    state = inputs.out / STATE
    plan = json.loads((state / "plan.json").read_text())
    todo = jobs.units_to_do(plan["units"], inputs.out, part, config.finalize)
    if todo:
        vae = load_vae(inputs.base_model, acc.device)

        def encode(unit: str) -> None:
            rows = pd.read_parquet(state / f"plan-{unit}.parquet")
            if "captions_json" in rows.columns:
                rows = rows.assign(captions=rows["captions_json"].map(json.loads))
            encode_unit(acc, vae, rows, unit, inputs.out, inputs.resolution, config.batch_size,
                        loader_workers(config, acc.num_processes), LAYOUT)  # fmt: skip

        jobs.encode_units(acc, todo, encode, label(part, acc.process_index, acc.num_processes))
    if not acc.is_main_process:
        return {}
    seconds = {"seconds": round(time.perf_counter() - start, 1)}

    def finish() -> dict[str, Any]:
        result = _finish(folder, config, inputs, plan)
        warn_empty_parts(inputs.out, {part: result[f"{part}_rows"] for part in ("train", "test", "coco_test")})
        return result

    return jobs.complete(folder, plan["units"], inputs.out, config.finalize, finish) | seconds


def _finish(folder: StepFolder, config: Any, inputs: CocoInputs, plan: dict[str, Any]) -> dict[str, Any]:
    """skipped.csv and the manifest, from the plan and the completed units."""
    import pyarrow.parquet as pq

    out, state = inputs.out, inputs.out / STATE
    rows, skipped = {}, list(plan.get("skipped", []))
    for unit in plan["units"]:
        rows[unit] = pq.read_metadata(out / f"{unit}.parquet").num_rows
        skipped += json.loads((state / f"{unit}.skipped.json").read_text())
    shards = [f"{u}.parquet" for u in plan["units"] if u.startswith("train-")]
    counts = plan["counts"] | {"rows": {"train": sum(rows[s[:-8]] for s in shards), "val": rows["val"],
                                        "test": rows["test"], "coco_test": rows["coco_test"]}}  # fmt: skip
    write_skipped(out, skipped)
    resolved = to_dict(dataclasses.replace(config, resolution=inputs.resolution))
    folder.finish(
        config=resolved,
        inputs={"coco": inputs.root, "base_model": inputs.base_model},
        seed=config.seed,
        files=[*shards, "val.parquet", "test.parquet", "coco_test.parquet", SPLIT_FILE, "skipped.csv"],
        extra={
            "format": "coco",
            "coco_splits": list(inputs.splits),
            **latent_record(inputs.base_model, inputs.resolution, inputs.latent_shape, inputs.scaling_factor),
            "shards": shards,
            "counts": counts,
            "synonyms": plan["synonyms"],
            "caption_rule": "a test pair is kept when one of the image's captions names the category (its name or "
            "plural, or a --coco-words synonym, whole words, case ignored); the first such caption is its prompt",
            "skipped": len(skipped),
        },
    )
    return _summary(out)


def _summary(out: Path) -> dict[str, Any]:
    manifest = json.loads((out / MANIFEST).read_text())
    rows = manifest["counts"]["rows"]
    return {"out": str(out), "format": "coco", **{f"{k}_rows": v for k, v in rows.items()},
            "pairs_not_named": manifest["counts"]["test_split"]["pairs_not_named"],
            "skipped": manifest["skipped"], "resolution": manifest["resolution"]}  # fmt: skip
