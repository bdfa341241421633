"""`cxrdiff prepare` on a small hand-made MIMIC-CXR-shaped tree whose every filter outcome is known:
counts, held-out sets, boxes on the drawn finding, latents against a fresh encode, resume after a fault,
and structural errors before any work."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrdiff.artifacts import CLAIM
from cxrdiff.data import LABELS, latent_from_bytes, patient_folder
from cxrdiff.errors import InputError, RunError
from cxrdiff.images import boxes_mask, equalize_histogram, load_grayscale, resize_center_crop, to_model_input
from cxrdiff.prepare import PrepareConfig, prepare

WIDTH, HEIGHT = 80, 96  # not square: the centre crop matters
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough

 FINDINGS:
 {findings}

 IMPRESSION:
 {impression}
"""
# dicom_id: (subject, study, view, labels set to 1.0, what the report / image is)
IMAGES = {
    "a1": (10000001, 50000001, "PA", ["No Finding"], "ok"),
    "a2": (10000001, 50000001, "LATERAL", ["No Finding"], "ok"),
    "a3": (10000001, 50000002, "AP", ["Edema"], "empty report"),
    "b1": (10000002, 50000003, "PA", ["Cardiomegaly"], "findings only"),
    "c1": (11000003, 50000004, "PA", ["Edema"], "no report"),
    "d1": (11000004, 50000005, "PA", ["No Finding"], "short impression"),
    "e1": (11000005, 50000006, "PA", ["Atelectasis"], "truncated image"),
    "f1": (11000006, 50000007, "PA", ["Atelectasis"], "no image"),
    "g1": (11000007, 50000008, "AP", ["Pneumothorax"], "dicom"),
    "h1": (12000008, 50000009, "PA", ["Pleural Effusion"], "ms-cxr"),
    "h2": (12000008, 50000010, "PA", ["No Finding"], "ok"),
    "t1": (19000009, 50000011, "PA", ["No Finding"], "ok"),
    "t2": (19000009, 50000011, "AP", ["No Finding"], "ok"),
    "t3": (19000009, 50000012, "AP", ["Cardiomegaly"], "ok"),
    "t4": (19000010, 50000013, "PA", ["Edema"], "ok"),
    "t5": (19000010, 50000014, "PA", ["No Finding"], "ok"),
}
EFFUSION_BOXES = [(8, 50, 20, 30), (50, 60, 16, 20)]  # drawn bright on h1
MS_CXR = [
    ("h1", "Pleural Effusion", "Small left   pleural effusion", EFFUSION_BOXES[0]),
    ("h1", "Pleural Effusion", "Small left   pleural effusion", EFFUSION_BOXES[1]),
    ("h1", "Cardiomegaly", "Enlarged heart", (20, 20, 40, 40)),
    ("h1", "Edema", "Edema", (70, 80, 20, 30)),  # runs past the 80 px width: skipped
]


def _image(rng, boxes=()) -> np.ndarray:
    image = rng.integers(20, 60, size=(HEIGHT, WIDTH), dtype=np.uint8)
    for x, y, w, h in boxes:
        image[y : y + h, x : x + w] = 240
    return image


