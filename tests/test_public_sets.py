"""`cxrdiff prepare --format nih | openi | csv` (docs/public-sets.md): the tables torchxrayvision ships, real
file formats, and the 61 real NIH ChestX-ray14 images that CI points at with CXRDIFF_TEST_NIH."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_main import run_main
from PIL import Image

from cxrdiff.prepare import PrepareConfig, prepare

REAL_NIH = os.environ.get("CXRDIFF_TEST_NIH")
needs_real_nih = pytest.mark.skipif(
    not REAL_NIH or not Path(REAL_NIH).is_dir(),
    reason="CXRDIFF_TEST_NIH is not set to the folder of real NIH ChestX-ray14 images (.ci/run sets it)",
)
BOXED = ("00001369_000", "00004296_000", "00013125_000", "00013911_000", "00015649_000")


def read(out: Path, unit: str) -> pd.DataFrame:
    return pd.read_parquet(out / f"{unit}.parquet").drop(columns=["latent_mean", "latent_logvar"])


def skipped(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "skipped.csv", dtype={"dicom_id": str})


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def grey(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A grey test picture (height, width) with structure, so no two are the same."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)


# --- csv ------------------------------------------------------------------------------------------


def write_csv_set(root: Path) -> tuple[Path, Path, Path]:
    """An image folder with every PIL mode, 150 to 5,000 px, odd aspect ratios, a colour photo, an unreadable
    file; a table with a missing image, a duplicate row, a long text, a given split, labels; and a boxes file."""
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    g = grey((200, 100))
    Image.fromarray(g).save(images / "wide_L.png")  # 200 × 100: the boxes' image
    Image.fromarray(grey((150, 150), 1) > 127).save(images / "mode_1.png")
    Image.fromarray(grey((160, 300), 2).astype(np.uint16) * 257).save(images / "mode_I16.png")  # I;16
    Image.fromarray(grey((300, 160), 3).astype(np.int32) * 1000, mode="I").save(images / "mode_I.tif")
    Image.fromarray(np.stack([grey((180, 180), 4)] * 3, -1)).save(images / "grey_RGB.png")
    rgba = np.concatenate([np.stack([grey((180, 200), 5)] * 3, -1), np.full((200, 180, 1), 255, np.uint8)], -1)
    Image.fromarray(rgba).save(images / "grey_RGBA.png")
    Image.fromarray(grey((170, 190), 6)).convert("P").save(images / "mode_P.png")
    Image.fromarray(grey((5000, 150), 7)).save(images / "sub" / "long_5000.png")
    colour = np.zeros((160, 160, 3), np.uint8)
    colour[..., 0] = 255
    Image.fromarray(colour).save(images / "colour.png")
    (images / "broken.png").write_bytes(b"not a png at all")
    long_text = " ".join(["bilateral"] * 100)
    rows = [
        ("wide_L.png", "Left pleural effusion.", "p1", "test", "PA", "Pleural Effusion|Mass"),  # boxed: in neither
        ("mode_1.png", "Clear lungs.", "p2", "", "PA", "No Finding"),
        ("mode_1.png", "Clear lungs.", "p2", "", "PA", "No Finding"),  # an exact duplicate
        ("mode_I16.png", "Cardiomegaly.", "p3", "test", "AP", "Cardiomegaly"),
        ("mode_I.tif", long_text, "p4", "", "", ""),
        ("grey_RGB.png", "Edema.", "p5", "", "frontal", "Edema"),
        ("grey_RGBA.png", "Small effusion.", "p6", "", "PA", ""),
        ("mode_P.png", "Atelectasis.", "p7", "train", "PA", "Atelectasis"),
        ("sub/long_5000.png", "Normal.", "p8", "", "PA", ""),
        ("colour.png", "A colour photograph.", "p9", "", "PA", ""),
        ("broken.png", "Unreadable.", "p10", "", "PA", ""),
        ("missing.png", "No such file.", "p11", "", "PA", ""),
        ("lateral.png", "A lateral view.", "p12", "", "LL", ""),
    ]
    table = root / "table.csv"
    pd.DataFrame(rows, columns=["image", "text", "patient", "split", "view", "labels"]).to_csv(table, index=False)
    boxes = root / "boxes.csv"
    pd.DataFrame(
        [
            ("wide_L.png", "left pleural effusion", 100, 20, 50, 40),
            ("wide_L.png", "left pleural effusion", 0, 0, 10, 10),
        ],
        columns=["image", "phrase", "x", "y", "w", "h"],
    ).to_csv(boxes, index=False)
    return images, table, boxes


@pytest.fixture(scope="module")
def csv_prepared(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("csvset")
    images, table, boxes = write_csv_set(root)
    out = root / "prepared"
    config = PrepareConfig(format="csv", images=images, table=table, boxes=boxes, base_model=tiny_model, out=out)
    prepare(config)
    return out


def test_csv_every_mode_and_size_is_encoded_and_every_fault_listed(csv_prepared):
    test, train = read(csv_prepared, "test"), read(csv_prepared, "train-00000")
    kept = set(train["dicom_id"]) | set(test["dicom_id"])
    assert kept == {"mode_1.png", "mode_I16.png", "mode_I.tif", "grey_RGB.png", "grey_RGBA.png", "mode_P.png",
                    "sub/long_5000.png"}  # fmt: skip
    assert "wide_L.png" not in kept  # its patient is boxed: out of training and test
    reasons = dict(zip(skipped(csv_prepared)["dicom_id"], skipped(csv_prepared)["reason"], strict=True))
    assert reasons == {"mode_1.png": "duplicate row", "colour.png": "colour image", "broken.png": "unreadable image",
                       "missing.png": "image not found", "lateral.png": "not a frontal view"}  # fmt: skip
    counts = manifest(csv_prepared)["counts"]
    assert counts["duplicate_rows"] == 1 and counts["table_rows"] == 13 and counts["image_not_found"] == 1
    assert counts["labels_outside_chexpert"] == {"Mass": 1}
    assert manifest(csv_prepared)["data_set"]["text_source"] == "text"


def test_csv_split_labels_and_truncation(csv_prepared):
    test, train = read(csv_prepared, "test"), read(csv_prepared, "train-00000")
    assert "mode_I16.png" in set(test["dicom_id"]) and "mode_P.png" in set(train["dicom_id"])  # the given splits
    assert not set(train["subject_id"]) & set(test["subject_id"])
    both = pd.concat([train, test]).set_index("dicom_id")
    assert both.loc["mode_I16.png", "Cardiomegaly"] == 1.0 and both.loc["mode_I16.png", "Edema"] == 0.0
    assert np.isnan(both.loc["grey_RGBA.png", "Edema"])  # no labels given: unknown, not negative
    assert both.loc["grey_RGB.png", "view"] == "FRONTAL"
    assert bool(both.loc["mode_I.tif", "truncated"]) and both["truncated"].sum() == 1  # 100 words > 77 tokens
    over = manifest(csv_prepared)["prompts_over_context"]
    assert over["context_length"] == 77 and over["train"] + over["test"] == 1


def test_csv_boxes_in_stored_pixels_land_in_the_prepared_frame(csv_prepared):
    ms = read(csv_prepared, "ms_cxr")
    assert list(ms["label_text"]) == ["left pleural effusion"] and ms["image_width"][0] == 200
    # 200 × 100 → short side 64: scale 0.64, 128 × 64, crop left (128 − 64) // 2 = 32
    boxes = sorted(list(box) for box in ms["boxes"][0])
    assert boxes[1] == pytest.approx([100 * 0.64 - 32, 20 * 0.64, 50 * 0.64, 40 * 0.64])
    assert boxes[0] == pytest.approx([0.0, 0.0, 0.0, 6.4])  # 0..10 px lies left of the crop: clipped to nothing


def test_csv_missing_column_is_one_line_and_exit_2(tiny_model, tmp_path, capsys, monkeypatch):
    (tmp_path / "images").mkdir()
    table = tmp_path / "t.csv"
    table.write_text("image,caption\na.png,hello\n")
    argv = ["prepare", "--format", "csv", "--images", tmp_path / "images", "--table", table,
            "--base-model", tiny_model, "--out", tmp_path / "out"]  # fmt: skip
    code, err, _ = run_main(argv, capsys, monkeypatch)
    assert code == 2 and len(err) == 1 and str(table) in err[0] and "'text'" in err[0], err
    assert not (tmp_path / "out").exists()
    boxes = tmp_path / "b.csv"
    boxes.write_text("image,phrase,x,y,w\n")
    table.write_text("image,text\na.png,hello\n")
    code, err, _ = run_main([*argv, "--boxes", boxes], capsys, monkeypatch)
    assert code == 2 and len(err) == 1 and str(boxes) in err[0] and "'h'" in err[0], err
    Image.fromarray(grey((96, 96))).save(tmp_path / "images" / "a.png")
    boxes.write_text("image,phrase,x,y,w,h\na.png,effusion,1,2,3,4\na.png,effusion,1,two,3,4\n")
    code, err, _ = run_main([*argv, "--boxes", boxes], capsys, monkeypatch)
    assert code == 2 and err == [f"error: {boxes}: column 'y' has a value that is not a number (line 3)"], err
    assert not (tmp_path / "out").exists()


def test_exif_orientation_is_applied(tmp_path):
    from cxrdiff.images import load_grayscale

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    Image.fromarray(grey((120, 80))).save(tmp_path / "rotated.jpg", exif=exif)
    Image.fromarray(grey((120, 80))).save(tmp_path / "plain.jpg")
    assert load_grayscale(tmp_path / "rotated.jpg").shape == (120, 80)
    assert load_grayscale(tmp_path / "plain.jpg").shape == (80, 120)


# --- openi ----------------------------------------------------------------------------------------

OPENI_FILES = {  # the release's names → what the shipped reports and metadata make of them
    "CXR1_1_IM-0001-3001": "Normal chest x-XXXX.",
    "CXR4_IM-2050-1001": "1. Bullous emphysema and interstitial fibrosis.",  # the impression's start
    "CXR4_IM-2050-2001": "1. Bullous emphysema and interstitial fibrosis.",
    "CXR6_IM-2192-1001": "No acute cardiopulmonary findings.",
    "CXR6_IM-2192-2001": "No acute cardiopulmonary findings.",
    "CXR10_IM-0002-2001": "No acute cardiopulmonary process.",  # AP
    "CXR1001_IM-0004-1002": "not a frontal view",  # LL
    "CXR2_IM-0652-1001": "not a frontal view",  # no view recorded
    "CXR99999_IM-9999-1001": "not in the reports",
}


def openi_images(folder: Path) -> Path:
    folder.mkdir()
    for k, name in enumerate(OPENI_FILES):
        Image.fromarray(grey((96, 110), k)).save(folder / f"{name}.png")
    return folder


def test_openi_impressions_and_frontal_views_from_the_shipped_tables(tiny_model, tmp_path):
    images = openi_images(tmp_path / "NLMCXR_png")
    out = tmp_path / "prepared"
    prepare(PrepareConfig(format="openi", images=images, base_model=tiny_model, out=out))
    rows = pd.concat([read(out, "test"), read(out, "train-00000")]).set_index("dicom_id")
    kept = {k: v for k, v in OPENI_FILES.items() if v not in ("not a frontal view", "not in the reports")}
    assert set(rows.index) == set(kept)
    for name, text in kept.items():
        assert rows.loc[name, "impression"].startswith(text) and rows.loc[name, "impression_source"] == "impression"
    assert rows.loc["CXR10_IM-0002-2001", "view"] == "AP" and rows.loc["CXR4_IM-2050-1001", "subject_id"] == 4
    assert read(out, "test")["subject_id"].nunique() == 1  # round(0.2 × 4 patients) drawn whole
    assert len(read(out, "ms_cxr")) == 0
    why = skipped(out).set_index("dicom_id")
    assert why.loc["CXR1001_IM-0004-1002", "detail"] == "View Position LL"
    assert why.loc["CXR2_IM-0652-1001", "detail"] == "View Position not recorded"
    assert why.loc["CXR99999_IM-9999-1001", "reason"] == "not in the reports"
    recorded = manifest(out)
    assert recorded["format"] == "openi" and recorded["data_set"]["text_source"] == "impressions"
    assert "no finding boxes" in recorded["data_set"]["grounding"]


@pytest.mark.slow
def test_openi_without_boxes_goes_through_finetune_and_report(tiny_model, tmp_path):
    """No grounding set: the report samples and scores fidelity, says why there is no CNR, and grounds nothing."""
    from test_report import Brightness

    from cxrdiff.finetune import FinetuneConfig, finetune
    from cxrdiff.report import ReportConfig, report

    real = tmp_path / "prepared"
    images = openi_images(tmp_path / "png")
    prepare(PrepareConfig(format="openi", images=images, base_model=tiny_model, out=real, test_fraction=0.5))
    run = tmp_path / "run"
    finetune(FinetuneConfig(data=real, base_model=tiny_model, out=run, frozen_text=True, steps=2, batch_size=2))
    small = dict(
        fid=False, fid_xrv=False, n_fid=4, diversity_prompts=1, sample_steps=2, ground_steps=4, ground_window=3
    )
    report(ReportConfig(runs=(run,), real=real, out=tmp_path / "report", **small), classifier=Brightness())
    text = (tmp_path / "report" / "report.md").read_text()
    assert "**Data: Open-i (IU X-ray)** (3 train, 3 test, 0 grounding rows)" in text
    assert "grounding: none: Open-i has no finding boxes" in text and "CNR not measured" in text
    assert not list((tmp_path / "report" / "runs").glob("*/ground*"))


def test_openi_user_reports_archive(tiny_model, tmp_path):
    """--reports takes the user's own archive (here one report with FINDINGS only: the paper's filter drops it)."""
    xml = tmp_path / "ecgen-radiology" / "1.xml"
    xml.parent.mkdir()
    xml.write_text('<eCitation><Abstract><AbstractText Label="FINDINGS">Clear lungs.</AbstractText></Abstract>'
                   '<parentImage id="CXR1_1_IM-0001-3001"/></eCitation>')  # fmt: skip
    with tarfile.open(tmp_path / "reports.tgz", "w:gz") as archive:
        archive.add(xml, arcname="ecgen-radiology/1.xml")
    images = tmp_path / "png"
    images.mkdir()
    Image.fromarray(grey((96, 96))).save(images / "CXR1_1_IM-0001-3001.png")
    out = tmp_path / "prepared"
    config = PrepareConfig(
        format="openi", images=images, reports=tmp_path / "reports.tgz", base_model=tiny_model, out=out
    )
    prepare(config)
    assert skipped(out)["reason"].tolist() == ["no impression"]
    prepare(PrepareConfig(**{**config.__dict__, "out": tmp_path / "fallback", "text_fallback": "findings"}))
    assert read(tmp_path / "fallback", "test")["impression"].tolist() + read(tmp_path / "fallback", "train-00000")[
        "impression"
    ].tolist() == ["Clear lungs."]


# --- nih ------------------------------------------------------------------------------------------


def test_nih_boxes_scale_from_1024_px_to_each_file_and_infiltrate_is_infiltration(tiny_model, tmp_path):
    """Synthetic files named as NIH's, at 1024, 512 and 300 px, with the shipped label table and a user BBox list."""
    images = tmp_path / "images"
    images.mkdir()
    sizes = {"00004296_000": 512, "00013125_000": 300, "00000001_000": 1024, "00000001_001": 256, "00000003_000": 256}
    for k, (name, size) in enumerate(sizes.items()):
        Image.fromarray(grey((size, size), k)).save(images / f"{name}.png")
    Image.fromarray(grey((64, 64))).save(images / "not_nih.png")
    boxes = tmp_path / "bbox.csv"
    boxes.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                     "00004296_000.png,Atelectasis,731.428571428571,753.100529100529,119.195767195767,93.189417989418\n"
                     "00013125_000.png,Infiltrate,100,200,300,400\n"
                     "00000003_000.png,Effusion,10,20,30,40\n"
                     "00099999_000.png,Mass,1,2,3,4\n")  # fmt: skip
    out = tmp_path / "prepared"
    prepare(PrepareConfig(format="nih", images=images, boxes=boxes, base_model=tiny_model, out=out))
    ms = read(out, "ms_cxr").set_index("dicom_id")
    assert (
        ms.loc["00013125_000", "category_name"] == "Infiltration"
        and ms.loc["00013125_000", "label_text"] == "Infiltration"
    )
    # NIH's "Effusion" is the paper's (and CheXpert's) class "Pleural Effusion"; the phrase keeps NIH's word
    assert ms.loc["00000003_000", ["category_name", "label_text"]].tolist() == ["Pleural Effusion", "Effusion"]
    assert manifest(out)["data_set"]["category_names"] == {"Effusion": "Pleural Effusion"}
    from cxrdiff.report.orchestrate import data_set_of

    assert data_set_of(out)["grounding_classes"] == {"Atelectasis": 1, "Infiltration": 1, "Pleural Effusion": 1}
    # 1024 px box → the file's pixels (× size / 1024) → the 64 px frame (× 64 / size): × 64 / 1024 in all
    assert ms.loc["00004296_000", "boxes"][0].tolist() == pytest.approx(
        [731.428571 / 16, 753.100529 / 16, 119.195767 / 16, 93.189418 / 16]
    )
    assert ms.loc["00013125_000", "boxes"][0].tolist() == pytest.approx([100 / 16, 200 / 16, 300 / 16, 400 / 16])
    rows = pd.concat([read(out, "test"), read(out, "train-00000")]).set_index("dicom_id")
    assert set(rows.index) == {"00000001_000", "00000001_001"}  # the boxed patients are out of both
    assert rows.loc["00000001_001", "impression"] == "Cardiomegaly Emphysema"  # the table's "Cardiomegaly|Emphysema"
    assert rows.loc["00000001_001", "study_id"] == 1001 and rows.loc["00000001_000", "study_id"] == 1000
    assert skipped(out)["reason"].tolist() == ["not in the table"]
    from cxrdiff.errors import InputError
    from cxrdiff.finetune import FinetuneConfig, check_inputs

    labels = FinetuneConfig(
        data=out, base_model=tiny_model, out=tmp_path / "run", frozen_text=True, prompt_source="labels"
    )
    with pytest.raises(
        InputError, match="--prompt-source labels: NIH ChestX-ray14's prepared text is already its labels"
    ):
        check_inputs(labels)


