"""`cxrdiff report`: the rendering from a metrics dict (labels, published numbers, a page Chromium renders)
and the orchestration's reuse rule (nothing recomputed when nothing changed; what a change touches is)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import stand_ins
from PIL import Image
from stand_ins import Brightness

from cxrdiff.artifacts import write_manifest
from cxrdiff.data import LABELS, MS_CXR_CATEGORIES
from cxrdiff.metrics.score import UNTRAINED_LABEL, Score
from cxrdiff.report import ReportConfig, render, report


def _grounding(shift: float) -> dict:
    classes = {
        c: {
            "n": 3,
            "auc_roc": {"mean": 0.6 + shift, "std": 0.0},
            "top1": {"mean": 0.5, "std": 0.0},
            "cnr": {"mean": 0.4 + shift, "std": 0.1},
        }
        for c in MS_CXR_CATEGORIES
    }
    average = {
        "n": 24,
        "auc_roc": {"mean": 0.61 + shift, "std": 0.0},
        "top1": {"mean": 0.5, "std": 0.0},
        "cnr": {"mean": 0.41 + shift, "std": 0.0},
    }
    words = {
        "min_count": 7,
        "top3": {"Edema": [{"word": "edema", "cnr": 1.23, "n": 30}]},
        "class_words": {"Edema": [{"word": "edema", "cnr": 1.23, "n": 30}]},
    }
    return {"classes": classes, "average": average, "word_analysis": words, "conventions": {"cnr": "signed"}}


def _metrics(tmp_path, untrained: bool) -> dict:
    overlay = tmp_path / "ov.png"
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None] * 4, (64, 1))).convert("RGB").save(overlay)
    fd = (
        Score("FD (random DenseNet121)", 12.34, label=UNTRAINED_LABEL, protocol={"random_features": True})
        if untrained
        else Score("FID_XRV", 12.34)
    )
    div = Score(
        "MS-SSIM",
        11.5,
        std=2.0,
        unit="%",
        protocol={"scales": 3, "kernel_size": 11, "sigma": 1.5, "data_range": 255.0, "prompts": 2},
    )
    runs = {}
    for name, shift in (("frozen", 0.2), ("learnable", 0.0)):
        runs[name] = {
            "kind": "finetune",
            "path": "/x",
            "grounding": _grounding(shift),
            "overlays": {c: [str(overlay)] for c in MS_CXR_CATEGORIES},
            "fidelity": [fd.as_dict()],
            "diversity": div.as_dict(),
            "classifier": {"Edema": Score("AUC (hand)", 77.7, unit="%").as_dict()},
        }
    return {"runs": runs, "real": {"classifier": {"Edema": Score("AUC (hand)", 88.8).as_dict()}}, "classifier": "hand"}


def test_render_writes_published_and_measured_numbers(tmp_path):
    render(_metrics(tmp_path, untrained=False), tmp_path)
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    for text in (md, page):
        assert "237.6" in text and "Table 4" in text  # published FID of SDv2, with its source
        assert "1.142" in text and "Table 3" in text  # BioViL-L average CNR
        assert "86 ± 0.9 / 80 ± 3.3 / 1.25 ± 0.06" in text  # Table 1, Finetune_F Atelectasis with its ±
        assert "FID: published values not comparable" in text and "normalised the Inception inputs twice" in text
        assert "FID (" not in text  # nothing that is not an FID is named like one
        assert "236.2" in text and "MS-CXR phrases" in text  # Table 4's second prompt source
        assert "enlarged (222, 1.16)" in text and "<EOS> (0.72)" in text.replace("&lt;", "<").replace("&gt;", ">")
        assert "positives: images whose only label is d" in text
        assert "12.3" in text and "77.7" in text and "88.8" in text  # this report's numbers
        assert "81.0 / 50.0 / 0.61" in text  # frozen's average: AUC %, Top-1 %, CNR
        assert "saw MIMIC-CXR" in text.replace("were trained on data that includes MIMIC-CXR", "saw MIMIC-CXR")
        assert "Warning: some" not in text and f"({UNTRAINED_LABEL})" not in text
    assert page.count("data:image/png;base64,") == 3 and 'src="http' not in page  # trade-off, bars, grid
    # Table 3 read in its own column order: BioViL-L's Pleural Effusion 1.5 and Pneumothorax 0.74
    table_3 = md.split("### CNR against published")[1].split("###")[0]
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:4] for line in table_3.splitlines() if "|" in line}
    assert cells["Pleural Effusion"] == ["1.02", "1.2", "1.5"] and cells["Pneumothorax"] == ["0.28", "0.47", "0.74"]
    words = md.split("### Word analysis (Table 6 and this report)")[1].split("###")[0]
    assert "| frozen | Edema | edema (30, 1.23) | edema (30, 1.23) |" in words
    assert "more than 7 of the class's phrases" in words
    assert json.loads((tmp_path / "metrics.json").read_text())["runs"]["frozen"]["fidelity"][0]["value"] == 12.34


def test_untrained_label_is_in_every_output(tmp_path):
    render(_metrics(tmp_path, untrained=True), tmp_path)
    for name in ("metrics.json", "report.md", "report.html"):
        text = (tmp_path / name).read_text()
        assert UNTRAINED_LABEL in text, name
        if name != "metrics.json":
            assert "Warning: some" in text and f"12.3 ({UNTRAINED_LABEL})" in text, name
    md = (tmp_path / "report.md").read_text()
    # every cell holding the number carries the label, not only a footnote
    assert all(UNTRAINED_LABEL in line for line in md.splitlines() if "12.3" in line)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["runs"]["frozen"]["fidelity"][0]["label"] == UNTRAINED_LABEL


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_html_renders_in_chromium(tmp_path):
    """The page as a browser shows it: every figure decodes (as many as the PNG files written beside it), and
    every table of measurements holds the paper's numbers in a row or column labelled published."""
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed but CI is set (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    metrics = _metrics(tmp_path, untrained=True)
    frozen = metrics["runs"]["frozen"]
    frozen["training"] = {"frozen_text": True, "steps": 4, "lr": 5e-5, "seed": 0}
    metrics["runs"]["learnable"]["training"] = {"frozen_text": False, "steps": 4, "lr": 5e-5, "seed": 0}
    frozen["checkpoints"] = [
        {"step": s, "source": "checkpoint", "grounding": frozen["grounding"]["average"], "fidelity": fd}
        for s, fd in ((2, frozen["fidelity"][0]), (4, frozen["fidelity"][0]))
    ]
    written = render(metrics, tmp_path)
    pngs = sorted(p.name for p in written if p.suffix == ".png")
    assert pngs == ["checkpoints.png", "cnr-by-class.png", "grounding.png", "trade-off.png"]
    probe = tmp_path / "probe.html"
    script = (
        "<script>window.addEventListener('load',()=>{const b=document.body;"
        "const imgs=[...document.images];"
        "b.dataset.images=imgs.length;"
        "b.dataset.loaded=imgs.filter(i=>i.complete&&i.naturalWidth>100&&i.naturalHeight>100).length;"
        "const tabs=[...document.querySelectorAll('table.measured')];"
        "b.dataset.tables=tabs.length;"
        "b.dataset.settings=document.querySelectorAll('table.settings').length;"
        "b.dataset.unpublished=tabs.filter(t=>![...t.querySelectorAll('th,td')].some("
        "c=>c.textContent.includes('published'))).map(t=>t.previousElementSibling.textContent).join('|');"
        "b.dataset.cells=document.querySelectorAll('td').length;});</script>"
    )
    probe.write_text((tmp_path / "report.html").read_text().replace("</body>", script + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    dom = subprocess.run(
        [browser, *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    body = dict(re.findall(r'data-(\w+)="([^"]*)"', re.search(r"<body([^>]*)>", dom).group(1)))
    assert body["images"] == body["loaded"] == str(len(pngs)), body
    in_markdown = (tmp_path / "report.md").read_text().count("\n### ")  # the same tables as report.md
    assert int(body["tables"]) == in_markdown - 1 == 8 and body["settings"] == "1", body
    assert body["unpublished"] == "", body  # titles of tables without a published row or column
    assert int(body["cells"]) > 100
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1200,2400", (tmp_path / "report.html").as_uri()],
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1200) and pixels.std() > 10  # not a blank page
    keep = os.environ.get("CXRDIFF_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


# --- orchestration with stand-in steps ---------------------------------------------------------


class Calls:
    def __init__(self):
        self.sample, self.ground = [], []


def _stub_steps(calls: Calls):
    """Stand-in sample and ground steps: sampled images brighter where the prompt's row has Edema, groundings
    whose CNR rises with the steps (and with per-phrase boxes)."""
    import pandas as pd

    def image(cfg, rng, p, i, row):
        edema = row.get("Edema", 0.0)  # MS-CXR phrases carry no labels
        return np.clip(rng.normal(120 + 40 * edema, 30, (32, 32)), 0, 255).astype(np.uint8)

    def write_grounding(cfg):
        calls.ground.append(cfg.out.name)
        (cfg.out / "overlays").mkdir()
        Image.fromarray(np.full((32, 32, 3), 99, np.uint8)).save(cfg.out / "overlays" / "s0.png")
        shift = 0.1 * cfg.steps / 50 + (0.3 if cfg.boxes == "per-phrase" else 0.0)
        phrases = [{"run": 0, "sample": f"s{i}", "category": c, "box": None, "auc_roc": 0.7, "top1": 1.0,
                    "cnr": 0.5 + shift + 0.1 * i} for i, c in enumerate(("Edema", "Edema", "Pneumonia"))]  # fmt: skip
        pd.DataFrame(phrases).to_parquet(cfg.out / "scores.parquet")
        (cfg.out / "summary.json").write_text(json.dumps(_grounding(shift)))

    sample = stand_ins.sample_step(image, on_call=lambda cfg: calls.sample.append(cfg.out.name))
    return stand_ins.steps(sample, stand_ins.ground_step(write_grounding))


def _prepared(folder, n: int = 12):
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    rows = []
    for i in range(n):
        edema = float(i % 2)
        img = np.clip(rng.normal(120 + 40 * edema, 30, (40, 48)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"real{i}.png")
        labels = {c: float("nan") for c in LABELS}
        labels.update({"Edema": edema, "No Finding": 1.0 - edema})
        rows.append({"impression": f"prompt {i}", "image_path": str(folder / f"real{i}.png"), **labels})
    pd.DataFrame(rows).to_parquet(folder / "test.parquet")
    phrases = ("edema", "mild pulmonary edema", "interstitial edema")
    pd.DataFrame(
        [{"dicom_id": f"d{i}", "category_name": "Edema", "label_text": t} for i, t in enumerate(phrases)]
    ).to_parquet(folder / "ms_cxr.parquet")
    write_manifest(folder, "prepare")
    return folder


def test_rerun_recomputes_nothing_then_what_changed(tmp_path, tiny_model):
    real = _prepared(tmp_path / "prepared")
    calls = Calls()
    steps = _stub_steps(calls)
    base = dict(
        runs=(tiny_model,),
        out=tmp_path / "report",
        real=real,
        fid=False,
        fid_xrv=False,
        n_fid=10,
        diversity_prompts=3,
    )
    first = report(ReportConfig(**base), classifier=Brightness(), steps=steps)
    assert calls.sample == ["samples", "diversity", "samples-ms-cxr", "diversity-ms-cxr"]
    assert calls.ground == ["ground"]
    assert (
        first["recomputed"]["tiny"]
        == "samples,diversity,ground,metrics,benchmark,samples-ms-cxr,diversity-ms-cxr,metrics-ms-cxr"
    )
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    run = metrics["runs"]["tiny"]
    assert run["n_generated"] == 10 and run["diversity"]["protocol"]["prompts"] == 3
    assert run["fidelity"][0]["name"] == "FD (brightness features)"
    assert run["classifier"]["Edema"]["value"] > 90  # bright Edema images vs darker No Finding ones
    assert metrics["real"]["classifier"]["Edema"]["value"] > 90
    assert not list((tmp_path / "report").rglob("keys.json"))  # reuse is the step folders' own

    again = report(ReportConfig(**base), classifier=Brightness(), steps=steps)
    assert again["recomputed"]["tiny"] == "nothing"
    assert len(calls.sample) == 4 and calls.ground == ["ground"]

    report(ReportConfig(**base, ground_steps=25), classifier=Brightness(), steps=steps)  # only grounding reruns
    assert calls.ground == ["ground", "ground"] and len(calls.sample) == 4
    summary = json.loads((tmp_path / "report" / "metrics.json").read_text())["runs"]["tiny"]["grounding"]
    assert summary["average"]["cnr"]["mean"] == pytest.approx(0.41 + 0.05)
    manifest = json.loads((tmp_path / "report" / "manifest.json").read_text())
    assert manifest["step"] == "report" and manifest["settings"]["ground_steps"] == 25  # re-rendered in place
    assert manifest["settings"]["classifier"] == "brightness:v1" and "classifier" not in manifest["config"]

    import pandas as pd

    test = pd.read_parquet(real / "test.parquet")
    test.loc[0, "impression"] = "a changed prompt"
    test.to_parquet(real / "test.parquet")
    write_manifest(real, "prepare")  # a changed input folder: new manifest hash
    changed = report(ReportConfig(**base, ground_steps=25), classifier=Brightness(), steps=steps)
    assert (
        changed["recomputed"]["tiny"]
        == "samples,diversity,ground,metrics,benchmark,samples-ms-cxr,diversity-ms-cxr,metrics-ms-cxr"
    )


def test_table_3_is_grounded_per_phrase_when_an_image_class_has_two_phrases(tmp_path, tiny_model):
    import pandas as pd

    real = _prepared(tmp_path / "prepared", n=4)
    base = dict(runs=(tiny_model,), real=real, fid=False, fid_xrv=False, n_fid=4, diversity_prompts=1)
    calls = Calls()
    report(ReportConfig(out=tmp_path / "one", **base), classifier=Brightness(), steps=_stub_steps(calls))
    assert calls.ground == ["ground"]  # one phrase per image and class: per-phrase scoring is the union's
    md = (tmp_path / "one" / "report.md").read_text()
    assert "so it equals Table 1's union scoring" in md
    phrases = [{"dicom_id": "d", "category_name": "Edema", "label_text": t} for t in ("edema", "mild edema")]
    pd.DataFrame(phrases).to_parquet(real / "ms_cxr.parquet")
    write_manifest(real, "prepare")
    calls = Calls()
    report(ReportConfig(out=tmp_path / "two", **base), classifier=Brightness(), steps=_stub_steps(calls))
    assert calls.ground == ["ground", "ground-per-phrase"]
    run = json.loads((tmp_path / "two" / "metrics.json").read_text())["runs"]["tiny"]
    assert run["grounding_per_phrase"]["same_as_union"] is False
    assert run["grounding_per_phrase"]["average"]["cnr"]["mean"] == pytest.approx(0.41 + 0.1 + 0.3)
    md = (tmp_path / "two" / "report.md").read_text()
    table_3 = md.split("### CNR against published")[1].split("###")[0]
    table_1 = md.split("### Localization")[1].split("###")[0]
    edema_3 = next(line for line in table_3.splitlines() if line.startswith("| Edema |"))
    edema_1 = next(line for line in table_1.splitlines() if line.startswith("| Edema |"))
    # the stand-in's summary (± over its noise seeds), each its own; 2 phrases are too few for an interval
    assert edema_3.endswith("| 0.80 ± 0.10 [too few (2)] |") and edema_1.endswith("/ 0.50 ± 0.10 [too few (2)] |")


def test_classifier_positives_only_or_any():
    import pandas as pd

    from cxrdiff.report.measure import label_groups as _label_groups

    nan = float("nan")
    rows = [  # Edema alone; Edema with Pneumonia; No Finding alone; No Finding with Support Devices
        {"Edema": 1.0, "Pneumonia": nan, "No Finding": nan, "Support Devices": nan},
        {"Edema": 1.0, "Pneumonia": 1.0, "No Finding": nan, "Support Devices": nan},
        {"Edema": nan, "Pneumonia": 0.0, "No Finding": 1.0, "Support Devices": nan},
        {"Edema": nan, "Pneumonia": nan, "No Finding": 1.0, "Support Devices": 1.0},
    ]
    paths = ["a", "b", "c", "d"]
    by_class, no_finding = _label_groups(pd.DataFrame(rows), paths, "only")
    assert by_class == {"Edema": ["a"], "Pneumonia": []} and no_finding == ["c"]
    by_class, no_finding = _label_groups(pd.DataFrame(rows), paths, "any")
    assert by_class == {"Edema": ["a", "b"], "Pneumonia": ["b"]} and no_finding == ["c", "d"]


def test_balanced_prompts_hold_k_per_class_with_its_labels():
    import pandas as pd

    from cxrdiff.report.classifier_set import balanced_prompts
    from cxrdiff.report.measure import label_groups

    nan = float("nan")
    rows = [  # Edema alone ×2, Edema with Pneumonia, Pneumonia alone, No Finding alone ×3; no Cardiomegaly
        {"impression": f"p{i}", "Edema": e, "Pneumonia": p, "Cardiomegaly": 0.0, "No Finding": nf, "latent": b"x"}
        for i, (e, p, nf) in enumerate(
            [(1.0, nan, nan), (1.0, nan, nan), (1.0, 1.0, nan), (nan, 1.0, nan), (nan, nan, 1.0), (nan, 0.0, 1.0),
             (nan, nan, 1.0)]
        )
    ]  # fmt: skip
    test = pd.DataFrame(rows)
    table = balanced_prompts(test, 4, "only", seed=3)
    assert table["classifier_class"].value_counts().to_dict() == {"Edema": 4, "Pneumonia": 4, "No Finding": 4}
    assert "latent" not in table and list(table.columns[:3]) == ["classifier_class", "source_row", "impression"]
    for cls, group in table.groupby("classifier_class"):
        assert (group[cls] == 1.0).all()
        assert ((group[["Edema", "Pneumonia", "Cardiomegaly", "No Finding"]] == 1.0).sum(axis=1) == 1).all()
        assert (test.loc[group["source_row"], "impression"].to_list() == group["impression"]).all()
    # every candidate row before any repeats: Edema's 2 rows twice each, No Finding's 3 rows each at least once
    assert sorted(table.query("classifier_class == 'Edema'")["source_row"]) == [0, 0, 1, 1]
    assert set(table.query("classifier_class == 'No Finding'")["source_row"]) == {4, 5, 6}
    assert set(table.query("classifier_class == 'Pneumonia'")["source_row"]) == {3}
    # the report counts them back with the same rule: K per class, K No Finding
    by_class, no_finding = label_groups(table, list(range(len(table))), "only")
    assert {c: len(v) for c, v in by_class.items()} == {"Edema": 4, "Pneumonia": 4, "Cardiomegaly": 0}
    assert len(no_finding) == 4
    anyway = balanced_prompts(test, 3, "any", seed=3)
    assert set(anyway.query("classifier_class == 'Edema'")["source_row"]) == {0, 1, 2}
    assert set(anyway.query("classifier_class == 'Pneumonia'")["source_row"]) == {2, 3}
    assert balanced_prompts(test, 4, "only", seed=3).equals(table)  # seeded


def test_classifier_check_on_its_own_prompt_set_and_counts_read_back(tmp_path, tiny_model):
    """With --classifier-prompts-per-class 8 the generated row rests on 8 Edema and 8 No-Finding images (6 of
    each in the test set, so two are repeated), the real row on the test set's 6 and 6; the table's note
    reads what each cell rests on back from metrics.json."""
    real = _prepared(tmp_path / "prepared", n=12)
    calls = Calls()
    config = ReportConfig(runs=(tiny_model,), out=tmp_path / "r", real=real, fid=False, fid_xrv=False, n_fid=12,
                          diversity_prompts=2, classifier_prompts_per_class=8)  # fmt: skip
    first = report(config, classifier=Brightness(), steps=_stub_steps(calls))
    assert calls.sample == ["samples", "diversity", "samples-classifier", "samples-ms-cxr", "diversity-ms-cxr"]
    assert "samples-classifier" in first["recomputed"]["tiny"] and "metrics-classifier" in first["recomputed"]["tiny"]
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    edema = metrics["runs"]["tiny"]["classifier"]["Edema"]
    assert edema["protocol"] == {"positives": 8, "negatives": 8} and edema["value"] > 90
    average = metrics["runs"]["tiny"]["classifier"]["Average"]
    assert average["protocol"] == {"classes": 1, "positives": 8, "negatives": 8}
    assert metrics["real"]["classifier"]["Edema"]["protocol"] == {"positives": 6, "negatives": 6}
    assert metrics["settings"]["classifier_prompts_per_class"] == 8
    rendered = tmp_path / "again"
    render(json.loads((tmp_path / "r" / "metrics.json").read_text()), rendered)  # from the file alone
    note = (rendered / "report.md").read_text().split("### Classifier AUC")[1].split("###")[0]
    assert "real p19 (reference): Edema 6; No Finding 6; Average over 1 classes" in note
    assert "tiny: Edema 8; No Finding 8; Average over 1 classes" in note
    assert "8 prompts per class and 8 No Finding" in note
    again = report(config, classifier=Brightness(), steps=_stub_steps(calls))
    assert again["recomputed"]["tiny"] == "nothing" and len(calls.sample) == 5
    nine = dataclasses.replace(config, classifier_prompts_per_class=9)
    report(nine, classifier=Brightness(), steps=_stub_steps(calls))
    assert calls.sample[5:] == ["samples-classifier"]  # another set: made again, the p19 samples kept
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["runs"]["tiny"]["classifier"]["Edema"]["protocol"] == {"positives": 9, "negatives": 9}


def test_report_refuses_bad_inputs_before_work(tmp_path, tiny_model):
    from cxrdiff.errors import InputError

    real = _prepared(tmp_path / "prepared", n=4)
    with pytest.raises(InputError, match="at least one RUN"):
        report(ReportConfig(out=tmp_path / "r", real=real))
    with pytest.raises(InputError, match="--inception-weights"):
        report(ReportConfig(runs=(tiny_model,), out=tmp_path / "r", real=real), steps=_stub_steps(Calls()))
    assert not (tmp_path / "r").exists()  # refused before --out is claimed
    with pytest.raises(InputError, match="expected a 'prepare' output folder"):
        report(ReportConfig(runs=(tiny_model,), out=tmp_path / "r", real=tiny_model, fid=False, fid_xrv=False))


def test_too_few_test_images_and_an_unfinished_prepare_folder_are_refused_before_sampling(tmp_path, tiny_model):
    """One held-out image: FID cannot be measured; refused before any run is sampled (not after). A prepare
    folder still being written is called unfinished, not "not a prepare folder". Equal run names point at
    the `names` key that exists (there is no --names flag)."""
    import pandas as pd

    from cxrdiff.artifacts import CLAIM
    from cxrdiff.errors import InputError

    real = _prepared(tmp_path / "prepared", n=1)
    calls = Calls()
    config = ReportConfig(runs=(tiny_model,), out=tmp_path / "r", real=real, fid=False, fid_xrv=False)
    with pytest.raises(InputError, match=r"test.parquet holds 1 image\(s\); the fidelity metrics need at least 2"):
        report(config, steps=_stub_steps(calls))
    assert not (tmp_path / "r").exists() and calls.sample == [] and calls.ground == []
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    pd.DataFrame({"x": [1]}).to_parquet(unfinished / "test.parquet")
    (unfinished / CLAIM).write_text(json.dumps({"step": "prepare", "key": "k", "settings": {}}))
    with pytest.raises(InputError) as refused:
        report(ReportConfig(runs=(tiny_model,), out=tmp_path / "r", real=unfinished, fid=False, fid_xrv=False))
    assert str(refused.value) == (
        f"{unfinished}: an unfinished 'prepare' run (no manifest.json yet); re-run the same `cxrdiff prepare` "
        "command to finish it"
    )
    twin = tmp_path / "b" / tiny_model.name
    twin.parent.mkdir()
    twin.symlink_to(tiny_model)
    with pytest.raises(InputError, match=r"names are not unique .*`names = \[...\]` in a --config TOML file"):
        report(ReportConfig(runs=(tiny_model, twin), out=tmp_path / "r", real=_prepared(tmp_path / "p2", n=4),
                            fid=False, fid_xrv=False), steps=_stub_steps(Calls()))  # fmt: skip


def test_report_refuses_another_steps_folder_as_out(tmp_path, tiny_model):
    """--out pointing at a prepare (or finetune) folder must not overwrite that folder's manifest."""
    from cxrdiff.errors import InputError

    real = _prepared(tmp_path / "prepared", n=4)
    before = (real / "manifest.json").read_bytes()
    with pytest.raises(InputError, match="'prepare' folder, expected 'report'"):
        report(ReportConfig(runs=(tiny_model,), out=real, real=real, fid=False, fid_xrv=False))
    assert (real / "manifest.json").read_bytes() == before
    assert not (real / "report.html").exists() and not (real / "runs").exists()


def test_report_refuses_a_strangers_folder_and_takes_up_its_own_interrupted_run(tmp_path, tiny_model):
    """A folder the report did not write is refused untouched; the report's own unfinished folder is
    finished with new settings, reusing the step folders that are still valid."""
    from cxrdiff.errors import InputError

    real = _prepared(tmp_path / "prepared", n=4)
    config = dict(runs=(tiny_model,), real=real, fid=False, fid_xrv=False, n_fid=4, diversity_prompts=2)
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "todo.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty and not a 'report' folder"):
        report(ReportConfig(**config, out=stranger), steps=_stub_steps(Calls()))
    assert sorted(p.name for p in stranger.iterdir()) == ["todo.txt"]

    calls = Calls()
    steps = _stub_steps(calls)
    sample_step, ground_step = steps["sample"], steps["ground"]

    def broken(cfg):
        raise RuntimeError("killed")

    out = tmp_path / "report"
    with pytest.raises(RuntimeError, match="killed"):
        report(ReportConfig(**config, out=out), steps={"sample": sample_step, "ground": (broken, ground_step[1])})
    assert not (out / "manifest.json").exists() and calls.sample == ["samples", "diversity"]
    result = report(ReportConfig(**config, out=out, ground_steps=25), steps=steps)
    assert (
        result["recomputed"]["tiny"] == "ground,metrics,samples-ms-cxr,diversity-ms-cxr,metrics-ms-cxr"
        and len(calls.sample) == 4
    )
    assert json.loads((out / "manifest.json").read_text())["settings"]["ground_steps"] == 25


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", "-x", " a", "a\nb", "a\\b", ""])
def test_run_and_group_names_are_names_not_paths(tmp_path, tiny_model, name):
    """A run's name is its folder under runs/: a path would make (and remove) folders outside --out."""
    from cxrdiff.errors import InputError

    real = _prepared(tmp_path / "prepared", n=4)
    out = tmp_path / "deep" / "report"
    config = dict(runs=(tiny_model,), out=out, real=real, fid=False, fid_xrv=False)
    rule = (
        "is not a plain name (a run's name is a folder name: no '/' or '\\', not '.' or '..', no leading '-' or "
        "spaces, printable, at most 200 bytes)"
    )
    with pytest.raises(InputError) as refused:
        report(ReportConfig(**config, names=(name,)), steps=_stub_steps(Calls()))
    assert str(refused.value) == f"names: {name!r} {rule}"
    label = f"{name}={tiny_model}"
    if name and name == name.strip():  # --label strips NAME; an empty one is refused as NAME=DIR syntax
        with pytest.raises(InputError) as refused:
            report(ReportConfig(**config, label=(label,)), steps=_stub_steps(Calls()))
        assert str(refused.value) == f"--label {label!r}: {name!r} {rule}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # nothing made, in --out or beside it


def test_a_run_given_as_dot_is_named_after_its_folder(tmp_path, tiny_model, monkeypatch):
    from cxrdiff.report.steps import run_names

    monkeypatch.chdir(tiny_model)
    assert run_names(ReportConfig(runs=(Path("."),))) == ("tiny",)  # not '' (runs/samples) or '..'


def test_report_cli_refuses_a_name_that_is_a_path_with_one_line(tmp_path, tiny_model):
    real = _prepared(tmp_path / "prepared", n=4)
    config = tmp_path / "report.toml"
    config.write_text('names = ["../../x"]\nfid = false\nfid_xrv = false\n')
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "cxrdiff", "report", str(tiny_model), "--real", str(real), "--out", str(out),
         "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: names: '../../x' is not a plain name") and not out.exists()


def test_laterality_table_sits_in_the_localization_section_and_metrics_json(tmp_path):
    """Per run: the laterality and the share on the named side with their bootstrap intervals, beside CNR; a run
    with under 10 sided phrases shows "too few (n)"; metrics.json keeps the entry as measured."""
    import pandas as pd

    from cxrdiff.metrics.laterality import laterality_intervals

    def scores(values):
        rows = [{"run": 0, "sample": f"{i:06d}", "side": "left" if i % 2 else "right", "laterality": v}
                for i, v in enumerate(values)]  # fmt: skip
        return pd.DataFrame([*rows, {"run": 0, "sample": "999999", "side": "bilateral", "laterality": np.nan}])

    metrics = _metrics(tmp_path, untrained=False)
    values = [0.9, 0.8, 0.7, 0.6, 0.4, 0.9, 0.8, 0.7, 0.6, 0.3, 0.75, 0.65]
    metrics["runs"]["frozen"]["laterality"] = laterality_intervals(scores(values), seed=0)
    metrics["runs"]["learnable"]["laterality"] = laterality_intervals(scores([0.9] * 4), seed=0)
    metrics["runs"]["frozen"]["grounding_intervals"] = {"average": {"cnr": {"value": 0.61, "low": 0.5, "high": 0.7}}}
    render(metrics, tmp_path)
    md = (tmp_path / "report.md").read_text()
    localization = md.split("\n## Localization on MS-CXR (Tables 1 and 3)")[1].split("\n## ")[0]
    table = localization.split("### Localization: laterality")[1].split("###")[0]
    lows = laterality_intervals(scores(values), seed=0)
    mean, share = lows["mean"], lows["on_named_side"]
    assert mean["value"] == pytest.approx(np.mean(values)) and share["value"] == pytest.approx(10 / 12)
    expected = (
        f"| frozen | 12 (6 left, 6 right; 1 bilateral excluded) | {np.mean(values):.2f} [{mean['low']:.2f}, "
        f"{mean['high']:.2f}] | 83.3 [{share['low'] * 100:.1f}, {share['high'] * 100:.1f}] | 0.61 [0.50, 0.70] |"
    )
    assert expected in table, table
    assert "| learnable | 4 (2 left, 2 right; 1 bilateral excluded) | too few (4) | too few (4) | — |" in table
    saved = json.loads((tmp_path / "metrics.json").read_text())["runs"]
    assert saved["frozen"]["laterality"]["mean"]["value"] == pytest.approx(np.mean(values))
    assert saved["learnable"]["laterality"]["too_few"] is True


def test_a_grid_of_many_runs_is_a_bounded_figure(tmp_path):
    """The overlay grid grows with the runs (2.8 inches each at 110 dpi): 20 runs would be 6,160 px tall; every
    report figure stays within the figure bound."""
    import io

    from cxrdiff.figures import MAX_FIGURE_PIXELS
    from cxrdiff.report.render import grounding_figure

    metrics = _metrics(tmp_path, untrained=False)
    run = metrics["runs"]["frozen"]
    metrics["runs"] = {f"run{i}": run for i in range(20)}
    with Image.open(io.BytesIO(grounding_figure(metrics))) as png:
        assert 2000 < max(png.size) <= MAX_FIGURE_PIXELS, png.size