def _write_dicom(path: Path, image: np.ndarray) -> None:
    """A MONOCHROME1 12-bit DICOM whose inversion and scaling give back `image` (up to rounding)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME1"
    values = (255 - image.astype(np.uint16)) * 16  # MONOCHROME1: high = dark
    ds.PixelData = values.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_tree(root: Path, seed: int = 0) -> Path:
    """The tree above, with gzipped metadata and CheXpert CSVs and a plain split CSV."""
    rng = np.random.default_rng(seed)
    files = root / "files"
    meta, labels, split = [], {}, []
    for dicom, (subject, study, view, positives, kind) in IMAGES.items():
        folder = files / patient_folder(subject) / f"p{subject}"
        (folder / f"s{study}").mkdir(parents=True, exist_ok=True)
        meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view,
                     "Rows": HEIGHT, "Columns": WIDTH})  # fmt: skip
        split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": "train"})
        labels.setdefault((subject, study), {name: (1.0 if name in positives else np.nan) for name in LABELS})
        image = _image(rng, EFFUSION_BOXES if kind == "ms-cxr" else ())
        jpg = folder / f"s{study}" / f"{dicom}.jpg"
        if kind == "dicom":
            _write_dicom(jpg.with_suffix(".dcm"), image)
        elif kind == "truncated image":
            Image.fromarray(image).save(jpg, quality=95)
            jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
        elif kind != "no image":
            Image.fromarray(image).save(jpg, quality=95)
        report = folder / f"s{study}.txt"
        if kind == "no report" or report.exists():
            continue
        if kind == "empty report":
            report.write_text("   \n\n")
        elif kind == "findings only":
            report.write_text(" FINAL REPORT\n FINDINGS:  Heart size is enlarged.  No effusion.\n")
        elif kind == "short impression":
            report.write_text(REPORT.format(findings="Normal.", impression="None."))
        else:
            text = f"{', '.join(positives).lower()} seen on study {study}."
            report.write_text(REPORT.format(findings="Lungs are clear.", impression=text))
    with gzip.open(root / "mimic-cxr-2.0.0-metadata.csv.gz", "wt") as handle:
        pd.DataFrame(meta).to_csv(handle, index=False)
    chexpert = pd.DataFrame([{"subject_id": s, "study_id": t, **v} for (s, t), v in labels.items()])
    with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt") as handle:
        chexpert.to_csv(handle, index=False)
    pd.DataFrame(split).to_csv(root / "mimic-cxr-2.0.0-split.csv", index=False)
    ms = [
        {"dicom_id": d, "category_name": c, "label_text": t, "path": f"files/p12/p12000008/s50000009/{d}.jpg",
         "x": b[0], "y": b[1], "w": b[2], "h": b[3], "image_width": WIDTH, "image_height": HEIGHT}
        for d, c, t, b in MS_CXR
    ]  # fmt: skip
    pd.DataFrame(ms).to_csv(root / "MS_CXR_Local_Alignment_v1.0.0.csv", index=False)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("mimic"))


def _config(tree, model, out, **overrides) -> PrepareConfig:
    base = dict(mimic=tree, ms_cxr=tree / "MS_CXR_Local_Alignment_v1.0.0.csv", base_model=model, out=out,
                test_size=3, test_no_finding_max=0.34, batch_size=2, shard_size=2, workers=0)  # fmt: skip
    return PrepareConfig(**(base | overrides))


@pytest.fixture(scope="module")
def prepared(tree, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "out"
    result = prepare(_config(tree, tiny_model, out))
    return out, result


def _train(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(out.glob("train-*.parquet"))], ignore_index=True)


def test_counts_at_every_filter(prepared):
    out, result = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["metadata"]["images"] == 16 and counts["metadata"]["frontal_images"] == 15
    assert counts["metadata"]["views"] == {"AP": 4, "LATERAL": 1, "PA": 11}
    # impressions only (the paper's): the findings-only report b1 and the empty a3 are counted and listed
    text_and_file_counts = {k: v for k, v in counts["train"].items() if "image" not in k or k == "frontal_images"}
    assert text_and_file_counts == {
        "frontal_images": 15, "held_out_test_folder": 5, "held_out_ms_cxr": 1, "candidates": 9,
        "missing_report": 1, "unreadable_report": 0, "no_impression": 2, "no_usable_text": 0, "short_impression": 1,
        "planned": 4, "rows": 3,
    }  # fmt: skip
    assert counts["train"]["image_not_found"] == 1
    assert (counts["train"]["image_skipped"], counts["train"]["image_skip_reasons"]) == (1, {"unreadable image": 1})
    assert counts["test"]["studies"] == 4 and counts["test"]["rows"] == 3
    assert counts["ms_cxr"] == {"csv_rows": 4, "pairs": 3, "box_outside_image": 1, "not_in_metadata": 0,
                                "image_not_found": 0, "planned": 2, "image_skipped": 0, "image_skip_reasons": {},
                                "rows": 2}  # fmt: skip
    assert (result["train_rows"], result["test_rows"], result["ms_cxr_rows"]) == (3, 3, 2)
    assert manifest["impression_sources"]["train"] == {"impression": 4, "findings": 0, "last_paragraph": 0, "none": 0}
    assert manifest["prompts_over_context"] == {"train": 0, "test": 0, "context_length": 77}
    assert manifest["resolution"] == 64 and manifest["latent_shape"] == [4, 16, 16]
    assert manifest["latent_storage"] == "mean+logvar" and manifest["scaling_factor"] == pytest.approx(0.18215)
    assert manifest["vae_fingerprint"].startswith("sha256+weights:") and manifest["config"]["resolution"] == 64
    shards = [f"train-{k:05d}.parquet" for k in range(2)]  # 4 planned rows in shards of 2
    assert manifest["shards"] == shards and result["train_shards"] == 2
    assert set(manifest["files"]) == {*shards, "test.parquet", "ms_cxr.parquet", "skipped.csv"}


def test_skipped_csv_names_each_fault(prepared):
    out, _ = prepared
    skipped = pd.read_csv(out / "skipped.csv", dtype={"dicom_id": str})
    reasons = dict(zip(skipped["dicom_id"], skipped["reason"], strict=True))
    faults = {"c1": "missing report", "f1": "image not found", "e1": "unreadable image", "h1": "box outside image"}
    assert {k: v for k, v in reasons.items() if "impression" not in v} == faults
    # the paper's text filters are listed too: every planned image that did not become a row has its line
    dropped = {k for k, v in reasons.items() if "impression" in v}
    assert len(dropped) == 3 and {reasons[k] for k in dropped} == {"no impression", "short impression"}
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["counts"]["train"]
    assert (skipped["part"] == "train").sum() == train["candidates"] - train["rows"]
    e1 = skipped[skipped["dicom_id"] == "e1"].iloc[0]
    assert e1["path"].endswith("e1.jpg") and "e1.jpg" in e1["detail"]
    f1 = skipped[skipped["dicom_id"] == "f1"].iloc[0]
    assert f1["path"].endswith("files/p11/p11000006/s50000007/f1.jpg") and f1["part"] == "train"


def test_train_holds_no_test_folder_or_ms_cxr_image(prepared):
    out, _ = prepared
    train = _train(out)
    assert sorted(train["dicom_id"]) == ["a1", "g1", "h2"]  # b1 has FINDINGS only
    assert not train["subject_id"].map(patient_folder).eq("p19").any()
    ms_ids = set(pd.read_parquet(out / "ms_cxr.parquet")["dicom_id"])
    assert ms_ids == {"h1"} and not ms_ids & set(train["dicom_id"])
    assert set(train["impression_source"]) == {"impression"}
    assert train.loc[train["dicom_id"] == "g1", "image_path"].item().endswith("g1.dcm")
    assert train["Edema"].dtype == np.float32 and np.isnan(train.loc[train["dicom_id"] == "a1", "Edema"].item())
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in train["image_path"])


def test_test_set_limits_no_finding_and_records_the_rule(prepared):
    out, _ = prepared
    test = pd.read_parquet(out / "test.parquet")
    assert len(test) == 3 and set(test["subject_id"].map(patient_folder)) == {"p19"}
    assert (test["No Finding"] == 1.0).sum() == 1
    assert "t2" not in set(test["dicom_id"])  # one image per study, PA before AP
    rule = json.loads((out / "manifest.json").read_text())["test_sampling"]
    assert rule["before"]["No Finding"] == 2 and rule["before"]["studies"] == 4
    assert rule["after"]["No Finding"] == 1 and rule["after"]["studies"] == 3


def test_ms_cxr_boxes_land_on_the_drawn_finding(prepared, tree):
    out, _ = prepared
    ms = pd.read_parquet(out / "ms_cxr.parquet").set_index("category_name")
    effusion = ms.loc["Pleural Effusion"]
    assert effusion["label_text"] == "Small left pleural effusion"
    assert [list(b) for b in effusion["boxes_original"]] == [list(map(float, b)) for b in EFFUSION_BOXES]
    assert (effusion["image_width"], effusion["image_height"]) == (WIDTH, HEIGHT)
    frame = resize_center_crop(load_grayscale(effusion["image_path"]), 64)
    mask = boxes_mask([list(b) for b in effusion["boxes"]], 64)
    assert frame[mask].mean() > 200 and frame[~mask].mean() < 90
    # by hand: scale 64/80 = 0.8, height 96 → 77 (rounded), crop top (77 - 64) // 2 = 6
    assert list(effusion["boxes"][0]) == pytest.approx([8 * 0.8, 50 * 0.8 - 6, 20 * 0.8, 30 * 0.8])


def test_stored_latents_equal_a_fresh_encode(prepared, tiny_model):
    import torch
    from diffusers import AutoencoderKL

    out, _ = prepared
    vae = AutoencoderKL.from_pretrained(tiny_model / "vae").eval()
    for table in (_train(out), pd.read_parquet(out / "ms_cxr.parquet")):
        row = table.iloc[-1]
        pixels = to_model_input(resize_center_crop(load_grayscale(row["image_path"]), 64))  # (1, 3, 64, 64)
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
        shape = row["latent_shape"]
        assert list(shape) == [4, 16, 16]
        np.testing.assert_allclose(latent_from_bytes(row["latent_mean"], shape), posterior.mean[0].numpy(),
                                   rtol=2e-3, atol=2e-3)  # fmt: skip
        np.testing.assert_allclose(latent_from_bytes(row["latent_logvar"], shape), posterior.logvar[0].numpy(),
                                   rtol=2e-3, atol=2e-3)  # fmt: skip


def test_dicom_is_inverted_and_scaled_like_the_jpg(tmp_path):
    image = _image(np.random.default_rng(1), EFFUSION_BOXES)
    _write_dicom(tmp_path / "x.dcm", image)
    loaded = load_grayscale(tmp_path / "x.dcm", "window")
    expected = (image.astype(float) - image.min()) / (image.max() - image.min()) * 255
    assert np.abs(loaded.astype(float) - expected).max() <= 1.0
    # MIMIC-CXR-JPG's conversion (the default): fewer than 256 levels stay distinct and in order through the
    # min-max and the inversion, so the result is the equalised image itself
    assert np.array_equal(load_grayscale(tmp_path / "x.dcm"), equalize_histogram(image))


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    names = sorted(p.name for p in out.glob("*.parquet")) + ["skipped.csv"]
    return {n: pd.read_parquet(out / n) if n.endswith(".parquet") else pd.read_csv(out / n) for n in names}


def test_killed_run_resumes_to_the_same_output(prepared, tree, tiny_model, tmp_path, monkeypatch):
    import cxrdiff.prepare.encode as module

    real, calls = module.encode_batch, {"n": 0}

    def failing(vae, pixels):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("injected fault")
        return real(vae, pixels)

    out = tmp_path / "out"
    monkeypatch.setattr(module, "encode_batch", failing)
    with pytest.raises(RuntimeError, match="injected"):
        prepare(_config(tree, tiny_model, out))
    assert not (out / "manifest.json").exists()
    complete = sorted(p.name for p in out.glob("*.parquet"))
    assert complete and len(complete) < 4  # some units done, not all
    monkeypatch.setattr(module, "encode_batch", real)
    calls["n"] = 0
    prepare(_config(tree, tiny_model, out))
    expected, got = _tables(prepared[0]), _tables(out)
    assert expected.keys() == got.keys()
    for name in expected:
        pd.testing.assert_frame_equal(got[name], expected[name])
    first = json.loads((prepared[0] / "manifest.json").read_text())
    again = json.loads((out / "manifest.json").read_text())
    assert first["counts"] == again["counts"] and first["files"] == again["files"]


def test_text_fallback_restores_findings_and_last_paragraph(tree, tiny_model, tmp_path):
    """`--text-fallback findings,last-paragraph`: the findings-only report b1 is kept with its source; the
    empty report a3 has no text at all and is listed; every kept row records where its text came from."""
    out = tmp_path / "out"
    prepare(_config(tree, tiny_model, out, text_fallback="findings,last-paragraph"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"]["no_impression"] == 0 and manifest["counts"]["train"]["no_usable_text"] == 1
    assert manifest["impression_sources"]["train"] == {"impression": 4, "findings": 1, "last_paragraph": 0, "none": 0}
    assert manifest["settings"]["text_fallback"] == "findings,last-paragraph"
    train = _train(out)
    assert train.loc[train["dicom_id"] == "b1", "impression_source"].item() == "findings"
    assert train.loc[train["dicom_id"] == "b1", "impression"].item() == "Heart size is enlarged. No effusion."
    assert train["impression_source"].notna().all() and set(train["impression_source"]) == {"impression", "findings"}
    skipped = pd.read_csv(out / "skipped.csv", dtype={"dicom_id": str})
    assert skipped.loc[skipped["dicom_id"] == "a3", "reason"].item() == "no usable text"


def test_text_fallback_choice_maps_to_the_parsers_sources():
    from cxrdiff.prepare import text_fallbacks

    assert text_fallbacks("none") == ()
    assert text_fallbacks("last-paragraph") == ("last_paragraph",)
    assert text_fallbacks("findings,last-paragraph") == ("findings", "last_paragraph")


def test_stricter_exclusion_drops_the_whole_ms_cxr_patient(tree, tiny_model, tmp_path):
    result = prepare(_config(tree, tiny_model, tmp_path / "out", exclude_ms_cxr_patients=True, test_size=1))
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]
    assert counts["train"]["held_out_ms_cxr"] == 2 and result["train_rows"] == 2
    assert "h2" not in set(_train(tmp_path / "out")["dicom_id"])


def test_structural_faults_stop_before_any_work(tree, tiny_model, tmp_path):
    broken = tmp_path / "mimic"
    (broken / "files" / "p10").mkdir(parents=True)
    for name in ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-chexpert.csv.gz"):
        (broken / name).write_bytes((tree / name).read_bytes())
    pd.read_csv(tree / "mimic-cxr-2.0.0-split.csv").drop(columns="split").to_csv(
        broken / "mimic-cxr-2.0.0-split.csv", index=False
    )
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"mimic-cxr-2.0.0-split.csv: missing column\(s\) 'split'"):
        prepare(_config(broken, tiny_model, out, reports=tree))
    assert not out.exists()
    with pytest.raises(InputError, match="--ms-cxr is required"):
        prepare(_config(tree, tiny_model, out, ms_cxr=None))
    with pytest.raises(InputError, match="no mimic-cxr-2.0.0-chexpert"):
        (broken / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
        prepare(_config(broken, tiny_model, out, reports=tree))
    with pytest.raises(InputError, match="--reports .*: no report files"):
        prepare(_config(tree, tiny_model, out, reports=tmp_path))
    with pytest.raises(InputError, match="--resolution 30: must be a positive multiple"):
        prepare(_config(tree, tiny_model, out, resolution=30))
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"step": "finetune"}))
    with pytest.raises(InputError, match="this is a 'finetune' folder"):
        prepare(_config(tree, tiny_model, other))


def test_changed_settings_on_a_used_folder_are_refused(prepared, tree, tiny_model):
    out, _ = prepared
    with pytest.raises(InputError, match=r"finished 'prepare' run made with other settings \(test_size 3 → 2\)"):
        prepare(_config(tree, tiny_model, out, test_size=2))


def test_a_base_model_with_other_vae_weights_is_not_already_prepared(prepared, tree, tiny_model, tmp_path):
    """Same configs, same file sizes, other VAE weights: prepare does not call the folder finished, and
    finetune does not train on its latents."""
    import shutil

    from cxrdiff.artifacts import OtherSettings
    from cxrdiff.finetune.inputs import check_prepared
    from cxrdiff.model.tiny import tiny_components
    from cxrdiff.prepare.mimic import check_mimic_inputs

    out, _ = prepared
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    tiny_components(seed=1).vae.save_pretrained(model / "vae")
    with pytest.raises(OtherSettings, match=r"finished 'prepare' run made with other settings \(vae 'sha256\+weights:"):
        check_mimic_inputs(_config(tree, model, out))
    with pytest.raises(InputError, match="latents were made by a different VAE"):
        check_prepared(out, model)
    assert check_prepared(out, tiny_model)["step"] == "prepare"


def test_a_folder_prepared_before_fingerprints_covered_the_weights(prepared, tree, tiny_model, tmp_path, caplog):
    """Its recorded fingerprint (config, names, sizes) is named as such by prepare, and still compared by
    finetune, which warns that the weights are unverified."""
    import shutil

    from cxrdiff.artifacts import OtherSettings, settings_key
    from cxrdiff.finetune.inputs import check_prepared
    from cxrdiff.models import names_and_sizes_fingerprint

    old = tmp_path / "old"
    shutil.copytree(prepared[0], old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["settings"]["vae"] = manifest["vae_fingerprint"] = names_and_sizes_fingerprint(tiny_model)
    manifest["settings_key"] = settings_key(manifest["settings"])
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OtherSettings, match=r"its VAE fingerprint covers file names and sizes, not the VAE's weights"):
        prepare(_config(tree, tiny_model, old))
    check_prepared(old, tiny_model)
    assert "cannot verify that its latents came from" in caplog.text and "VAE weights" in caplog.text
    manifest["vae_fingerprint"] = "sha256:" + "0" * 64
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="latents were made by a different VAE"):
        check_prepared(old, tiny_model)


def test_ids_that_are_paths_are_refused_before_any_file_is_read(tree, tiny_model, tmp_path):
    """An id is joined into a path (files/pXX/pN/sN/<dicom_id>.jpg): '../' in one would read (and encode)
    an image outside the data folder. Each table is checked as it is read, one line naming file, column
    and value."""
    import shutil

    from cxrdiff.artifacts import CLAIM

    escape = "../../../../../outside/x"  # from files/p12/p12000008/s50000009/: beside the data folder
    ms = pd.read_csv(tree / "MS_CXR_Local_Alignment_v1.0.0.csv")
    ms.loc[0, "dicom_id"] = escape
    bad_ms = tmp_path / "ms.csv"
    ms.to_csv(bad_ms, index=False)
    line = (
        f"{bad_ms}: column 'dicom_id' has {escape!r}, not an image id (letters, digits, '-' and '_', such as "
        "MIMIC's five groups of 8 hex digits)"
    )
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "cxrdiff", "prepare", "--mimic", str(tree), "--ms-cxr", str(bad_ms),
         "--base-model", str(tiny_model), "--out", str(out), "--workers", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and run.stderr == f"error: {line}\n"
    with pytest.raises(InputError) as refused:
        prepare(_config(tree, tiny_model, out, ms_cxr=bad_ms))
    assert str(refused.value) == line
    assert [p.name for p in out.iterdir()] == [CLAIM]  # the tables are read once claimed; nothing else written

    copy = tmp_path / "mimic"
    shutil.copytree(tree, copy)
    metadata = copy / "mimic-cxr-2.0.0-metadata.csv.gz"
    table = pd.read_csv(metadata, dtype={"dicom_id": str})
    for column, value, kind in (("dicom_id", "a1/../../b1", "an image id"), ("subject_id", "p1000/1", "an id")):
        changed = table.astype({column: object})
        changed.loc[0, column] = value
        changed.to_csv(metadata, index=False)
        with pytest.raises(InputError, match=rf"^{metadata}: column '{column}' has '{value}', not {kind} "):
            prepare(_config(copy, tiny_model, out, reports=tree))
        assert [p.name for p in out.iterdir()] == [CLAIM]


def test_cli_exit_code_and_message_for_a_missing_column(tree, tiny_model, tmp_path):
    bad = tmp_path / "ms.csv"
    pd.read_csv(tree / "MS_CXR_Local_Alignment_v1.0.0.csv").drop(columns="image_width").to_csv(bad, index=False)
    run = subprocess.run(
        [sys.executable, "-m", "cxrdiff", "prepare", "--mimic", str(tree), "--ms-cxr", str(bad),
         "--base-model", str(tiny_model), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert f"{bad}: missing column(s) 'image_width'" in run.stderr


@pytest.mark.slow
def test_two_processes_under_accelerate_give_the_same_output(prepared, tree, tiny_model, tmp_path):
    """Each process encodes its contiguous share of a unit; the joined units equal the one-process run
    (latents up to float16 rounding: a different batch composition may move the last bit)."""
    out = tmp_path / "out"
    run = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cxrdiff", "-q",
         "prepare", "--mimic", str(tree), "--ms-cxr", str(tree / "MS_CXR_Local_Alignment_v1.0.0.csv"),
         "--base-model", str(tiny_model), "--out", str(out), "--test-size", "3", "--test-no-finding-max", "0.34",
         "--batch-size", "2", "--shard-size", "2", "--workers", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    expected, got = _tables(prepared[0]), _tables(out)
    assert expected.keys() == got.keys()
    for name, table in expected.items():
        latents = [c for c in ("latent_mean", "latent_logvar") if c in table.columns]
        pd.testing.assert_frame_equal(got[name].drop(columns=latents), table.drop(columns=latents))
        for column in latents:
            for a, b, shape in zip(got[name][column], table[column], table["latent_shape"], strict=True):
                np.testing.assert_allclose(latent_from_bytes(a, shape), latent_from_bytes(b, shape), atol=2e-3)
    assert not list((out / ".prepare").glob("*.part-*"))  # parts joined and removed


# --- end to end on the phantom ------------------------------------------------------------------


def _phantom_plan(tree: Path) -> tuple[dict, list[dict]]:
    """What the generator put in: its manifest and, re-derived from the same seed, every study with its case."""
    from cxrdiff import phantom

    manifest = json.loads((tree / "manifest.json").read_text())
    c = manifest["config"]
    studies, _ = phantom.plan_studies(c["patients"], c["seed"], c["size"], c["dicom_fraction"])
    return manifest, studies


@pytest.mark.slow
def test_phantom_counts_match_what_the_generator_put_in(phantom_tree, phantom_prepared):
    manifest, studies = _phantom_plan(phantom_tree)
    put = manifest["counts"]
    prepared = json.loads((phantom_prepared / "manifest.json").read_text())
    got = prepared["counts"]
    assert got["metadata"]["images"] == put["images_total"] and got["metadata"]["studies"] == put["studies"]
    assert got["metadata"]["views"] == {v: n for v, n in put["images"].items() if n}
    assert got["metadata"]["frontal_images"] == put["images"]["PA"] + put["images"]["AP"]
    ms_ids = set(pd.read_csv(phantom_tree / "MS_CXR_Local_Alignment_v1.0.0.csv")["dicom_id"])
    frontal = [(s, im) for s in studies for im in s["images"] if im["view"] != "LATERAL"]
    in_p19 = [(s, im) for s, im in frontal if patient_folder(s["subject_id"]) == "p19"]
    train = [(s, im) for s, im in frontal if patient_folder(s["subject_id"]) != "p19" and im["dicom_id"] not in ms_ids]
    short = sum(s["case"] == "short_impression" for s, _ in train)
    no_impression = sum(s["case"] == "no_impression" for s, _ in train)
    assert (got["train"]["held_out_test_folder"], got["train"]["held_out_ms_cxr"]) == (
        len(in_p19),
        put["ms_cxr"]["images_total"],
    )
    assert got["train"]["candidates"] == len(train) and got["train"]["short_impression"] == short
    for fault in ("missing_report", "no_usable_text", "image_not_found", "image_skipped"):
        assert got["train"][fault] == 0
    assert got["train"]["rows"] == len(train) - short - no_impression  # impressions only, as the paper
    assert got["train"]["no_impression"] == no_impression
    assert prepared["impression_sources"]["train"] == {
        "impression": len(train) - short - no_impression,
        "findings": 0,
        "last_paragraph": 0,
        "none": 0,
    }
    p19_studies = [s for s in studies if patient_folder(s["subject_id"]) == "p19"]
    assert got["test"]["studies"] == put["studies_p19"] == len(p19_studies)
    usable = sum(s["case"] not in ("short_impression", "no_impression") for s in p19_studies)  # impressions only
    assert got["test"]["usable_studies"] == usable and got["test"]["rows"] == min(8, usable)
    pairs = {(d, c) for d, c in pd.read_csv(phantom_tree / "MS_CXR_Local_Alignment_v1.0.0.csv")[
        ["dicom_id", "category_name"]].itertuples(index=False)}  # fmt: skip
    assert got["ms_cxr"]["csv_rows"] == sum(put["ms_cxr"]["rows"].values())
    assert got["ms_cxr"]["pairs"] == got["ms_cxr"]["rows"] == len(pairs) and got["ms_cxr"]["box_outside_image"] == 0


@pytest.mark.slow
def test_phantom_train_shards_hold_no_p19_or_ms_cxr_image_and_the_study_labels(phantom_tree, phantom_prepared):
    train = _train(phantom_prepared)
    ms_ids = set(pd.read_csv(phantom_tree / "MS_CXR_Local_Alignment_v1.0.0.csv")["dicom_id"])
    assert len(train) > 0 and not train["subject_id"].map(patient_folder).eq("p19").any()
    assert not set(train["dicom_id"]) & ms_ids and set(train["view"]) <= {"PA", "AP"}
    chexpert = pd.read_csv(phantom_tree / "mimic-cxr-2.0.0-chexpert.csv.gz").set_index(["subject_id", "study_id"])
    expected = chexpert.loc[list(zip(train["subject_id"], train["study_id"], strict=True)), list(LABELS)]
    np.testing.assert_array_equal(train[list(LABELS)].to_numpy(), expected.to_numpy(np.float32))


@pytest.mark.slow
def test_phantom_boxes_cover_the_drawn_finding_in_the_prepared_frame(phantom_tree, phantom_prepared):
    from cxrdiff import phantom

    truth = json.loads((phantom_tree / "phantom_truth.json").read_text())["images"]
    ms = pd.read_parquet(phantom_prepared / "ms_cxr.parquet")
    assert len(ms) > 0
    for _, row in ms.iterrows():
        _, masks, _ = phantom.rerender(truth[row["dicom_id"]])
        resized = resize_center_crop(masks[row["category_name"]].astype(np.uint8) * 255, 64)
        drawn, touched = resized > 127, resized > 0
        boxed = boxes_mask([list(b) for b in row["boxes"]], 64)
        assert drawn.sum() > 0
        assert (drawn & boxed).sum() / drawn.sum() >= 0.98, row["category_name"]
        rows, cols = np.flatnonzero(touched.any(axis=1)), np.flatnonzero(touched.any(axis=0))
        boxes = np.array([list(b) for b in row["boxes"]])  # (n, 4) x, y, w, h
        union = [
            boxes[:, 0].min(),
            boxes[:, 1].min(),
            (boxes[:, 0] + boxes[:, 2]).max(),
            (boxes[:, 1] + boxes[:, 3]).max(),
        ]
        extent = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
        np.testing.assert_allclose(union, extent, atol=2.0)  # tight: the boxes span the finding, no more


@pytest.mark.slow
def test_phantom_latents_equal_a_fresh_encode_and_dicoms_read_like_their_jpgs(phantom_tree, phantom_prepared,
                                                                            tiny_model):  # fmt: skip
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model / "vae").eval()
    row = _train(phantom_prepared).iloc[0]
    pixels = to_model_input(resize_center_crop(load_grayscale(row["image_path"]), 64))  # (1, 3, 64, 64)
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean[0].numpy()  # (4, 16, 16)
    np.testing.assert_allclose(latent_from_bytes(row["latent_mean"], row["latent_shape"]), mean, atol=2e-3)
    dicoms = sorted(phantom_tree.rglob("*.dcm"))
    assert dicoms
    for path in dicoms:
        grey, jpg = load_grayscale(path).astype(float), load_grayscale(path.with_suffix(".jpg")).astype(float)
        assert grey.shape == jpg.shape and np.abs(grey - jpg).mean() < 3.0


def test_rerun_of_a_finished_prepare_changes_nothing(phantom_prepared, tiny_model, tmp_path):
    """A finished folder re-run with the same settings keeps its manifest, so later steps see no change."""
    import dataclasses
    import shutil

    from cxrdiff.artifacts import manifest_hash, read_manifest
    from cxrdiff.config import from_dict
    from cxrdiff.prepare import PrepareConfig, prepare

    copy = tmp_path / "prepared"
    shutil.copytree(phantom_prepared, copy)
    before = manifest_hash(copy), (copy / "manifest.json").stat().st_mtime_ns
    config = from_dict(PrepareConfig, read_manifest(copy, "prepare")["config"])
    result = prepare(dataclasses.replace(config, out=copy))
    assert (manifest_hash(copy), (copy / "manifest.json").stat().st_mtime_ns) == before  # not rewritten
    assert result["train_rows"] == read_manifest(copy)["counts"]["train"]["rows"] > 0


# --- real DICOMs among phantom JPGs ----------------------------------------------------------------

MS_CXR_FILE = "MS_CXR_Local_Alignment_v1.0.0.csv"
REAL_IN_TREE = {  # real file → (a modality written into the copy, or None; the skip reason, or None: encoded)
    "RG1_UNCR.dcm": (None, None),
    "RG1_J2KR.dcm": (None, None),
    "RG1_J2KI.dcm": (None, None),
    "JPEG-LL.dcm": ("CR", None),
    "SC_rgb.dcm": (None, "colour image"),
    "emri_small.dcm": (None, "multi-frame image"),
    "rtplan.dcm": (None, "no pixel data"),
    "MR_small.dcm": (None, "other modality"),
}


@pytest.mark.slow
def test_prepare_a_tree_of_real_dicoms_among_phantom_jpgs(phantom_tree, phantom_prepared, tiny_model, tmp_path):
    """Real DICOMs (and a thumbnail) take the place of phantom images, and the phantom's own DICOMs are read
    instead of their JPGs: nothing crashes, every skip is listed with its reason, the counts add up, and a
    phantom image prepared from its DICOM has nearly the latent prepared from its JPG."""
    import shutil

    import pydicom
    from test_images import real

    tree = tmp_path / "mimic"
    shutil.copytree(phantom_tree, tree)
    before = _train(phantom_prepared).sort_values("dicom_id").reset_index(drop=True)
    relative = [Path(p).relative_to(phantom_tree) for p in before["image_path"]]
    own_dicoms = [i for i, p in enumerate(relative) if (tree / p).with_suffix(".dcm").is_file()][:4]
    others = [i for i in range(len(before)) if i not in own_dicoms]
    assert len(own_dicoms) >= 2 and len(others) >= len(REAL_IN_TREE) + 1
    expected = {}
    for i, (name, (modality, reason)) in zip(others, REAL_IN_TREE.items(), strict=False):
        (tree / relative[i]).unlink()
        ds = pydicom.dcmread(real(name))
        if modality:
            ds.Modality = modality
        ds.save_as((tree / relative[i]).with_suffix(".dcm"), enforce_file_format=False)
        expected[before["dicom_id"][i]] = (name, reason)
    thumbnail = others[len(REAL_IN_TREE)]
    Image.fromarray(np.full((24, 20), 90, np.uint8)).save(tree / relative[thumbnail])  # short side 20 < 64 / 2
    expected[before["dicom_id"][thumbnail]] = ("thumbnail", "image too small")
    for i in own_dicoms:
        (tree / relative[i]).unlink()  # the phantom's DICOM is read instead of its JPG
    undecodable, latin = (tree / relative[i].parent.with_suffix(".txt") for i in (others[-1], others[-2]))
    undecodable.write_bytes(undecodable.read_bytes() + b"\x81")  # not UTF-8, undefined in Windows-1252
    latin.write_bytes(latin.read_text().replace("IMPRESSION:", "IMPRESSION: Größe.").encode("cp1252"))

    out = tmp_path / "prepared"
    config = dict(test_size=8, test_no_finding_max=0.25, batch_size=8, shard_size=16, workers=0)
    prepare(PrepareConfig(mimic=tree, ms_cxr=tree / MS_CXR_FILE, base_model=tiny_model, out=out, **config))
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = pd.read_csv(out / "skipped.csv", dtype={"dicom_id": str})
    train = _train(out).set_index("dicom_id")
    for dicom_id, (name, reason) in expected.items():
        listed = skipped[skipped["dicom_id"] == dicom_id]
        if reason is None:
            assert dicom_id in train.index and listed.empty, name
        else:
            assert dicom_id not in train.index and listed["reason"].tolist() == [reason], (name, listed)
            assert "empty" not in listed["detail"].iloc[0]
    assert manifest["dicom_contrast"] == "mimic-jpg" and manifest["skipped"] == len(skipped)
    image_reasons = {r for _, r in expected.values() if r}
    for part in ("train", "test", "ms_cxr"):
        counts = manifest["counts"][part]
        assert counts["planned"] == counts["rows"] + counts["image_skipped"]
        assert counts["image_skipped"] == sum(counts["image_skip_reasons"].values())
        listed = skipped[(skipped["part"] == part) & skipped["reason"].isin(image_reasons | {"unreadable image"})]
        assert listed["reason"].value_counts().to_dict() == counts["image_skip_reasons"]
    assert manifest["counts"]["train"]["image_skip_reasons"] == {r: 1 for r in image_reasons}
    assert int(train["truncated"].sum()) == manifest["prompts_over_context"]["train"] == 0
    assert skipped.loc[skipped["dicom_id"] == before["dicom_id"][others[-1]], "reason"].tolist() == [
        "undecodable report"
    ]
    assert manifest["counts"]["train"]["unreadable_report"] >= 1
    assert train.loc[before["dicom_id"][others[-2]], "impression"].startswith("Größe.")  # read as Windows-1252
    assert not train["impression"].str.contains("\ufffd").any()

    def latent(table, dicom_id):
        row = table.loc[dicom_id]
        return latent_from_bytes(row["latent_mean"], row["latent_shape"]).astype(np.float64)

    ids = {name: dicom_id for dicom_id, (name, _) in expected.items()}
    np.testing.assert_array_equal(latent(train, ids["RG1_J2KR.dcm"]), latent(train, ids["RG1_UNCR.dcm"]))

    def nearly(a, b):  # within 5% of the latent's spread on average, 25% at most
        difference, scale = np.abs(a - b), b.std()
        return difference.mean() < 0.05 * scale and difference.max() < 0.25 * scale

    uncompressed = latent(train, ids["RG1_UNCR.dcm"])
    assert nearly(latent(train, ids["RG1_J2KI.dcm"]), uncompressed)  # measured: 1.1% and 8.4%
    from_jpg = before.set_index("dicom_id")
    for i in own_dicoms:
        dicom_id = before["dicom_id"][i]
        assert train.loc[dicom_id, "image_path"].endswith(".dcm")
        # only the JPG's compression (quality 95) differs; measured: 2.6-3.0% and 13-17%
        assert nearly(latent(train, dicom_id), latent(from_jpg, dicom_id)), dicom_id
        other = latent(from_jpg, before["dicom_id"][others[-1]])  # another phantom image, for scale: far apart
        assert np.abs(other - latent(from_jpg, dicom_id)).mean() > 0.3 * other.std()


def test_an_ms_cxr_csv_with_only_a_header_is_said_out_loud(tree, tiny_model, tmp_path, capsys, monkeypatch):
    from cxrdiff import console
    from cxrdiff.prepare.mimic import build_plan, check_mimic_inputs

    monkeypatch.setattr(console.err, "width", 400)  # one log line, unwrapped
    header = tmp_path / "ms_cxr.csv"
    header.write_text((tree / "MS_CXR_Local_Alignment_v1.0.0.csv").read_text().splitlines()[0] + "\n")
    config = _config(tree, tiny_model, tmp_path / "out", ms_cxr=header)
    capsys.readouterr()
    plan = build_plan(config, check_mimic_inputs(config))
    assert plan["counts"]["ms_cxr"]["planned"] == 0 and plan["counts"]["train"]  # training data is still there
    assert f"--ms-cxr {header}: no rows (only a header); ms_cxr.parquet will be empty" in capsys.readouterr().err


def _doubled(tree, tmp_path, **edits):
    """A copy of `tree` whose tables are edited by `edits` (file name → function of the DataFrame)."""
    import shutil

    copy = tmp_path / "mimic"
    shutil.copytree(tree, copy)
    for name, edit in edits.items():
        frame = pd.read_csv(copy / name, dtype={"dicom_id": str})
        with gzip.open(copy / name, "wt") if name.endswith(".gz") else open(copy / name, "w") as handle:
            edit(frame).to_csv(handle, index=False)
    return copy


def test_rows_repeated_whole_are_dropped_and_listed_in_every_table(prepared, tree, tiny_model, tmp_path):
    """Doubled metadata (91 → 182 training rows before) and a doubled MS-CXR box (scored twice before)."""
    from cxrdiff.prepare.mimic import build_plan, check_mimic_inputs

    twice = lambda frame: pd.concat([frame, frame], ignore_index=True)  # noqa: E731
    names = ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-chexpert.csv.gz")
    ms_name = "MS_CXR_Local_Alignment_v1.0.0.csv"
    copy = _doubled(tree, tmp_path, **{n: twice for n in names}, **{ms_name: lambda f: pd.concat([f, f.iloc[[0]]])})
    config = _config(copy, tiny_model, tmp_path / "out", ms_cxr=copy / ms_name)
    plan = build_plan(config, check_mimic_inputs(config))
    clean = build_plan(
        _config(tree, tiny_model, tmp_path / "o2"), check_mimic_inputs(_config(tree, tiny_model, tmp_path / "o2"))
    )
    assert plan["counts"]["duplicate_rows"] == {"metadata": 16, "split": 16, "chexpert": 14, "ms_cxr": 1}
    assert clean["counts"]["duplicate_rows"] == {"metadata": 0, "split": 0, "chexpert": 0, "ms_cxr": 0}
    assert plan["counts"]["train"]["planned"] == clean["counts"]["train"]["planned"] == 4
    ms = plan["items"][plan["items"]["unit"] == "ms_cxr"]
    assert [len(json.loads(b)) for b in ms["boxes_original"]] == [1, 2]  # the effusion's two boxes, not three
    duplicates = [r for r in plan["skipped"] if r["reason"] == "duplicate row"]
    assert len(duplicates) == 47
    last = duplicates[-1]
    assert (last["part"], last["dicom_id"], last["detail"]) == (ms_name, "h1", "line 6 repeats line 2")
    assert last["path"] == str(copy / ms_name)


def test_a_prepare_that_ends_with_no_rows_says_so(tree, tiny_model, tmp_path, capsys, monkeypatch):
    """Every image missing: the run finishes (its counts and skipped.csv say why) and warns, naming the parts."""
    from cxrdiff import console

    monkeypatch.setattr(console.err, "width", 400)  # one log line, unwrapped
    copy = _doubled(tree, tmp_path)
    for image in [*copy.rglob("*.jpg"), *copy.rglob("*.dcm")]:
        image.unlink()
    out = tmp_path / "out"
    capsys.readouterr()
    result = prepare(_config(copy, tiny_model, out))
    assert (result["train_rows"], result["test_rows"], result["ms_cxr_rows"]) == (0, 0, 0)
    assert f"prepare {out}: no rows in train, test, ms_cxr; every candidate was left out" in capsys.readouterr().err
    assert (pd.read_csv(out / "skipped.csv")["reason"] == "image not found").sum() >= 6


def test_rows_that_share_a_key_but_differ_are_refused(tree, tiny_model, tmp_path):
    name = "mimic-cxr-2.0.0-metadata.csv.gz"
    other_view = lambda f: pd.concat([f, f.iloc[[0]].assign(ViewPosition="AP")], ignore_index=True)  # noqa: E731
    copy = _doubled(tree, tmp_path, **{name: other_view})
    with pytest.raises(InputError, match=rf"^{copy / name}: lines 2 and 18 share dicom_id a1 but differ; keep one"):
        prepare(_config(copy, tiny_model, tmp_path / "out"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == [CLAIM]  # nothing stored


@pytest.mark.parametrize(
    ("column", "value", "said"),
    [("w", "", "is empty"), ("image_width", "wide", "has 'wide', not a number"), ("label_text", " ", "is empty")],
)
def test_an_empty_or_non_number_ms_cxr_cell_is_one_line_naming_row_and_column(
    tree, tiny_model, tmp_path, column, value, said
):
    name = "MS_CXR_Local_Alignment_v1.0.0.csv"
    lines = (tree / name).read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[3].split(",")
    cells[header.index(column)] = value
    lines[3] = ",".join(cells)
    bad = tmp_path / "ms.csv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"^{bad}: line 4: column '{column}' {said}$"):
        prepare(_config(tree, tiny_model, tmp_path / "out", ms_cxr=bad))
    assert [p.name for p in (tmp_path / "out").iterdir()] == [CLAIM]  # nothing stored


def test_mimic_naming_a_file_says_so(tree, tiny_model, tmp_path):
    table = tree / "mimic-cxr-2.0.0-metadata.csv.gz"
    with pytest.raises(InputError, match=rf"^--mimic {table}: a file, not a folder \(give the MIMIC-CXR-JPG root"):
        prepare(_config(table, tiny_model, tmp_path / "out"))
    with pytest.raises(InputError, match=rf"^--mimic {tmp_path / 'none'}: no such folder"):
        prepare(_config(tmp_path / "none", tiny_model, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# prepare whose loader workers stall on the train unit's images: the parent waits on them, as it does
# while decoding outpaces nothing (a slow disk, large DICOMs)
STALLED_WORKERS = """
import os, sys, time
from pathlib import Path
import cxrdiff.prepare.encode as encode
import cxrdiff.prepare.mimic as mimic