@needs_real_nih
def test_real_nih_labels_boxes_and_split(tiny_model, tmp_path):
    """The 61 real images (5 boxed; 3 at 1024 px, the rest at 256 px; 3 RGBA) against the shipped tables."""
    out = tmp_path / "prepared"
    result = prepare(PrepareConfig(format="nih", images=Path(REAL_NIH), base_model=tiny_model, out=out))
    assert (result["train_rows"], result["test_rows"], result["ms_cxr_rows"], result["skipped"]) == (45, 11, 5, 0)
    train, test, ms = read(out, "train-00000"), read(out, "test"), read(out, "ms_cxr").set_index("dicom_id")
    assert not set(train["subject_id"]) & set(test["subject_id"])
    assert not set(train["dicom_id"]) & set(BOXED) and not set(test["dicom_id"]) & set(BOXED)
    rows = pd.concat([train, test]).set_index("dicom_id")
    # Data_Entry_2017: 00000211_000 "Cardiomegaly", PA; 00004934_000 "No Finding" (an RGBA file)
    assert rows.loc["00000211_000", "impression"] == "Cardiomegaly" and rows.loc["00000211_000", "view"] == "PA"
    assert rows.loc["00004934_000", "impression"] == "No Finding" and rows.loc["00004934_000", "No Finding"] == 1.0
    assert rows.loc["00004934_000", "Cardiomegaly"] == 0.0 and np.isnan(rows.loc["00004934_000", "Lung Opacity"])
    assert set(ms.index) == set(BOXED)
    assert ms.loc["00004296_000", "category_name"] == "Atelectasis" and ms.loc["00015649_000", "label_text"] == "Mass"
    # BBox_List_2017: 00004296_000 Atelectasis at x 731.43 in 1024 px; the file is 256 px → x 182.86 there,
    # then × 64 / 256 in the prepared frame: 45.71. 00001369_000 (RGBA, kept at 1024 px): 337.0 → 337.0 × 64 / 1024
    assert ms.loc["00004296_000", "boxes"][0].tolist() == pytest.approx([45.714286, 47.068783, 7.449735, 5.824339])
    assert ms.loc["00001369_000", "boxes"][0].tolist() == pytest.approx([21.062434, 17.269841, 34.607407, 24.177778])
    counts = manifest(out)["counts"]
    assert (
        counts["table_rows"] == 112120
        and counts["boxes"]["table_boxes"] == 984
        and counts["views"] == {"AP": 7, "PA": 54}
    )


