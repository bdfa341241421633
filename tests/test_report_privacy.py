"""Today's benchmarks and the privacy section in `cxrdiff report`, on a prepared folder with training images and
stand-in sample / ground steps: one run "copies" training images (planted), the other makes fresh ones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import stand_ins
from PIL import Image

from cxrdiff.artifacts import write_manifest
from cxrdiff.data import LABELS
from cxrdiff.report import ReportConfig, report

N_TRAIN, N_TEST, SIZE = 40, 30, 32


def texture(seed: int, shape=(40, 48)) -> np.ndarray:
    """A smooth random grey image: an 5 × 6 grid of random levels, upsampled, with a little noise. Two of them
    correlate weakly; an image with itself, fully."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.uniform(40, 215, (5, 6)).astype(np.uint8)).resize(shape[::-1], Image.BILINEAR)
    return np.clip(np.asarray(coarse, np.float64) + rng.normal(0, 4, shape), 0, 255).astype(np.uint8)


def _labels(i: int) -> dict:
    labels = {c: float("nan") for c in LABELS}
    labels["Edema" if i % 2 else "No Finding"] = 1.0
    return labels


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("privacy") / "prepared"
    (folder / "images").mkdir(parents=True)
    train = []
    for i in range(N_TRAIN):
        path = folder / "images" / f"train{i}.png"
        Image.fromarray(texture(i)).save(path)
        impression = "Compared to ___, mild edema." if i % 2 else "No acute process, ___ notified."
        train.append({"impression": impression, "image_path": str(path), **_labels(i)})
    pd.DataFrame(train).to_parquet(folder / "train-00000.parquet")
    test = []
    for i in range(N_TEST):
        path = folder / "images" / f"test{i}.png"
        Image.fromarray(texture(1000 + i)).save(path)
        test.append({"impression": f"held-out study {i}", "image_path": str(path), **_labels(i)})
    pd.DataFrame(test).to_parquet(folder / "test.parquet")
    phrases = [{"dicom_id": "d0", "category_name": "Edema", "label_text": "mild edema"}]
    pd.DataFrame(phrases).to_parquet(folder / "ms_cxr.parquet")
    write_manifest(folder, "prepare")
    return folder


def copied_index(prompt_index: int) -> int:
    return (7 * prompt_index) % N_TRAIN


def stub_steps(calls: list[str]):
    """sample: a run whose folder is named 'copier' returns training images (resized, slightly noisy), any other
    fresh textures; ground: a fixed summary."""

    def image(cfg, rng, p, i, row):
        if cfg.model.name != "copier":
            return texture(5000 + i, (SIZE, SIZE))
        train = pd.read_parquet(cfg.prompts.parent / "train-00000.parquet")
        source = Image.open(train["image_path"][copied_index(p)]).convert("L")
        grey = np.asarray(source.resize((SIZE, SIZE), Image.BILINEAR), np.float64)
        return np.clip(grey + rng.normal(0, 3, grey.shape), 0, 255).astype(np.uint8)

    def write_grounding(cfg):
        cell = {"n": 1, "auc_roc": {"mean": 0.6}, "top1": {"mean": 0.5}, "cnr": {"mean": 0.4, "std": 0.0}}
        (cfg.out / "summary.json").write_text(json.dumps({"classes": {"Edema": cell}, "average": cell}))

    def on_call(cfg):
        calls.append(f"{cfg.model.name}/{cfg.out.name}")

    sample = stand_ins.sample_step(image, seed=lambda cfg: 7, on_call=on_call)
    return stand_ins.steps(sample, stand_ins.ground_step(write_grounding))