marker, encode_unit, getitem, unit = Path(sys.argv[1]), mimic.encode_unit, encode.ImageSet.__getitem__, []

def recorded(acc, vae, rows, name, *args, **kwargs):
    unit[:] = [name]
    return encode_unit(acc, vae, rows, name, *args, **kwargs)

def stalled(self, i):
    if unit[0].startswith("train-"):
        (marker / str(os.getpid())).touch()  # this worker is decoding (its init has run)
        time.sleep(300)
    return getitem(self, i)

mimic.encode_unit, encode.ImageSet.__getitem__ = recorded, stalled
sys.argv = ["cxrdiff", *sys.argv[2:]]
from cxrdiff.cli import main
main()
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux)")
def test_ctrl_c_in_a_terminal_during_prepare_with_workers_is_interrupted_exit_130(phantom_tree, tiny_model, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, workers included: "interrupted", exit 130, no
    traceback, the finished units kept and no worker left (before: "DataLoader worker exited unexpectedly")."""
    marker = tmp_path / "stalled"
    marker.mkdir()
    argv = ["prepare", "--mimic", str(phantom_tree), "--ms-cxr", str(phantom_tree / MS_CXR_FILE),
            "--base-model", str(tiny_model), "--out", str(tmp_path / "out"), "--test-size", "8",
            "--test-no-finding-max", "0.25", "--batch-size", "8", "--shard-size", "64", "--workers", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", STALLED_WORKERS, str(marker), *argv], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            workers = [int(p.name) for p in marker.iterdir()]
        assert len(workers) == 2 and set(workers) <= set(_children(proc.pid)), (workers, proc.poll())
        # what the terminal does: SIGINT to the whole foreground group; which process handles it first is
        # the kernel's choice, so here the workers do, and the parent later than torch's 5 s status check
        for worker in workers:
            os.kill(worker, signal.SIGINT)
        time.sleep(7.0)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr and "exited unexpectedly" not in stderr, stderr
        assert stderr.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C)"), stderr
        assert (tmp_path / "out" / "test.parquet").is_file()  # the units finished before are kept
        deadline = time.monotonic() + 10
        while any(_state(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [w for w in workers if _state(w)] == []
    finally:
        for pid in [proc.pid, *workers]:
            if _state(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


# --- a killed prepare leaves no worker behind ------------------------------------------------------

# prepare with its VAE stalled at the first batch of the train unit (64 rows, 8 batches): the loader
# workers decode ahead meanwhile and fill the result pipe that nobody reads
STALLED_PREPARE = """
import sys, time
from pathlib import Path
import cxrdiff.prepare.encode as encode
import cxrdiff.prepare.mimic as mimic

marker, encode_unit, encode_batch, unit = Path(sys.argv[1]), mimic.encode_unit, encode.encode_batch, []

def recorded(acc, vae, rows, name, *args, **kwargs):
    unit[:] = [name]
    return encode_unit(acc, vae, rows, name, *args, **kwargs)

def stalled(vae, pixels):
    if unit[0].startswith("train-"):
        marker.touch()
        time.sleep(300)
    return encode_batch(vae, pixels)

mimic.encode_unit, encode.encode_batch = recorded, stalled
sys.argv = ["cxrdiff", *sys.argv[2:]]
from cxrdiff.cli import main
main()
"""


def _state(pid: int) -> str | None:
    """A process's state letter, None when it is gone (a zombie counts as gone: it holds no memory)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state = stat[stat.rindex(")") + 2]
    return None if state in "ZX" else state


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_prepare_leaves_no_loader_worker_running(phantom_tree, tiny_model, tmp_path, signum):
    marker = tmp_path / "stalled"
    argv = ["prepare", "--mimic", str(phantom_tree), "--ms-cxr", str(phantom_tree / MS_CXR_FILE),
            "--base-model", str(tiny_model), "--out", str(tmp_path / "out"), "--test-size", "8",
            "--test-no-finding-max", "0.25", "--batch-size", "8", "--shard-size", "64", "--workers", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = (tmp_path / "stderr").open("w")
    proc = subprocess.Popen([sys.executable, "-c", STALLED_PREPARE, str(marker), *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (marker.exists() and len(workers) == 2) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            workers = _children(proc.pid)
        assert marker.exists() and len(workers) == 2, (workers, proc.poll(), (tmp_path / "stderr").read_text())
        time.sleep(1.0)  # the workers decode ahead and fill the pipe the stalled parent no longer reads
        os.kill(proc.pid, signum)
        # SIGTERM (SLURM's preemption): a clean stop at once, exit 75 (a scheduler requeues); SIGKILL: dead
        assert proc.wait(timeout=30) == (75 if signum == signal.SIGTERM else -signum)
        deadline = time.monotonic() + 10
        while any(_state(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [w for w in workers if _state(w)] == []
    finally:
        for pid in [proc.pid, *workers]:
            if _state(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        log.close()


def test_shards_encode_their_units_and_the_last_writes_the_manifest(prepared, tree, tiny_model, tmp_path):
    """Shard 1/3 then 0/3 leave the folder unfinished; --finalize refuses; 2/3 completes it: equal to one run."""
    out = tmp_path / "sharded"
    units = json.loads((prepared[0] / ".prepare" / "plan.json").read_text())["units"]
    first = prepare(_config(tree, tiny_model, out, shard="1/3"))
    assert first == {"out": str(out), "complete": False, "missing_units": len(units) - len(units[1::3])} | {
        "encode_seconds": first["encode_seconds"]
    }
    assert sorted(p.stem for p in out.glob("*.parquet")) == sorted(units[1::3])
    prepare(_config(tree, tiny_model, out, shard="0/3"))
    with pytest.raises(RunError, match=rf"{len(units[2::3])} of {len(units)} units missing"):
        prepare(_config(tree, tiny_model, out, finalize=True))
    assert not (out / "manifest.json").exists()
    last = prepare(_config(tree, tiny_model, out, shard="2/3"))
    assert last["train_rows"] == prepared[1]["train_rows"] and (out / "manifest.json").is_file()
    expected, got = _tables(prepared[0]), _tables(out)
    assert expected.keys() == got.keys()
    for name, table in expected.items():
        pd.testing.assert_frame_equal(got[name], table)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".cxrdiff")) == []