@needs_real_nih
@pytest.mark.slow
def test_real_nih_through_finetune_sample_ground_and_report(tiny_model, tmp_path):
    from cxrdiff.finetune import FinetuneConfig, finetune
    from cxrdiff.ground import GroundConfig, ground
    from cxrdiff.report import ReportConfig, report
    from cxrdiff.sample import SampleConfig, sample

    real = tmp_path / "prepared"
    prepare(PrepareConfig(format="nih", images=Path(REAL_NIH), base_model=tiny_model, out=real))
    run = tmp_path / "run"
    finetune(FinetuneConfig(data=real, base_model=tiny_model, out=run, frozen_text=True, steps=3, batch_size=4))
    samples = tmp_path / "samples"
    sample(SampleConfig(model=run, out=samples, prompts=real / "test.parquet", limit=3, steps=3))
    assert (
        pd.read_parquet(samples / "samples.parquet")["prompt"].tolist() == read(real, "test")["impression"][:3].tolist()
    )
    out = tmp_path / "ground"
    ground(GroundConfig(model=run, out=out, data=real / "ms_cxr.parquet", steps=4, window=3))
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 5 and scores[["auc_roc", "cnr"]].notna().all().all()
    from test_report import Brightness

    small = dict(
        fid=False, fid_xrv=False, n_fid=4, diversity_prompts=1, sample_steps=3, ground_steps=4, ground_window=3
    )
    report(ReportConfig(runs=(run,), real=real, out=tmp_path / "report", **small), classifier=Brightness())
    text = (tmp_path / "report" / "report.md").read_text()
    assert "**Data: NIH ChestX-ray14** (45 train, 11 test, 5 grounding rows); text: the image's finding labels" in text
    data_set = json.loads((tmp_path / "report" / "metrics.json").read_text())["data_set"]
    assert data_set["text_source"] == "labels"
    assert data_set["grounding_classes"] == {"Atelectasis": 1, "Cardiomegaly": 2, "Mass": 1, "Nodule": 1}
    table1 = text.split("### Localization on NIH ChestX-ray14 boxes")[1].split("###")[0]
    rows = [line.split(" | ")[0].strip("| ") for line in table1.splitlines() if line.startswith("| ")][1:]
    assert rows == ["Atelectasis", "Cardiomegaly", "Mass", "Nodule", "Average"], table1
    assert "| Mass | — | — | — |" in table1 and '"Effusion" is shown' not in table1  # no Effusion box here


