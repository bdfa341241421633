"""COCO-format data: the caption rule, masks in the prepared frame, and `prepare --format coco` on the phantom."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from cxrdiff.coco import caption_word, decode_rle, encode_rle, mask_to_frame, plurals
from cxrdiff.errors import InputError


@pytest.fixture(scope="module")
def coco_phantom(tmp_path_factory):
    """A COCO-layout phantom: 16 train2017 and 4 val2017 images at 320 px (short side, so 256 px is a reduction,
    as for MS-COCO); not to be modified."""
    from cxrdiff.phantom import PhantomConfig, make_phantom

    path = tmp_path_factory.mktemp("coco") / "coco"
    make_phantom(PhantomConfig(path, patients=16, seed=13, size=320, kind="coco"))
    return path


@pytest.fixture(scope="module")
def coco_prepared(coco_phantom, tiny_model, tmp_path_factory):
    from cxrdiff.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("coco_prepared") / "prepared"
    prepare(PrepareConfig(format="coco", coco=coco_phantom, coco_words=coco_phantom / "synonyms.csv",
                          coco_val_fraction=0.25, base_model=tiny_model, out=out, batch_size=8, workers=0))  # fmt: skip
    return out


def test_caption_rule_as_the_paper():
    """The paper's example: "two birds on a hand rail" stays for bird, "two seagulls ..." does not."""
    assert caption_word("Two birds on a hand rail", "bird", {}) == "birds"
    assert caption_word("Two seagulls on a hand rail", "bird", {}) is None
    assert caption_word("Two seagulls on a hand rail", "bird", {"bird": ("seagull",)}) == "seagulls"
    assert caption_word("A Person riding a bus", "person", {}) == "Person"
    assert caption_word("three people and two buses", "bus", {}) == "buses"
    assert caption_word("three people", "person", {}) == "people"
    assert caption_word("a catalog on a table", "cat", {}) is None  # whole words only
    assert caption_word("two teddy bears", "teddy bear", {}) == "teddy bears"
    assert plurals("skateboard") == ("skateboards",) and plurals("toothbrush") == ("toothbrushes",)


def test_rle_is_cocos_own_and_round_trips():
    from pycocotools import mask as mask_utils

    mask = np.zeros((7, 5), dtype=bool)
    mask[1:4, 2:5] = True
    text = encode_rle(mask)
    rle = json.loads(text)
    assert rle["size"] == [7, 5] and isinstance(rle["counts"], str)
    assert (decode_rle(text) == mask).all()
    assert (mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}) == mask).all()
    assert mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}) == 9


def test_mask_to_frame_follows_the_image_crop():
    """A 200×100 image at 50 px: scale 0.5, 25 px cut on the left; a block at x 60..100 lands at 5..25."""
    mask = np.zeros((100, 200), dtype=bool)
    mask[20:60, 60:100] = True
    framed = mask_to_frame(mask, 50)
    expected = np.zeros((50, 50), dtype=bool)
    expected[10:30, 5:25] = True
    assert framed.shape == (50, 50) and (framed == expected).all()