class PooledPixels:
    """A hand-made classifier and feature network: the image's 4 × 4 block means, centred."""

    name = "pooled pixels"
    classes = ("Edema",)
    cache_key = "v1"

    def scores(self, images):
        return images.reshape(len(images), -1).mean(1, keepdims=True)

    def features(self, x):
        import torch.nn.functional as F

        pooled = F.adaptive_avg_pool2d(x, 4).flatten(1)  # (batch, 16)
        return pooled - pooled.mean(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def reported(prepared, tiny_model, tiny_dinov2, tmp_path_factory):
    root = tmp_path_factory.mktemp("report-privacy")
    copier = shutil.copytree(tiny_model, root / "copier")
    calls: list[str] = []
    config = dict(
        runs=(tiny_model, copier),
        out=root / "report",
        real=prepared,
        fid=False,
        fid_xrv=False,
        n_fid=N_TEST,
        diversity_prompts=2,
        table4_p19_only=True,
        features=("classifier", f"hf:RadDino={tiny_dinov2}"),
        min_class_images=5,
        kid_subsets=20,
        privacy_pixels=16,
        privacy_pairs=3,
        memorization_prompts=2,
        memorization_noise=1,
        memorization_steps=2,
    )
    result = report(ReportConfig(**config), classifier=PooledPixels(), steps=stub_steps(calls))
    metrics = json.loads((root / "report" / "metrics.json").read_text())
    return {"config": config, "result": result, "metrics": metrics, "out": root / "report", "calls": calls}


def test_copies_are_found_and_fresh_images_are_not(reported, prepared):
    runs = reported["metrics"]["runs"]
    copier, fresh = runs["copier"]["privacy"], runs["tiny"]["privacy"]
    for key in ("copy_rate", "copy_rate_pixels"):
        assert copier[key]["rate"] >= 0.9 and copier[key]["low"] > copier[key]["nominal"] == pytest.approx(0.05)
        assert fresh[key]["rate"] <= 0.2 and fresh[key]["n"] == N_TEST
        assert copier[key]["held_out_images"] == N_TEST and copier[key]["quantile"] == 0.95
    assert copier["copy_rate"]["measure"] == "cosine on pooled pixels features"
    assert copier["copy_rate_pixels"]["measure"] == "pixel correlation at 16 px"
    assert copier["training_images"] == copier["training_images_total"] == N_TRAIN and copier["searched"] == "all"
    # the closest pairs name the very training image each generated image was copied from
    train = pd.read_parquet(prepared / "train-00000.parquet")
    for pair in copier["pairs"]["pixels"]:
        index = int(pair["generated"][-10:-4])
        assert pair["training"] == train["image_path"][copied_index(index)]
        assert pair["copy"] and pair["pixel_correlation"] > 0.95 and pair["similarity"] > 0.95
    assert len(copier["pairs"]["features"]) == 3
    assert all(p["pixel_correlation"] < 0.9 for p in fresh["pairs"]["pixels"])  # near by chance, never a copy


def test_memorization_score_and_its_words(reported):
    memo = reported["metrics"]["runs"]["tiny"]["privacy"]["memorization"]
    assert memo["steps"] == 2 and memo["noise_per_prompt"] == 1 and memo["latent_elements"] == 4 * 16 * 16
    assert memo["training"]["n"] == 2 and memo["held_out"]["n"] == 2
    scores = [p["score"] for p in memo["training"]["prompts"]]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    prompts = {p["prompt"] for p in memo["training"]["prompts"]}
    assert prompts <= {"Compared to ___, mild edema.", "No acute process, ___ notified."}  # markers kept (keep)
    for p in memo["training"]["prompts"]:
        words = dict(p["words"])
        assert "___" in words and sum(words.values()) == pytest.approx(1.0, abs=1e-3)
    shares = [w["share"] for w in memo["words"]]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 1.0 + 1e-6
    assert next(w for w in memo["words"] if w["word"] == "___")["prompts"] == 2


def test_benchmark_numbers_are_the_metrics_on_the_features(reported, prepared):
    import torch

    from cxrdiff.images import load_grayscale, resize_center_crop
    from cxrdiff.metrics.distribution import kid, prdc
    from cxrdiff.metrics.fid import feature_statistics, frechet_distance

    bench = reported["metrics"]["runs"]["tiny"]["benchmark"]
    network, raddino = bench["networks"]
    assert network["network"] == "pooled pixels features" and raddino["network"] == "RadDino"
    assert {s["name"] for s in raddino["scores"]} == {
        f"{m} (RadDino)" for m in ("FD", "KID", "precision", "recall", "density", "coverage")
    }  # the network named in every metric; FID and KID are Inception's alone
    scores = {s["name"]: s for s in network["scores"]}
    assert set(scores) == {
        f"{m} (pooled pixels features)" for m in ("FD", "KID", "precision", "recall", "density", "coverage")
    }
    net = PooledPixels()

    def features(paths):
        grey = np.stack([resize_center_crop(load_grayscale(p), SIZE) for p in paths])
        return net.features(torch.from_numpy(grey)[:, None].float() / 255.0).double().numpy()

    test = pd.read_parquet(prepared / "test.parquet")
    out = reported["out"] / "runs" / "tiny" / "samples"
    real, fake = features(test["image_path"]), features(sorted(out.glob("*.png")))
    fd = frechet_distance(feature_statistics(real), feature_statistics(fake))
    assert scores["FD (pooled pixels features)"]["value"] == pytest.approx(fd, rel=1e-6)
    expected_kid = kid(real, fake, subsets=20, subset_size=1000, seed=0)
    assert scores["KID (pooled pixels features)"]["value"] == pytest.approx(expected_kid.mean, rel=1e-6)
    assert scores["KID (pooled pixels features)"]["protocol"]["subset_size"] == N_TEST
    manifold = prdc(real, fake, k=5)
    assert scores["coverage (pooled pixels features)"]["value"] == pytest.approx(manifold.coverage)
    # per class: Edema and No Finding have 15 images on each side (>= 5); other classes none
    per_class = bench["per_class"]
    assert per_class["Edema"]["n_real"] == per_class["Edema"]["n_generated"] == 15
    assert [n["network"] for n in per_class["Edema"]["networks"]] == ["pooled pixels features", "RadDino"]
    edema = {s["name"]: s["value"] for s in per_class["Edema"]["networks"][0]["scores"]}
    odd = [i for i in range(N_TEST) if i % 2]
    fd_edema = frechet_distance(feature_statistics(real[odd]), feature_statistics(fake[odd]))
    assert edema["FD (pooled pixels features)"] == pytest.approx(fd_edema, rel=1e-6)
    assert per_class["Pneumonia"]["skipped"].startswith("fewer than 5 images")


def test_report_shows_the_tables_and_the_pairs(reported):
    out = reported["out"]
    md = (out / "report.md").read_text()
    privacy = md.split("## Privacy: does the model copy its training images?")[1].split("\n## ")[0]
    assert "![privacy-pairs](privacy-pairs.png)" in privacy
    assert "### Privacy: copy rate against the training set" in privacy
    assert "| a model that copies nothing | expected (the calibration's nominal rate) | any | 5.0 |" in privacy
    assert "| copier | this report | pixel correlation at 16 px | 100.0 [88.6, 100.0] | 30 / 30 |" in privacy
    assert "### Privacy: memorization score per prompt (Dutt et al.)" in privacy
    assert "\\_\\_\\_ (" in privacy  # the marker "___", escaped for Markdown (it would start a rule or italics)
    fidelity = md.split("\n## Fidelity and diversity (Tables 4 and 5)")[1].split("\n## ")[0]
    assert "### Fidelity on feature networks" in fidelity and "| SD V2 | published, CheXGenBench" in fidelity
    assert "194.72" in fidelity and "FD (RadDino)" in fidelity
    assert "### Fidelity per class on feature networks" in fidelity and "| tiny | Edema | 15 / 15 |" in fidelity
    assert "| tiny | this report | RadDino |" in fidelity and "| copier | Edema | 15 / 15 | RadDino |" in fidelity
    figure = Image.open(out / "privacy-pairs.png")
    assert figure.size[0] > 400 and figure.size[1] > 200  # 2 runs × 2 measures of 3 pairs
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_rerun_reuses_and_a_privacy_option_remeasures_only_privacy(reported):
    steps = stub_steps([])
    config = reported["config"]
    again = report(ReportConfig(**config), classifier=PooledPixels(), steps=steps)
    assert again["recomputed"] == {"tiny": "nothing", "copier": "nothing"}
    first = reported["result"]["recomputed"]
    assert first["copier"] == "samples,diversity,ground,metrics,benchmark,privacy"
    changed = report(ReportConfig(**{**config, "privacy_quantile": 0.9}), classifier=PooledPixels(), steps=steps)
    assert changed["recomputed"] == {"tiny": "privacy", "copier": "privacy"}
    metrics = json.loads((reported["out"] / "metrics.json").read_text())
    assert metrics["runs"]["copier"]["privacy"]["copy_rate"]["quantile"] == 0.9
    cache = sorted(p.name.split("-")[0] for p in (reported["out"] / ".features_cache").iterdir())
    assert cache.count("pixels") == 4  # training, held-out and two runs' generated images, read once each


def test_bad_options_are_refused_before_the_report_folder_is_claimed(prepared, tiny_model, tmp_path):
    from cxrdiff.errors import InputError

    base = dict(runs=(tiny_model,), out=tmp_path / "report", real=prepared, fid=False, fid_xrv=False)
    cases = [
        ({"min_class_images": 1}, "--min-class-images 1: must be at least 2"),
        ({"privacy_pixels": 4}, "--privacy-pixels 4: must be between 8 and 512"),
        ({"memorization_noise": 0}, "--memorization-noise 0: must be between 1 and 64"),
        ({"privacy_quantile": 1.0}, r"--privacy-quantile 1.0: must be a finite number in \(0, 1\)"),
        ({"features": ("resnet",)}, "--features 'resnet': expected inception, xrv, classifier, hf:DIR or hf:NAME=DIR"),
        ({"features": (f"hf:{tmp_path / 'nowhere'}",)}, "nowhere: no such local model folder"),
        ({"features": (f"hf:RadDino={tmp_path}",)}, "not a Hugging Face model folder"),
        ({"features": ("classifier",)}, "--features classifier: the report has no classifier with features"),
        ({"privacy_features": "xrv"}, "torchxrayvision densenet121-res224-all weights"),
    ]
    for options, message in cases:
        with pytest.raises(InputError, match=message) as error:
            report(ReportConfig(**base, **options), steps=stub_steps([]))
        assert "\n" not in str(error.value)
    assert not (tmp_path / "report").exists()


def test_default_networks_are_the_frechet_distances_own(tiny_model):
    from cxrdiff.report.features import feature_specs, parse_spec, privacy_spec

    assert [s.text for s in feature_specs(ReportConfig())] == ["inception", "xrv"]
    assert [s.text for s in feature_specs(ReportConfig(fid=False), PooledPixels())] == ["xrv", "classifier"]
    assert feature_specs(ReportConfig(fid=False, fid_xrv=False)) == []
    assert privacy_spec(ReportConfig(fid=False, privacy_features="classifier")).kind == "classifier"
    spec = parse_spec("hf:RadDino=/models/rad-dino")
    assert (spec.kind, spec.name, str(spec.folder)) == ("hf", "RadDino", "/models/rad-dino")
    assert parse_spec("hf:/models/a=b/rad-dino").folder.name == "rad-dino"  # '=' inside a path is no name


def test_nearest_in_blocks_is_the_search_over_the_whole_set(monkeypatch):
    import cxrdiff.report.privacy.measure as P
    from cxrdiff.metrics.privacy import nearest_training, pixel_correlation

    monkeypatch.setattr(P, "TRAIN_CHUNK", 7)
    rng = np.random.default_rng(3)
    train, queries = rng.normal(size=(30, 5)), rng.normal(size=(9, 5))
    queries[4] = train[23]
    blocks, whole = P.nearest_in_blocks(queries, train, False), nearest_training(queries, train)
    np.testing.assert_array_equal(blocks.index, whole.index)
    np.testing.assert_allclose(blocks.similarity, whole.similarity)
    assert blocks.index[4] == 23
    images, gen = rng.uniform(0, 255, (30, 6, 6)), rng.uniform(0, 255, (5, 6, 6))
    np.testing.assert_array_equal(P.nearest_in_blocks(gen, images, True).index, pixel_correlation(gen, images).index)


def test_word_shares_and_the_words_that_carry_the_score(tokenizer):
    from cxrdiff.report.privacy import word_attribution, word_shares

    mass = np.zeros(77)
    mass[0] = 5.0  # the start token: left out
    mass[1], mass[2], mass[3], mass[4], mass[5] = 1.0, 2.0, 1.0, 0.5, 0.5  # mild | ___ , | ede ma
    shares = word_shares(tokenizer, "mild ___, edema", mass)
    assert shares == [("___", pytest.approx(0.6)), ("mild", pytest.approx(0.2)), ("edema", pytest.approx(0.2))]
    scored = [
        {"prompt": "a", "score": 3.0, "words": [["___", 0.5], ["edema", 0.5]]},
        {"prompt": "b", "score": 1.0, "words": [["___", 1.0]]},
    ]
    # ___: 3 · 0.5 + 1 · 1.0 = 2.5 of the summed 4.0; edema: 1.5 of 4.0
    assert word_attribution(scored) == [
        {"word": "___", "share": 0.625, "prompts": 2},
        {"word": "edema", "share": 0.375, "prompts": 1},
    ]


def test_copy_rate_over_checkpoints(reported, prepared):
    from cxrdiff.artifacts import write_manifest
    from cxrdiff.report.privacy import copy_rates_over_training, over_training_figure, privacy_tables

    config = ReportConfig(**reported["config"])
    name = "copier"
    entry = reported["metrics"]["runs"][name]
    train = pd.read_parquet(prepared / "train-00000.parquet")
    samples = reported["out"] / "runs" / name / "checkpoints" / "step-0000002" / "samples"
    samples.mkdir(parents=True)
    files = []
    for i in range(12):  # an early checkpoint: a third of its images are copies
        grey = texture(9000 + i, (SIZE, SIZE))
        if i % 3 == 0:
            source = Image.open(train["image_path"][i]).convert("L")
            grey = np.asarray(source.resize((SIZE, SIZE), Image.BILINEAR))
        Image.fromarray(grey).save(samples / f"{i:06d}.png")
        files.append(f"{i:06d}.png")
    pd.DataFrame({"file": files, "prompt": ["p"] * 12}).to_parquet(samples / "samples.parquet")
    write_manifest(samples, "sample")
    cell = {"cnr": {"mean": 0.4}}
    points = [
        {"step": 2, "source": "checkpoint", "grounding": cell, "fidelity": None},
        {"step": 4, "source": "the run's final model", "grounding": cell, "fidelity": None},
        {"step": 3, "source": "checkpoint", "grounding": cell, "fidelity": None},  # its samples are missing
    ]
    done: list[str] = []
    copy_rates_over_training(config, name, entry, points, prepared, PooledPixels(), done)
    assert done == ["privacy 2"]
    assert points[0]["copy_rate_pixels"]["copies"] == 4 and points[0]["copy_rate_pixels"]["n"] == 12
    assert points[1]["copy_rate"] == entry["privacy"]["copy_rate"]  # the final point is the run's own
    assert "copy_rate" not in points[2]
    copy_rates_over_training(config, name, entry, points, prepared, PooledPixels(), done)
    assert done == ["privacy 2"]  # cached beside the checkpoint's samples
    metrics = {"runs": {name: {**entry, "checkpoints": points[:2]}}}
    (over,) = [t for t in privacy_tables(metrics) if t.title.startswith("Privacy over training")]
    assert over.rows[0][:4] == ["copier", "2", "33.3 [13.8, 60.9]", "33.3 [13.8, 60.9]"]
    assert over.rows[1][0] == "copier (final model)" and over.rows[1][2].startswith("100.0")
    png, caption = over_training_figure(metrics)
    assert png.startswith(b"\x89PNG") and "Wilson" in caption


def test_privacy_is_skipped_with_its_reason_when_it_cannot_be_calibrated(prepared, tmp_path):
    from cxrdiff.report.privacy import measure_privacy_once, privacy_unavailable

    assert privacy_unavailable(ReportConfig(), prepared) is None  # 30 held-out images calibrate 0.95 (19 needed)
    strict = ReportConfig(out=tmp_path, privacy_quantile=0.99)
    reason = "30 held-out test images cannot calibrate --privacy-quantile 0.99 (it needs 99 or more)"
    done: list[str] = []
    assert measure_privacy_once(strict, prepared, tmp_path, prepared, prepared, None, done) == {"skipped": reason}
    assert privacy_unavailable(ReportConfig(), prepared / "images") == "the prepared folder has no train shards"
    assert done == [] and not (tmp_path / "privacy.json").exists()