def test_a_killed_public_prepare_resumes_to_the_same_output(tiny_model, tmp_path, monkeypatch):
    import cxrdiff.prepare.encode as module

    images, table, boxes = write_csv_set(tmp_path / "set")
    config = dict(format="csv", images=images, table=table, boxes=boxes, base_model=tiny_model, shard_size=2)
    prepare(PrepareConfig(**config, out=tmp_path / "whole"))
    real, calls = module.encode_batch, {"n": 0}

    def failing(vae, pixels):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("injected fault")
        return real(vae, pixels)

    out = tmp_path / "killed"
    monkeypatch.setattr(module, "encode_batch", failing)
    with pytest.raises(RuntimeError, match="injected"):
        prepare(PrepareConfig(**config, out=out))
    assert not (out / "manifest.json").exists() and 0 < len(list(out.glob("*.parquet"))) < 6
    monkeypatch.setattr(module, "encode_batch", real)
    prepare(PrepareConfig(**config, out=out))
    names = sorted(p.name for p in (tmp_path / "whole").glob("*.parquet"))
    assert names == sorted(p.name for p in out.glob("*.parquet")) and len(names) == 6  # test, ms_cxr, 4 shards of 2
    for name in names:
        pd.testing.assert_frame_equal(pd.read_parquet(out / name), pd.read_parquet(tmp_path / "whole" / name))
    assert manifest(out)["counts"] == manifest(tmp_path / "whole")["counts"]
    assert (out / "skipped.csv").read_text() == (tmp_path / "whole" / "skipped.csv").read_text()