def _back_projected(mask: np.ndarray, resolution: int) -> np.ndarray:
    """A second implementation of the prepared frame: sample the original mask at each prepared pixel's centre."""
    from cxrdiff.images import crop_geometry

    height, width = mask.shape
    scale, left, top = crop_geometry(width, height, resolution)
    centres = (np.arange(resolution) + 0.5 + np.array([[left], [top]])) / scale  # (2, resolution)
    cols = np.clip(np.floor(centres[0]).astype(int), 0, width - 1)
    rows = np.clip(np.floor(centres[1]).astype(int), 0, height - 1)
    return mask[np.ix_(rows, cols)]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_plan_masks_equal_the_drawn_polygons_at_256(coco_phantom, tmp_path):
    """Each test row's mask, decoded, against the instances' polygons mapped into the prepared frame and filled
    at pixel centres (crowds: their RLE sampled at the prepared pixels): IoU ≥ 0.95 at 256 px; crowd flags as
    annotated."""
    from matplotlib.path import Path
    from pycocotools import mask as mask_utils

    from cxrdiff.images import crop_geometry
    from cxrdiff.phantom.coco import SYNONYMS
    from cxrdiff.prepare.coco import CocoInputs, build_coco_plan

    words = tmp_path / "all_synonyms.csv"  # every synonym, the crowds' "glider" too: every named pair is a row
    words.write_text("category,word\n" + "".join(f"{c},{w}\n" for c, w in SYNONYMS.items()))
    inputs = CocoInputs(coco_phantom, ("train2017", "val2017"), tmp_path, tmp_path, 256, (4, 32, 32), 0.18)
    config = type("C", (), {"coco_words": words, "coco_val_fraction": 0.25, "seed": 0, "shard_size": 8})
    plan = build_coco_plan(config, inputs)
    pairs = plan["units"]["coco_test"]
    instances = json.loads((coco_phantom / "annotations" / "instances_val2017.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    assert len(pairs) and pairs["crowd"].any()
    yy, xx = np.mgrid[0:256, 0:256] + 0.5
    centres = np.stack([xx.ravel(), yy.ravel()], axis=1)  # (256², 2) as (x, y)
    for _, row in pairs.iterrows():
        anns = [a for a in instances["annotations"]
                if a["image_id"] == row["image_id"] and names[a["category_id"]] == row["category_name"]]  # fmt: skip
        scale, left, top = crop_geometry(row["image_width"], row["image_height"], 256)
        drawn = np.zeros((256, 256), dtype=bool)
        sampled = np.zeros((256, 256), dtype=bool)
        for ann in anns:
            if ann["iscrowd"]:
                rle = mask_utils.frPyObjects(ann["segmentation"], row["image_height"], row["image_width"])
                sampled |= _back_projected(mask_utils.decode(rle).astype(bool), 256)
                continue
            for poly in ann["segmentation"]:  # pixel centres inside the polygon, mapped to the prepared frame
                points = [(x * scale - left, y * scale - top) for x, y in zip(poly[0::2], poly[1::2], strict=True)]
                drawn |= Path(points).contains_points(centres).reshape(256, 256)
        expected = drawn | sampled
        assert row["crowd"] == any(a["iscrowd"] for a in anns)
        assert _iou(decode_rle(row["mask_rle"]), expected) >= 0.95, (row["image_id"], row["category_name"])


def test_plan_caption_filter_counts_the_unlisted_synonym(coco_phantom, tmp_path):
    """Pairs named only by "glider" (a synonym not in synonyms.csv) are excluded and counted; without the
    words file every synonym-only pair is; with it, "disc" names a frisbee. Counted by hand from the captions."""
    from cxrdiff.phantom.coco import PLURALS, SYNONYMS
    from cxrdiff.prepare.coco import CocoInputs, build_coco_plan

    captions = json.loads((coco_phantom / "annotations" / "captions_val2017.json").read_text())["annotations"]
    instances = json.loads((coco_phantom / "annotations" / "instances_val2017.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    pairs = sorted({(a["image_id"], names[a["category_id"]]) for a in instances["annotations"]})

    def named(image_id: int, name: str, words: tuple[str, ...]) -> bool:
        texts = [c["caption"].lower() for c in captions if c["image_id"] == image_id]
        terms = [name, PLURALS[name], *words, *(w + "s" for w in words)]
        return any(f" {t} " in f" {text} " for text in texts for t in terms)

    inputs = CocoInputs(coco_phantom, ("train2017", "val2017"), tmp_path, tmp_path, 64, (4, 16, 16), 0.18)
    excluded = []
    for words_file, listed in ((None, {}), (coco_phantom / "synonyms.csv", {"stop sign", "frisbee", "clock"})):
        config = type("C", (), {"coco_words": words_file, "coco_val_fraction": 0.25, "seed": 0, "shard_size": 8})
        plan = build_coco_plan(config, inputs)
        kept = {(i, n) for i, n in pairs if named(i, n, (SYNONYMS[n],) if n in listed else ())}
        counts = plan["counts"]["test_split"]
        assert counts["pairs"] == len(pairs)
        assert counts["pairs_not_named"] == len(pairs) - len(kept)
        assert set(zip(plan["units"]["coco_test"]["image_id"], plan["units"]["coco_test"]["category_name"],
                       strict=True)) == kept  # fmt: skip
        words = set(plan["units"]["coco_test"]["word"].str.lower())
        assert not words & {"glider", "gliders"}
        excluded.append(counts["pairs_not_named"])
    assert excluded[0] > excluded[1] >= 1  # the listed synonyms bring pairs back; "glider" alone stays out


def test_prepare_coco_units(coco_prepared, coco_phantom):
    """Split sizes (train + val = the train split's images, val seeded and recorded), every caption kept,
    test rows with the prepared frame's masks, and latents of the model's shape."""
    manifest = json.loads((coco_prepared / "manifest.json").read_text())
    assert manifest["format"] == "coco" and manifest["latent_shape"] == [4, 16, 16]
    train_images = json.loads((coco_phantom / "annotations" / "captions_train2017.json").read_text())
    n = len(train_images["images"])
    rows = manifest["counts"]["rows"]
    assert rows["val"] == round(0.25 * n) and rows["train"] + rows["val"] == n
    division = (coco_prepared / "coco_split.csv").read_text().splitlines()
    assert division[0] == "image_id,part" and sum(line.endswith(",val") for line in division) == rows["val"]
    train = pq.read_table(coco_prepared / "train-00000.parquet").to_pylist()
    by_image: dict[int, list[str]] = {}
    for ann in train_images["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    assert all(row["captions"] == by_image[row["image_id"]] for row in train) and len(train) == rows["train"]
    test = pq.read_table(coco_prepared / "coco_test.parquet")
    for column in ("image_id", "category_name", "caption", "word", "mask_rle", "crowd", "latent_mean"):
        assert column in test.column_names
    first = test.to_pylist()[0]
    assert first["word"].lower() in first["caption"].lower()
    assert decode_rle(first["mask_rle"]).shape == (64, 64) and list(first["latent_shape"]) == [4, 16, 16]
    assert pq.read_metadata(coco_prepared / "test.parquet").num_rows == 4  # one per val2017 image


def test_colour_reaches_the_vae_input():
    from cxrdiff.images import to_model_input

    red = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    red[..., 0] = 255
    tensor = to_model_input(red)
    assert tuple(tensor.shape) == (1, 3, 4, 4)
    assert tensor[0, 0].eq(1.0).all() and tensor[0, 1:].eq(-1.0).all()


def test_prepare_coco_bad_input_names_the_file(tmp_path, tiny_model):
    """Refused before any image or weight is read, naming the flag and what is missing (exit code 2: InputError)."""
    from cxrdiff.coco import parse_splits
    from cxrdiff.prepare import PrepareConfig, check_inputs

    config = PrepareConfig(format="coco", coco=tmp_path, base_model=tiny_model, out=tmp_path / "o")
    with pytest.raises(InputError) as caught:
        check_inputs(config)
    assert str(caught.value) == (
        f"--coco {tmp_path}: no annotations/captions_train2017.json (COCO's layout: annotations/, train2017/)"
    )
    with pytest.raises(InputError, match="--coco is required with --format coco"):
        check_inputs(PrepareConfig(format="coco", base_model=tiny_model, out=tmp_path / "o"))
    with pytest.raises(InputError, match="--coco-splits 'train2017'"):
        parse_splits("train2017")


@pytest.mark.parametrize("name", ["../../secret.jpg", "/etc/hosts", "..", "a\\b.jpg"])
def test_a_coco_file_name_that_is_a_path_is_refused(tmp_path, name):
    """file_name is joined to the split's folder: a path in it would read an image from elsewhere."""
    from cxrdiff.coco import read_split

    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    image = {"id": 7, "file_name": name, "width": 8, "height": 8}
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": [image], "annotations": []}))
    instances = tmp_path / "annotations" / "instances_val2017.json"
    instances.write_text(json.dumps({"images": [image], "annotations": [], "categories": []}))
    with pytest.raises(InputError) as refused:
        read_split(tmp_path, "val2017")
    assert str(refused.value) == f"{instances}: image 7: file_name {name!r} is not a file name"


def test_repeated_coco_records_are_dropped_and_listed_conflicting_ones_refused(tmp_path):
    """A caption or instance listed twice would be drawn twice as often, an image twice a second test row."""
    from cxrdiff.coco import read_split

    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    image = {"id": 7, "file_name": "a.jpg", "width": 8, "height": 8}
    caption = {"id": 1, "image_id": 7, "caption": "a dog"}
    box = {"id": 5, "image_id": 7, "category_id": 18, "segmentation": [[0, 0, 4, 0, 4, 4]], "iscrowd": 0}
    captions = tmp_path / "annotations" / "captions_val2017.json"
    captions.write_text(json.dumps({"images": [image], "annotations": [caption, caption]}))
    instances = tmp_path / "annotations" / "instances_val2017.json"
    categories = [{"id": 18, "name": "dog"}]
    instances.write_text(json.dumps({"images": [image, image], "annotations": [box, box], "categories": categories}))
    split = read_split(tmp_path, "val2017")
    assert split["captions"] == {7: ["a dog"]} and len(split["objects"][7]) == 1 and list(split["images"]) == [7]
    details = [(d["part"], d["reason"], d["detail"]) for d in split["duplicates"]]
    assert details == [
        ("instances_val2017.json", "duplicate row", "image 1 repeats image 0"),
        ("captions_val2017.json", "duplicate row", "annotation 1 repeats annotation 0"),
        ("instances_val2017.json", "duplicate row", "annotation 1 repeats annotation 0"),
    ]
    other = {**caption, "caption": "a cat"}
    captions.write_text(json.dumps({"images": [image], "annotations": [caption, other]}))
    with pytest.raises(InputError, match=rf"^{captions}: annotation 0 and 1 share id 1 but differ; keep one$"):
        read_split(tmp_path, "val2017")


def test_ground_reads_coco_rows(coco_prepared, tiny_model, tokenizer, tmp_path):
    """`ground --data coco_test.parquet`: each row's caption, the matched word's tokens as the map, and the
    decoded mask as the region it is scored against; MIMIC-only conventions are refused."""
    from cxrdiff.ground import GroundConfig, choose_tokens, load_samples, masks
    from cxrdiff.tokens import word_token_spans

    config = GroundConfig(model=tiny_model, out=tmp_path / "g", data=coco_prepared / "coco_test.parquet")
    samples = load_samples(config)
    table = pq.read_table(coco_prepared / "coco_test.parquet").to_pylist()
    assert len(samples) == len(table)
    for sample, row in zip(samples, table, strict=True):
        assert sample.phrase == row["caption"] and sample.category == row["category_name"]
        positions, source = choose_tokens(tokenizer, sample, None)
        assert source == "word" and positions == word_token_spans(tokenizer, row["caption"], row["word"])[0]
        ((box, mask),) = masks(sample, 64, config)
        assert box is None and (mask == decode_rle(row["mask_rle"])).all()
    multi = next((s for s in samples if " " in s.word), None)  # "stop sign(s)", "road sign(s)": two words' tokens
    if multi is not None:
        assert len(choose_tokens(tokenizer, multi, None)[0]) >= 2
    for change, message in ((dict(frame="original"), "--frame original"), (dict(boxes="per-box"), "--boxes per-box")):
        with pytest.raises(InputError, match=message):
            load_samples(GroundConfig(**{**config.__dict__, **change}))


def test_training_text_draws_a_caption_and_drops_any(coco_prepared, tiny_model, tmp_path):
    """COCO rows: one of the image's captions per step (each about equally often), and the empty prompt for
    any row with p = --ucg-caption; the settings carry the COCO rule, not the MIMIC one (and vice versa)."""
    from cxrdiff.data import LABELS
    from cxrdiff.finetune import FinetuneConfig, TrainingText, run_settings

    captions = [["a dog", "the dog", "one dog"], ["a cat"]]
    text = TrainingText("impression", captions, np.full((2, len(LABELS)), np.nan), 0.1, any_row=True)
    rng = np.random.default_rng(0)
    texts, eligible, dropped = text.batch(np.zeros(30000, dtype=int), rng)
    assert eligible.all() and abs(dropped.mean() - 0.1) < 0.01
    shares = [texts.count(c) / len(texts) for c in captions[0]]
    assert all(abs(share - 0.9 / 3) < 0.015 for share in shares) and texts.count("") == dropped.sum()
    config = FinetuneConfig(data=coco_prepared, base_model=tiny_model, out=tmp_path / "f", frozen_text=True)
    assert "ucg_caption" in run_settings(config) and "ucg_no_finding" not in run_settings(config)
    mimic = FinetuneConfig(data=tmp_path / "none", base_model=tiny_model, out=tmp_path / "f", frozen_text=True)
    assert "ucg_no_finding" in run_settings(mimic) and "ucg_caption" not in run_settings(mimic)


@pytest.mark.slow
def test_chain_phantom_prepare_finetune_ground_report(coco_prepared, tiny_model, tmp_path):
    """phantom-coco → prepare → a tiny frozen fine-tune (with a kept checkpoint) → report: Table 2 with the base
    model as step 0, the checkpoint and the final model; each row's AUC-ROC is the mean of its ground folder's
    scores, and a score recomputed from the saved heatmap and the decoded mask agrees."""
    import pandas as pd

    from cxrdiff.finetune import FinetuneConfig, finetune
    from cxrdiff.ground import normalise, to_frame
    from cxrdiff.metrics.localization import auc_roc
    from cxrdiff.report import ReportConfig, report

    run = tmp_path / "frozen"
    finetune(FinetuneConfig(data=coco_prepared, base_model=tiny_model, out=run, frozen_text=True, steps=2,
                            batch_size=2, checkpoint_every=1, lr=1e-3))  # fmt: skip
    out = tmp_path / "report"
    config = ReportConfig(runs=(tiny_model, run), out=out, n_fid=4, sample_steps=2, ground_steps=2, ground_window=1,
                          ground_limit=6, checkpoints=True, batch_size=6)  # fmt: skip
    result = report(config)
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [(r["run"], r["text_encoder"], r["step"]) for r in metrics["table2"]]
    assert rows == [("tiny", "pretrained", 0), ("frozen", "frozen", 1), ("frozen", "frozen", 2)]
    markdown = (out / "report.md").read_text()
    assert "## Table 2" in markdown and "| SDv2 (pretrained) | 0 | 26.1 | 91.8 |" in markdown
    assert "FD (8×8 grey thumbnails)" in markdown and "FID |" not in markdown.split("Published")[0]
    assert result["report"] == str(out / "report.html")
    assert '<table class="measured">' in (out / "report.html").read_text()
    ground = out / "runs" / "frozen" / "ground"
    scores = pd.read_parquet(ground / "scores.parquet")
    final = metrics["table2"][-1]
    assert final["grounding"]["auc_roc"]["mean"] == pytest.approx(scores["auc_roc"].mean())
    table = pq.read_table(coco_prepared / "coco_test.parquet").to_pylist()
    with np.load(ground / "heatmaps.npz") as maps:
        heat = maps["000000"]
    mask = decode_rle(table[0]["mask_rle"])
    assert scores["auc_roc"].iloc[0] == pytest.approx(auc_roc(to_frame(normalise(heat), 64), mask))
