"""The phantom data set: real file shapes, awkward reports, DICOM read back, boxes on findings, determinism."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrdiff.artifacts import CLAIM, OtherSettings, StepFolder, read_manifest, write_manifest
from cxrdiff.data import CLASS_WORDS, LABELS, MS_CXR_CATEGORIES, read_chexpert, read_metadata, read_ms_cxr, read_split
from cxrdiff.errors import InputError
from cxrdiff.images import load_dicom, load_grayscale
from cxrdiff.impressions import extract_impression, split_sections
from cxrdiff.phantom import Finding, PhantomConfig, make_phantom, render, render_study, rerender
from cxrdiff.phantom import tree as step

PATIENTS, SIZE = 24, 96


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "a"
    result = make_phantom(
        PhantomConfig(out, patients=PATIENTS, seed=3, size=SIZE, dicom_fraction=0.3, preview=True, workers=1)
    )
    return out, result


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tables_have_the_real_columns_and_every_path_exists(tree):
    root, _ = tree
    metadata = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", dtype={"dicom_id": str})
    assert list(metadata.columns) == [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
        "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning",
    ]  # fmt: skip
    split = pd.read_csv(root / "mimic-cxr-2.0.0-split.csv.gz")
    assert list(split.columns) == ["dicom_id", "study_id", "subject_id", "split"]
    chexpert = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert list(chexpert.columns) == ["subject_id", "study_id", *LABELS]
    ms_cxr = pd.read_csv(root / "MS_CXR_Local_Alignment_v1.0.0.csv")
    assert list(ms_cxr.columns) == [
        "dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height",
    ]  # fmt: skip
    # The project's own readers accept them.
    metadata, split, chexpert, ms_cxr = (
        read_metadata(root / "mimic-cxr-2.0.0-metadata.csv.gz"),
        read_split(root / "mimic-cxr-2.0.0-split.csv.gz"),
        read_chexpert(root / "mimic-cxr-2.0.0-chexpert.csv.gz"),
        read_ms_cxr(root / "MS_CXR_Local_Alignment_v1.0.0.csv"),
    )
    assert set(np.unique(chexpert[list(LABELS)].to_numpy()[~np.isnan(chexpert[list(LABELS)].to_numpy())])) <= {
        -1.0,
        0.0,
        1.0,
    }
    assert chexpert[list(LABELS)].isna().any().any()  # blanks, as the real file has them
    for row in metadata.itertuples():
        subject = str(row.subject_id)
        assert len(subject) == 8 and len(str(row.study_id)) == 8
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        image = folder / f"s{row.study_id}" / f"{row.dicom_id}.jpg"
        assert image.is_file() and (folder / f"s{row.study_id}.txt").is_file()
        assert load_grayscale(image).shape == (row.Rows, row.Columns)
        assert [len(part) for part in row.dicom_id.split("-")] == [8, 8, 8, 8, 8]
    assert set(split["dicom_id"]) == set(metadata["dicom_id"])
    assert {f"p{str(s)[:2]}" for s in metadata["subject_id"]} == {f"p{n}" for n in range(10, 20)}
    assert set(metadata["ViewPosition"]) == {"PA", "AP", "LATERAL"}
    assert not ms_cxr.empty and not ms_cxr["path"].str.startswith("files/p19/").any()
    for row in ms_cxr.itertuples():
        assert (root / row.path).is_file()


def test_manifest_counts_match_the_files(tree):
    root, result = tree
    manifest = read_manifest(root, "phantom")
    counts = manifest["counts"]
    assert counts == result["counts"]
    metadata = read_metadata(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    chexpert = read_chexpert(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    ms_cxr = read_ms_cxr(root / "MS_CXR_Local_Alignment_v1.0.0.csv")
    assert counts["patients"] == PATIENTS == metadata["subject_id"].nunique()
    assert counts["studies"] == len(chexpert) == metadata["study_id"].nunique()
    assert counts["images"] == metadata["ViewPosition"].value_counts().reindex(["PA", "AP", "LATERAL"]).to_dict()
    assert counts["studies_p19"] == (chexpert["subject_id"] // 10**6 == 19).sum() > 0
    assert sum(counts["dicom"].values()) == len(list(root.rglob("*.dcm")))
    assert counts["ms_cxr"]["rows"] == {c: int((ms_cxr["category_name"] == c).sum()) for c in MS_CXR_CATEGORIES}
    assert counts["no_finding_studies"] == (chexpert["No Finding"] == 1).sum() > 0
    assert counts["label_positive"]["Edema"] == (chexpert["Edema"] == 1).sum()
    assert 0 < counts["studies_with_findings"] < counts["studies"]
    truth = json.loads((root / "phantom_truth.json").read_text())["images"]
    assert set(truth) == set(metadata.loc[metadata["ViewPosition"] != "LATERAL", "dicom_id"])
    assert "phantom_truth.json" in manifest["files"] and "preview.png" in manifest["files"]


def test_reports_parse_and_labels_follow_the_text(tree):
    root, result = tree
    chexpert = read_chexpert(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    truth = json.loads((root / "phantom_truth.json").read_text())["images"]
    by_study = {entry["study_id"]: entry for entry in truth.values()}
    seen = set()
    for row in chexpert.itertuples(index=False):
        subject, study = str(row.subject_id), row.study_id
        text = (root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt").read_text()
        assert text.lstrip().startswith("FINAL REPORT") and "___" in text
        prompt, source = extract_impression(text)
        names = [name for name, _ in split_sections(text)]
        assert "findings" in names
        if "impression" not in names:
            seen.add("no_impression")
            assert source == "findings"
        if "CONCLUSION:" in text:
            seen.add("conclusion")
            assert source == "impression"
        if source == "impression" and len(prompt) < 8:
            seen.add("short")
        labels = dict(zip(LABELS, row[2:], strict=True))
        entry = by_study.get(study)
        for finding in entry["findings"] if entry else []:
            expected = 1.0 if finding["certain"] else -1.0
            if len(prompt) >= 8:
                assert labels[finding["category"]] == expected, (text, labels)
                words = CLASS_WORDS[finding["category"]]
                assert any(w in prompt.lower() for w in words), (finding, prompt)
                if finding["side"] in ("left", "right"):
                    assert finding["side"] in prompt.lower() or "cardio" in finding["category"].lower()
            if not finding["certain"]:
                assert any(h in prompt for h in ("Possible", "cannot be excluded", "may represent"))
        if labels["No Finding"] == 1.0 and len(prompt) >= 8:
            assert not any(labels[c] in (1.0, -1.0) for c in MS_CXR_CATEGORIES)
    reports = result["counts"]["reports"]
    assert reports["no_impression"] > 0 and reports["conclusion_heading"] > 0 and reports["short_impression"] > 0
    assert {"no_impression", "conclusion", "short"} <= seen


def test_report_awkward_cases_from_the_writer():
    from cxrdiff.phantom import write_report_text

    rng = np.random.default_rng(0)
    effusion = Finding("Pleural Effusion", "left", None, 1)
    text, labels = write_report_text(rng, [effusion], ["small left pleural effusion"], "PA", "no_impression", False)
    assert "IMPRESSION" not in text and extract_impression(text)[1] == "findings"
    assert "small left pleural effusion" in extract_impression(text)[0].lower() and labels["Pleural Effusion"] == 1.0
    text, labels = write_report_text(rng, [], [], "AP", "short_impression", True)
    prompt, source = extract_impression(text)
    assert source == "impression" and len(prompt) < 8 and "\n \n\n" in text and labels["No Finding"] == 1.0
    text, _ = write_report_text(rng, [effusion], ["small left pleural effusion"], "PA", "conclusion_heading", False)
    prompt, source = extract_impression(text)
    assert "CONCLUSION:" in text and source == "impression" and "small left pleural effusion" in prompt.lower()
    hedged = Finding("Pneumonia", "right", "lower", 2, certain=False)
    text, labels = write_report_text(rng, [hedged], ["right lower lobe pneumonia"], "PA", "standard", False)
    assert labels["Pneumonia"] == -1.0 and np.isnan(labels["No Finding"])
    assert "right lower lobe pneumonia" in extract_impression(text)[0]


def test_dicom_reads_back_as_the_jpg(tree):
    import pydicom

    root, _ = tree
    truth = json.loads((root / "phantom_truth.json").read_text())["images"]
    kinds = set()
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        kinds.add((str(ds.PhotometricInterpretation), int(ds.BitsStored)))
        assert ds.SOPInstanceUID and len(ds.SOPInstanceUID) <= 64 and ds.WindowWidth
        grey = load_dicom(path)
        jpg = load_grayscale(path.with_suffix(".jpg")).astype(int)
        assert grey.shape == jpg.shape
        diff = np.abs(grey.astype(int) - jpg)
        assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 8, (path, diff.mean())
        if path.stem in truth:  # against the lossless picture: the stored range maps back to the same greys
            original, _, _ = rerender(truth[path.stem])
            assert np.abs(grey.astype(int) - original.astype(int)).max() <= 1
        if str(ds.PhotometricInterpretation) == "MONOCHROME1":  # stored inverted: raw and picture anti-correlate
            assert np.corrcoef(ds.pixel_array.ravel().astype(float), jpg.ravel())[0, 1] < -0.95
    assert {k[0] for k in kinds} == {"MONOCHROME1", "MONOCHROME2"}


def test_boxes_cover_the_drawn_findings(tree):
    root, _ = tree
    ms_cxr = read_ms_cxr(root / "MS_CXR_Local_Alignment_v1.0.0.csv")
    truth = json.loads((root / "phantom_truth.json").read_text())["images"]
    for dicom_id, rows in ms_cxr.groupby("dicom_id"):
        entry = truth[dicom_id]
        picture, masks, _ = rerender(entry)
        jpg = load_grayscale(root / entry["path"]).astype(int)
        assert np.abs(jpg - picture.astype(int)).mean() < 2.0  # the truth entry redraws the written picture
        for category, group in rows.groupby("category_name"):
            assert (group["x"] >= 0).all() and (group["x"] + group["w"] <= group["image_width"]).all()
            assert (group["y"] >= 0).all() and (group["y"] + group["h"] <= group["image_height"]).all()
            inside = np.zeros_like(masks[category])
            for row in group.itertuples():
                inside[int(row.y) : int(row.y + row.h), int(row.x) : int(row.x + row.w)] = True
            assert masks[category].any() and not (masks[category] & ~inside).any()
            assert masks[category].sum() > 0.2 * inside.sum()  # tight (a pneumothorax's crescent fills least)


@pytest.mark.parametrize("category", MS_CXR_CATEGORIES)
def test_finding_changes_the_picture_only_in_its_box(category):
    """Render the same patient with and without the finding: the difference lies inside the boxes."""
    sides = {"Cardiomegaly": None, "Edema": "bilateral", "Atelectasis": "bilateral", "Pneumothorax": "right"}
    finding = Finding(category, sides.get(category, "left"), "lower" if category != "Pneumothorax" else None, 2)
    with_it, masks, boxes = render(np.random.default_rng(7), 128, 144, [finding])
    without, _, _ = render(np.random.default_rng(7), 128, 144, [])
    diff = np.abs(with_it - without)
    inside = np.zeros(diff.shape, bool)
    for x, y, w, h in boxes[category]:
        inside[y : y + h, x : x + w] = True
    assert len(boxes[category]) == (2 if finding.side == "bilateral" else 1)
    assert diff[masks[category]].mean() > 0.04, "the finding must be visible"  # about 10 grey levels
    assert diff[inside].sum() > 0.95 * diff.sum()  # the rest: the soft tails of blurred edges and haze
    assert masks[category].shape == diff.shape and not (masks[category] & ~inside).any()


def test_sides_follow_the_radiograph_convention():
    """The patient's right is on the image's left."""
    _, masks, _ = render(np.random.default_rng(1), 128, 128, [Finding("Pleural Effusion", "right", None, 3)])
    cols = np.nonzero(masks["Pleural Effusion"].any(axis=0))[0]
    assert cols.max() < 64
    _, masks, _ = render(np.random.default_rng(1), 128, 128, [Finding("Pneumothorax", "left", None, 3)])
    assert np.nonzero(masks["Pneumothorax"].any(axis=0))[0].min() > 64


def test_render_study_is_uint8_and_pinned():
    image, masks = render_study(np.random.default_rng(0), 64, [Finding("Cardiomegaly", severity=3)])
    assert image.dtype == np.uint8 and image.shape == (64, 64) and image.min() == 0 and image.max() == 255
    again, _ = render_study(np.random.default_rng(0), 64, [Finding("Cardiomegaly", severity=3)])
    assert np.array_equal(image, again) and set(masks) == {"Cardiomegaly"}
    # Lungs are dark, the heart and mediastinum bright: the heart mask is brighter than the image mean.
    assert image[masks["Cardiomegaly"]].mean() > image.mean() + 30


def test_same_seed_same_bytes_other_seed_differs(tree, tmp_path):
    root, _ = tree
    again = tmp_path / "b"
    make_phantom(
        PhantomConfig(again, patients=PATIENTS, seed=3, size=SIZE, dicom_fraction=0.3, preview=True, workers=2)
    )
    first, second = _files(root), _files(again)
    manifest_a, manifest_b = json.loads(first.pop("manifest.json")), json.loads(second.pop("manifest.json"))
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    for m in (manifest_a, manifest_b):
        m.pop("created"), m["config"].pop("out"), m["config"].pop("workers")  # neither changes a byte
    assert manifest_a == manifest_b
    other = tmp_path / "c"
    make_phantom(PhantomConfig(other, patients=PATIENTS, seed=4, size=SIZE, dicom_fraction=0.3, workers=1))
    third = _files(other)
    assert third["mimic-cxr-2.0.0-metadata.csv.gz"] != first["mimic-cxr-2.0.0-metadata.csv.gz"]


# --- the step folder: finished, unfinished, other settings, strangers ---------------------------------


def _small(out: Path, **changes) -> PhantomConfig:
    return PhantomConfig(out, **({"patients": 3, "seed": 0, "size": 48, "dicom_fraction": 0.5, "workers": 1} | changes))


def test_finished_rerun_returns_at_once_and_other_settings_are_refused(tmp_path, monkeypatch):
    out = tmp_path / "p"
    first = make_phantom(_small(out))
    manifest = (out / "manifest.json").read_bytes()

    def boom(*args, **kwargs):
        raise AssertionError("a finished phantom was planned again")

    monkeypatch.setattr(step, "plan_studies", boom)
    assert make_phantom(_small(out, workers=2)) == first  # workers change no byte: the same settings
    assert (out / "manifest.json").read_bytes() == manifest  # untouched, so nothing downstream recomputes
    with pytest.raises(OtherSettings, match=r"finished 'phantom' run made with other settings \(seed\b"):
        make_phantom(_small(out, seed=1))
    with pytest.raises(OtherSettings, match="other settings"):
        make_phantom(_small(out, preview=True))
    assert (out / "manifest.json").read_bytes() == manifest


@pytest.mark.parametrize("stage", ["images", "truth"])
def test_unfinished_run_resumes_to_the_same_bytes(tmp_path, monkeypatch, stage):
    """A run killed mid-way (an exception injected) leaves no manifest; re-run, it finishes the same tree."""
    make_phantom(_small(tmp_path / "reference"))
    reference = _files(tmp_path / "reference")
    out = tmp_path / "p"
    real, drawn = step._image_worker, []

    def worker(job):
        if len(drawn) == 3:
            raise KeyboardInterrupt  # as a kill after three images
        drawn.append(job)
        return real(job)

    def truth(*args):
        raise KeyboardInterrupt  # as a kill after every image, report and table, before the truth and manifest

    if stage == "images":
        monkeypatch.setattr(step, "_image_worker", worker)
    else:
        monkeypatch.setattr(step, "_write_truth", truth)
    with pytest.raises(KeyboardInterrupt):
        make_phantom(_small(out))
    monkeypatch.undo()
    assert not (out / "manifest.json").exists() and (out / CLAIM).is_file()  # unfinished: claimed, no manifest
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    assert kept
    with pytest.raises(OtherSettings, match="unfinished 'phantom' run made with other settings"):
        make_phantom(_small(out, size=64))
    result = make_phantom(_small(out, workers=2))
    assert result["images"] == len(list(out.rglob("*.jpg")))
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # what was written is kept, not redrawn
    resumed = _files(out)
    manifests = [json.loads(files.pop("manifest.json")) for files in (reference, resumed)]
    assert resumed.keys() == reference.keys()
    assert [k for k in reference if reference[k] != resumed[k]] == []
    for m in manifests:
        m.pop("created"), m["config"].pop("out"), m["config"].pop("workers")
    assert manifests[0] == manifests[1]


def test_strangers_and_other_steps_folders_are_refused(tmp_path):
    stranger = tmp_path / "other"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty and not a 'phantom' folder"):
        make_phantom(_small(stranger))
    assert sorted(p.name for p in stranger.iterdir()) == ["notes.txt"]  # nothing written into it
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        make_phantom(_small(tmp_path / "file"))
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    write_manifest(prepared, "prepare", files=[])
    with pytest.raises(InputError, match="'prepare' folder, expected 'phantom'"):
        make_phantom(_small(prepared))
    unfinished = tmp_path / "unfinished"
    StepFolder.claim(unfinished, "prepare", {"seed": 0})
    (unfinished / "test.parquet").write_bytes(b"half")
    with pytest.raises(InputError, match="unfinished 'prepare' run"):
        make_phantom(_small(unfinished))
    assert (unfinished / "test.parquet").read_bytes() == b"half"


def test_bad_numbers_are_refused_before_the_folder_is_touched(tmp_path):
    bad = [({"patients": 0}, "--patients"), ({"size": 16}, "--size"), ({"dicom_fraction": 1.5}, "--dicom-fraction")]
    for changes, flag in bad:
        with pytest.raises(InputError, match=rf"^{flag} \S+: must be"):
            make_phantom(_small(tmp_path / "x", **changes))
    assert not (tmp_path / "x").exists()


def test_cli_writes_the_tree_and_exits_2_on_bad_input(tmp_path):
    run = [sys.executable, "-m", "cxrdiff", "--json", "phantom"]
    result = subprocess.run(
        [*run, str(tmp_path / "t"), "--patients", "2", "--size", "48"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["patients"] == 2
    bad = subprocess.run([*run, str(tmp_path / "u"), "--patients", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --patients")