def test_a_split_that_is_not_train_or_test_is_one_line_before_out_is_touched(tiny_model, tmp_path, capsys, monkeypatch):
    (tmp_path / "images").mkdir()
    Image.fromarray(grey((96, 96))).save(tmp_path / "images" / "a.png")
    table = tmp_path / "t.csv"
    table.write_text("image,text,split\na.png,Clear lungs.,val\n")
    argv = ["prepare", "--format", "csv", "--images", tmp_path / "images", "--table", table,
            "--base-model", tiny_model, "--out", tmp_path / "out"]  # fmt: skip
    code, err, _ = run_main(argv, capsys, monkeypatch)
    assert code == 2 and err == [f"error: {table}: column 'split' has 'val'; expected train, test or blank"]
    assert not (tmp_path / "out").exists()


def test_settings_keep_each_formats_own_fields_even_when_formats_share_them():
    from cxrdiff.config import settings

    nih, openi, mimic = (settings(PrepareConfig(format=name)) for name in ("nih", "openi", "mimic"))
    assert {"test_size", "test_fraction"} <= nih.keys() and not {"text_fallback", "coco_splits"} & nih.keys()
    assert {"test_size", "test_fraction", "text_fallback"} <= openi.keys()
    assert {"test_size", "text_fallback"} <= mimic.keys() and "test_fraction" not in mimic


def test_a_folder_that_records_no_data_set_is_named_by_its_layout(tmp_path):
    """MIMIC's prepare (and the phantom's) record no `data_set`: the report says MIMIC-CXR's layout and impressions."""
    from cxrdiff.artifacts import write_manifest
    from cxrdiff.report.orchestrate import data_set_of
    from cxrdiff.report.page import data_set_lines

    counts = {"train": {"rows": 1200}, "test": {"rows": 3}, "ms_cxr": {"rows": 2}}
    write_manifest(tmp_path, "prepare", extra={"counts": counts})
    assert data_set_lines({"data_set": data_set_of(tmp_path)}) == [
        "**Data: MIMIC-CXR layout** (1,200 train, 3 test, 2 grounding rows); text: the impressions."
    ]


@pytest.mark.parametrize(
    ("fmt", "option", "readers"),
    [
        ("nih", ["--text-fallback", "findings"], "--text-fallback is for --format mimic or openi"),
        ("csv", ["--text-fallback", "findings"], "--text-fallback is for --format mimic or openi"),
        ("csv", ["--dicom-contrast", "window"], "--dicom-contrast is for --format mimic"),
        ("openi", ["--boxes", "b.csv"], "--boxes is for --format nih or csv"),
        ("nih", ["--coco-splits", "a,b"], "--coco-splits is for --format coco"),
        ("nih", ["--mimic", "m"], "--mimic is for --format mimic"),
    ],
)
def test_an_option_the_format_does_not_read_is_one_line_and_exit_2(
    fmt, option, readers, tiny_model, tmp_path, capsys, monkeypatch
):
    (tmp_path / "images").mkdir()
    table = tmp_path / "t.csv"
    table.write_text("image,text\na.png,hello\n")
    argv = ["prepare", "--format", fmt, "--images", tmp_path / "images", "--table", table,
            "--base-model", tiny_model, "--out", tmp_path / "out", *option]  # fmt: skip
    code, err, _ = run_main(argv, capsys, monkeypatch)
    assert code == 2 and err == [f"error: {readers}, not --format {fmt}"], err
    assert not (tmp_path / "out").exists()


def test_an_option_a_format_does_not_read_is_refused_from_python_too(tmp_path):
    from cxrdiff.errors import InputError
    from cxrdiff.prepare import check_inputs

    with pytest.raises(
        InputError, match="^--test-size is for --format mimic or nih or openi or csv, not --format coco$"
    ):
        check_inputs(PrepareConfig(format="coco", coco=tmp_path, base_model=tmp_path, out=tmp_path / "o", test_size=9))


def test_a_repeated_row_is_dropped_and_a_clashing_one_refused_in_every_public_table(tiny_model, tmp_path, capsys,
                                                                                   monkeypatch):  # fmt: skip
    """cxrdiff.data.drop_duplicate_rows on the CSV table and the boxes: a row repeated whole is listed in
    skipped.csv with both file lines; two rows of one image that differ are one line, exit 2."""
    images = tmp_path / "images"
    images.mkdir()
    for k, name in enumerate(("a.png", "b.png", "c.png")):
        Image.fromarray(grey((96, 96), k)).save(images / name)
    table, boxes = tmp_path / "t.csv", tmp_path / "b.csv"
    table.write_text("image,text\na.png,Clear.\nb.png,Effusion.\na.png,Clear.\nc.png,Edema.\n")
    boxes.write_text("image,phrase,x,y,w,h\nb.png,effusion,1,2,30,40\nb.png,effusion,1,2,30,40\n")
    out = tmp_path / "out"
    prepare(PrepareConfig(format="csv", images=images, table=table, boxes=boxes, base_model=tiny_model, out=out))
    why = skipped(out)
    assert why[["part", "dicom_id", "reason", "detail"]].values.tolist() == [
        ["table", "a.png", "duplicate row", "line 4 repeats line 2"],
        ["ms_cxr", "b.png", "duplicate row", "line 3 repeats line 2"],
    ]
    assert len(read(out, "ms_cxr")["boxes"][0]) == 1 and manifest(out)["counts"]["duplicate_rows"] == 1
    table.write_text("image,text\na.png,Clear.\nb.png,Effusion.\na.png,Cardiomegaly.\n")
    argv = ["prepare", "--format", "csv", "--images", images, "--table", table,
            "--base-model", tiny_model, "--out", tmp_path / "other"]  # fmt: skip
    code, err, _ = run_main(argv, capsys, monkeypatch)
    assert (
        code == 2 and len(err) == 1 and str(table) in err[0] and "lines 2 and 4 share image a.png but differ" in err[0]
    ), err
    assert not (tmp_path / "other").exists()


def nih_metrics() -> dict:
    """A report's metrics on an NIH grounding set: Atelectasis, Pleural Effusion (NIH's "Effusion"), Mass."""

    def cell(cnr: float) -> dict:
        return {"auc_roc": {"mean": 0.6}, "top1": {"mean": 0.2}, "cnr": {"mean": cnr}}

    classes = {"Atelectasis": cell(0.5), "Pleural Effusion": cell(0.25), "Mass": cell(1.5)}
    grounding = {"classes": classes, "average": cell(0.75)}
    aucs = {"Cardiomegaly": {"name": "AUC", "value": 0.7, "protocol": {"positives": 5, "negatives": 6}}}
    return {
        "runs": {"frozen": {"grounding": grounding, "classifier": aucs}},
        "data_set": {
            "name": "NIH ChestX-ray14",
            "format": "nih",
            "grounding_classes": {"Atelectasis": 1, "Mass": 2, "Pleural Effusion": 2},
            "category_names": {"Effusion": "Pleural Effusion"},
        },
    }


def test_the_report_shows_the_grounding_sets_classes_with_the_papers_cells_only_where_it_has_them():
    from cxrdiff.report.render import cnr_by_class_figure, tables

    found = {t.title.split(":")[0]: t for t in tables(nih_metrics())}
    table1 = found["Localization on NIH ChestX-ray14 boxes"]
    assert [row[0] for row in table1.rows] == ["Atelectasis", "Pleural Effusion", "Mass", "Average"]
    assert table1.rows[0][1:4] == [
        "58.5 / 0 / 0.23",
        "45 ± 4.9 / 2 ± 1.6 / -0.15 ± 0.13",
        "86 ± 0.9 / 80 ± 3.3 / 1.25 ± 0.06",
    ]
    assert table1.rows[2][1:4] == ["—", "—", "—"] and table1.rows[2][4] == "60.0 / 20.0 / 1.50"
    assert 'NIH ChestX-ray14\'s "Effusion" is shown as the paper\'s "Pleural Effusion".' in table1.note
    assert "Mass are not MS-CXR classes" in table1.note
    table3 = found["CNR against published phrase-grounding methods"]
    assert [row[0] for row in table3.rows] == ["Atelectasis", "Pleural Effusion", "Mass", "Average"]
    assert set(table3.rows[2][1:-1]) == {"—"} and table3.rows[2][-1] == "1.50"
    words = found["Word analysis (Table 6 and this report)"]
    assert {row[1] for row in words.rows} >= {"Atelectasis", "Pleural Effusion"} and "Cardiomegaly" not in {
        row[1] for row in words.rows
    }
    classifier = found["Classifier AUC %"]
    assert "Not in this check: Mass (NIH ChestX-ray14 boxes)" in classifier.note
    assert "No test image counts for Atelectasis, Consolidation, Lung Opacity" in classifier.note
    _, caption = cnr_by_class_figure(nih_metrics())
    assert "Mass are not MS-CXR classes" in caption


def test_a_report_without_a_recorded_grounding_set_keeps_ms_cxrs_eight_classes():
    from cxrdiff.data import MS_CXR_CATEGORIES
    from cxrdiff.report.render import tables

    metrics = nih_metrics()
    del metrics["data_set"]
    table1 = next(t for t in tables(metrics) if t.title.startswith("Localization on MS-CXR"))
    assert [row[0] for row in table1.rows] == [*MS_CXR_CATEGORIES, "Average"] and "Classes:" not in table1.note
