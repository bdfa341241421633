"""`cxrdiff ground` on the tiny model and a small ms_cxr.parquet built to the prepare contract."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrdiff.artifacts import OtherSettings, read_manifest, write_manifest
from cxrdiff.errors import InputError, RunError
from cxrdiff.ground import GroundConfig, capture_maps, choose_tokens, ground
from cxrdiff.metrics.localization import auc_roc, cnr
from cxrdiff.text_encoders import encode_text

# (category, phrase, boxes in the original 80×64 image as x, y, w, h)
ROWS = [
    ("Pleural Effusion", "Small left pleural effusion.", [[48, 36, 24, 24]]),
    ("Cardiomegaly", "Moderate cardiomegaly", [[24, 20, 32, 30]]),
    ("Pleural Effusion", "bilateral pleural effusions", [[10, 40, 20, 20], [50, 40, 20, 20]]),
    ("Pneumonia", "right lower lobe airspace disease", [[14, 30, 22, 20]]),
    ("Lung Opacity", "patchy opacity at the right base", [[0, 30, 12, 30]]),  # partly outside the crop
]
WIDTH, HEIGHT = 80, 64


@pytest.fixture(scope="module")
def comps(tiny_model):
    from cxrdiff.models import load_components

    return load_components(tiny_model)


def _image(boxes, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(20, 60, size=(HEIGHT, WIDTH)).astype(np.uint8)
    for x, y, w, h in boxes:
        img[y : y + h, x : x + w] = 200
    return img


@pytest.fixture(scope="module")
def ms_cxr(tmp_path_factory, comps):
    """prepared/ms_cxr.parquet + a 'prepare' manifest, latents from the tiny model's VAE."""
    from cxrdiff.data import latent_to_bytes
    from cxrdiff.images import box_to_frame, resize_center_crop, to_model_input

    folder = tmp_path_factory.mktemp("prepared")
    records = []
    for i, (category, phrase, boxes) in enumerate(ROWS):
        grey = resize_center_crop(_image(boxes, i), comps.resolution)
        with torch.no_grad():
            posterior = comps.vae.encode(to_model_input(grey)).latent_dist
        mean, logvar = posterior.mean[0].numpy(), posterior.logvar[0].numpy()
        records.append(
            {
                "dicom_id": f"d{i}",
                "subject_id": 10000000 + i,
                "study_id": 50000000 + i,
                "category_name": category,
                "label_text": phrase,
                "boxes": [box_to_frame(b, WIDTH, HEIGHT, comps.resolution) for b in boxes],
                "boxes_original": [[float(v) for v in b] for b in boxes],
                "image_width": WIDTH,
                "image_height": HEIGHT,
                "image_path": f"files/d{i}.jpg",  # not present: overlays decode the latent
                "latent_mean": latent_to_bytes(mean),
                "latent_logvar": latent_to_bytes(logvar),
                "latent_shape": list(mean.shape),
            }
        )
    pd.DataFrame(records).to_parquet(folder / "ms_cxr.parquet", index=False)
    write_manifest(folder, "prepare", extra={"scaling_factor": comps.scaling_factor})
    return folder / "ms_cxr.parquet"


def _config(tiny_model, out, **kw):
    return GroundConfig(model=tiny_model, out=out, **{"steps": 3, "window": 2, **kw})


@pytest.mark.slow
def test_end_to_end_writes_every_output(tiny_model, ms_cxr, tmp_path, tokenizer):
    out = tmp_path / "ground"
    config = _config(tiny_model, out, data=ms_cxr, noise_seeds=2, batch_size=len(ROWS), min_word_count=1)
    result = ground(config)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == "ground"
    for name in ("heatmaps.npz", "scores.parquet", "words.parquet", "summary.json"):
        assert name in manifest["files"]
    assert not (out / ".parts").exists()

    scores = pd.read_parquet(out / "scores.parquet")
    assert sorted(scores["run"].unique()) == [0, 1]
    assert len(scores) == 2 * len(ROWS)
    assert scores[["auc_roc", "top1", "cnr"]].notna().all().all()
    assert scores["auc_roc"].between(0, 1).all()
    first = scores[(scores["run"] == 0) & (scores["sample"] == "000000")].iloc[0]
    assert first["token_source"] == "class"
    expected = [p for w in ("pleural", "effusion") for span in _spans(tokenizer, ROWS[0][1], w) for p in span]
    assert list(first["tokens"]) == expected
    assert first["token_text"] == " ".join(tokenizer.tokenize("pleural effusion"))
    sides = scores[scores["run"] == 0]["side"].tolist()
    assert sides == ["left", "", "bilateral", "right", "right"]  # ROWS' phrases: bilateral and unsided have no value
    assert scores["laterality"].isna().tolist() == [s not in ("left", "right") for s in sides] * 2
    assert json.loads((out / "summary.json").read_text())["laterality"]["n"] == 3
    fallback = scores[scores["category"] == "Pneumonia"].iloc[0]
    assert fallback["token_source"] == "all" and len(fallback["tokens"]) == len(ROWS[3][1].split())

    with np.load(out / "heatmaps.npz") as maps:
        assert sorted(maps.files) == sorted(f"{i:06d}_r{r}" for i in range(len(ROWS)) for r in range(2))
        heat = maps["000000_r0"]
    assert heat.shape == (16, 16)  # the tiny model's latent grid
    # the stored score is the metric of the stored heatmap, normalised and resized, against the box mask
    from cxrdiff.ground import normalise, to_frame
    from cxrdiff.images import boxes_mask

    frame = to_frame(normalise(heat), 64)
    mask = boxes_mask(pd.read_parquet(ms_cxr)["boxes"][0], 64)
    assert first["auc_roc"] == pytest.approx(auc_roc(frame, mask))
    assert first["cnr"] == pytest.approx(cnr(frame, mask))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["conventions"]["cnr"] == "signed" and summary["conventions"]["boxes"] == "union"
    assert summary["conventions"]["frame_size"] == 64
    assert set(summary["classes"]) == {r[0] for r in ROWS}
    run_means = [scores[scores["run"] == r]["auc_roc"].mean() for r in (0, 1)]
    assert summary["average"]["auc_roc"]["mean"] == pytest.approx(np.mean(run_means))
    assert summary["average"]["auc_roc"]["std"] == pytest.approx(np.std(run_means, ddof=1))
    assert result["auc_roc"] == pytest.approx(summary["average"]["auc_roc"]["mean"], abs=1e-4)
    words = pd.read_parquet(out / "words.parquet")
    assert {"<SOS>", "<EOS>", "pleural", "cardiomegaly"} <= set(words["word"])
    top = summary["word_analysis"]["top3"]["Pleural Effusion"]
    assert 1 <= len(top) <= 3 and top == sorted(top, key=lambda r: -r["cnr"])
    assert sorted(p.name for p in (out / "overlays").glob("*.png")) == [f"{i:06d}.png" for i in range(len(ROWS))]

    # a second run of the same command finds the work done and leaves the files alone
    stamp = (out / "heatmaps.npz").stat().st_mtime_ns
    assert ground(config) == result
    assert (out / "heatmaps.npz").stat().st_mtime_ns == stamp


def _spans(tokenizer, phrase, word):
    from cxrdiff.tokens import word_token_spans

    return word_token_spans(tokenizer, phrase, word)


def test_other_conventions_per_box_original_frame_abs(tiny_model, ms_cxr, tmp_path):
    out = tmp_path / "g"
    ground(
        _config(
            tiny_model,
            out,
            data=ms_cxr,
            steps=2,
            window=1,
            boxes="per-box",
            frame="original",
            cnr="abs",
            limit=3,
            overlays=False,
            batch_size=3,
        )
    )
    scores = pd.read_parquet(out / "scores.parquet")
    assert list(scores["box"]) == [0, 0, 0, 1]  # the third sample has two boxes
    assert (scores["cnr"] >= 0).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conventions"] == {**summary["conventions"], "cnr": "abs", "boxes": "per-box", "frame": "original"}
    assert not (out / "overlays").exists()


def test_planted_attention_is_found(tiny_model, ms_cxr, tmp_path, tokenizer, monkeypatch):
    """Cross-attention forced to put the word's mass in the lower right quarter: the heatmap peaks there."""
    from diffusers.models.attention_processor import Attention

    from cxrdiff.attention import layer_grid

    phrase = ROWS[0][1]
    (span,) = _spans(tokenizer, phrase, "effusion")
    original = Attention.get_attention_scores

    def planted(self, query, key, attention_mask=None):
        probs = original(self, query, key, attention_mask).clone()  # (batch*heads, hw, tokens)
        h, w = layer_grid(probs.shape[1], (16, 16))
        region = torch.zeros(h, w, dtype=torch.bool)
        region[h // 2 :, w // 2 :] = True
        probs[:, region.flatten().nonzero()[:, 0][:, None], torch.tensor(span)[None]] += 5.0
        return probs / probs.sum(-1, keepdim=True)

    monkeypatch.setattr(Attention, "get_attention_scores", planted)
    out = tmp_path / "planted"
    ground(_config(tiny_model, out, data=ms_cxr, word=("effusion",), limit=1, overlays=False))
    with np.load(out / "heatmaps.npz") as maps:
        heat = maps["000000"]
    peak = np.unravel_index(heat.argmax(), heat.shape)
    assert peak[0] >= 8 and peak[1] >= 8
    region = np.zeros((64, 64), dtype=bool)
    region[32:, 32:] = True
    from cxrdiff.ground import normalise, to_frame

    assert cnr(to_frame(normalise(heat), 64), region) > 1.0
    scores = pd.read_parquet(out / "scores.parquet")
    assert list(scores["tokens"][0]) == span and scores["token_source"][0] == "word"
    assert scores["cnr"][0] > 0  # the box lies in the lower right
    # "left" effusion, attention planted on the image's right (the patient's left): laterality above 0.5, and
    # the stored value is the share of the stored map's mass right of the midline, computed here by hand
    frame = to_frame(normalise(heat), 64)
    assert scores["side"][0] == "left"
    assert scores["laterality"][0] == pytest.approx(frame[:, 32:].sum() / frame.sum()) and scores["laterality"][0] > 0.6
    summary = json.loads((out / "summary.json").read_text())["laterality"]
    assert summary["counts"] == {"left": 1, "right": 0, "bilateral": 0, "none": 0} and summary["n"] == 1
    assert summary["mean"] == {"mean": pytest.approx(scores["laterality"][0]), "std": 0.0}
    assert summary["on_named_side"]["mean"] == 1.0


def test_capture_maps_guidance_and_invert_restore_the_unet(comps, ms_cxr, tmp_path):
    from cxrdiff.data import latent_from_bytes

    row = pd.read_parquet(ms_cxr).iloc[0]
    latents = torch.from_numpy(latent_from_bytes(row["latent_mean"], row["latent_shape"]))[None] * comps.scaling_factor
    context = encode_text(comps, [row["label_text"]], "cpu")
    uncond = encode_text(comps, [""], "cpu")
    probe = torch.randn(1, *comps.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = comps.unet(probe, 10, encoder_hidden_states=context).sample
    config = GroundConfig(model=Path("m"), out=tmp_path, steps=2, window=2)
    plain = capture_maps(comps, latents, context, config, seeds=[0])
    again = capture_maps(comps, latents, context, config, seeds=[0])
    torch.testing.assert_close(plain, again)  # same seed, same maps
    guided = capture_maps(comps, latents, context, dataclasses.replace(config, guidance=3.0), seeds=[0], uncond=uncond)
    # the conditional half of a guidance batch sees the same inputs as the unguided batch in noise mode
    torch.testing.assert_close(guided, plain, atol=1e-5, rtol=1e-4)
    inverted = capture_maps(
        comps, latents, context, dataclasses.replace(config, mode="invert", guidance=2.0), seeds=[0], uncond=uncond
    )
    assert inverted.shape == plain.shape and torch.isfinite(inverted).all()
    with torch.no_grad():
        assert torch.equal(comps.unet(probe, 10, encoder_hidden_states=context).sample, before)


def test_token_choice_rules(tokenizer):
    from cxrdiff.ground import GroundingInput

    s = GroundingInput(sample="000000", phrase="Mild cardiac enlargement", latent=None, category="Cardiomegaly")
    assert choose_tokens(tokenizer, s, None) == (_spans(tokenizer, s.phrase, "cardiac")[0], "class")
    assert choose_tokens(tokenizer, s, ("enlargement",)) == (_spans(tokenizer, s.phrase, "enlargement")[0], "word")
    positions, source = choose_tokens(tokenizer, s, ("effusion",))  # absent word: all word tokens
    assert source == "all" and positions[0] == 1


@pytest.mark.parametrize(
    ("category", "phrase", "words"),
    [
        ("Mass", "Large mass in the left upper lobe", ("mass",)),
        ("Nodule", "Two nodules at the right base", ("nodules",)),
        ("Infiltration", "Patchy infiltrates at both bases", ("infiltrates",)),
        ("Pleural Effusion", "Effusion", ("Effusion",)),  # NIH's name, shown under the paper's class
    ],
)
def test_nih_box_classes_ground_on_their_class_words(tokenizer, category, phrase, words):
    """NIH ChestX-ray14's box classes have class words (cxrdiff.data.CLASS_WORDS), so a phrase is grounded on
    them, not on every word token."""
    from cxrdiff.ground import GroundingInput

    s = GroundingInput(sample="000000", phrase=phrase, latent=None, category=category)
    expected = sorted(p for w in words for p in _spans(tokenizer, phrase, w)[0])
    assert choose_tokens(tokenizer, s, None) == (expected, "class")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"window": 5}, "--window 5"),
        ({"guidance": 0.5}, "--guidance"),
        ({"image": Path("x.png"), "prompt": "a"}, "exactly one of --data"),
        ({"prompt": "a"}, "--prompt"),
        ({"steps": 0}, "--steps"),
        ({"steps": 2000, "window": 40}, "--steps 2000: above the 1000 steps the scheduler"),
    ],
)
def test_usage_errors(tiny_model, ms_cxr, tmp_path, change, message):
    with pytest.raises(InputError, match=message):
        ground(dataclasses.replace(_config(tiny_model, tmp_path / "o", data=ms_cxr), **change))


def test_single_image_word_not_in_prompt(tiny_model, tmp_path, monkeypatch):
    from PIL import Image

    import cxrdiff.models

    image = tmp_path / "x.png"
    Image.fromarray(_image([[40, 30, 30, 30]], 0)).save(image)
    monkeypatch.setattr(cxrdiff.models, "load_components", None)  # must fail before any weight is read
    config = GroundConfig(model=tiny_model, out=tmp_path / "o", image=image, prompt="left effusion", word=("edema",))
    with pytest.raises(InputError, match="'edema' does not occur"):
        ground(config)
    with pytest.raises(InputError, match="image not found"):
        ground(dataclasses.replace(config, image=tmp_path / "missing.png"))


def test_data_errors(tiny_model, ms_cxr, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    pd.read_parquet(ms_cxr).drop(columns=["boxes"]).to_parquet(bad / "ms_cxr.parquet")
    with pytest.raises(InputError, match=r"ms_cxr.parquet: not in a `cxrdiff prepare` output folder \(no manifest"):
        ground(_config(tiny_model, tmp_path / "o", data=bad / "ms_cxr.parquet"))
    monkeypatch.chdir(bad)  # a file given by its bare name: the folder is named, not "."
    with pytest.raises(InputError, match=r"^--data ms_cxr.parquet: not in a `cxrdiff prepare` output folder"):
        ground(_config(tiny_model, tmp_path / "o", data=Path("ms_cxr.parquet")))
    write_manifest(bad, "prepare")
    with pytest.raises(InputError, match="missing column"):
        ground(_config(tiny_model, tmp_path / "o", data=bad / "ms_cxr.parquet"))
    other = tmp_path / "other"
    write_manifest(other, "sample")
    with pytest.raises(InputError, match="'sample' folder"):
        ground(_config(tiny_model, other, data=ms_cxr))


@pytest.mark.slow
def test_single_image_cli(tiny_model, tmp_path, tokenizer):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.fromarray(_image([[40, 30, 30, 30]], 0)).save(image)
    exe = Path(sys.executable).with_name("cxrdiff")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [str(exe), "--json", "ground", "--model", str(tiny_model), "--image", str(image)]
    prompt = "small left pleural effusion"
    out = tmp_path / "single"
    run = subprocess.run(
        [*base, "--out", str(out), "--prompt", prompt, "--word", "effusion", "--steps", "2", "--window", "2"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["heatmaps"] == str(out / "heatmaps.npz") and "scores" not in result
    with np.load(out / "heatmaps.npz") as maps:
        assert maps.files == ["000000"] and maps["000000"].shape == (16, 16)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == _spans(tokenizer, prompt, "effusion")[0]
    with Image.open(out / "overlays" / "000000.png") as png:  # the 80 × 64 image enlarged 4 times, title, bar
        assert 4 * WIDTH < png.size[0] < 4 * WIDTH + 200 and 4 * HEIGHT < png.size[1] < 4 * HEIGHT + 80, png.size
    assert json.loads((out / "manifest.json").read_text())["step"] == "ground"


def test_killed_run_resumes_finished_batches(tiny_model, ms_cxr, tmp_path, monkeypatch):
    import cxrdiff.ground.capture as ground_module

    calls = []
    real = ground_module.capture_maps

    def failing_after_first(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the job is killed during the second batch
        return real(*args, **kwargs)

    out = tmp_path / "resume"
    config = _config(tiny_model, out, data=ms_cxr, steps=2, window=1, limit=2, batch_size=1, overlays=False)
    monkeypatch.setattr(ground_module, "capture_maps", failing_after_first)
    with pytest.raises(KeyboardInterrupt):
        ground(config)
    assert (out / ".parts" / "r000-c00000.json").is_file() and not (out / "manifest.json").exists()
    calls.clear()
    monkeypatch.setattr(ground_module, "capture_maps", lambda *a, **k: calls.append(1) or real(*a, **k))
    ground(config)
    assert len(calls) == 1  # only the unfinished batch ran again
    assert sorted(pd.read_parquet(out / "scores.parquet")["sample"]) == ["000000", "000001"]
    # a different setting is refused (naming it) instead of mixing or silently replacing results
    calls.clear()
    with pytest.raises(OtherSettings, match=r"finished 'ground' run made with other settings \(window 1 → 2\)"):
        ground(dataclasses.replace(config, window=2))
    assert calls == []


def test_data_word_in_no_phrase_is_refused_before_weights(tiny_model, ms_cxr, tmp_path, monkeypatch):
    """A mistyped --word would otherwise fall back to all tokens in every sample, silently."""
    import cxrdiff.models

    monkeypatch.setattr(cxrdiff.models, "load_components", None)  # must fail before any weight is read
    with pytest.raises(InputError, match="--word 'efusion': occurs in none of the"):
        ground(dataclasses.replace(_config(tiny_model, tmp_path / "o", data=ms_cxr), word=("efusion",)))
    assert not (tmp_path / "o").exists()


# --- Table 6, the latent, the box rule ----------------------------------------------------------


def test_word_candidates_keep_case_and_include_start_and_end(tokenizer):
    from cxrdiff.ground import word_positions

    found = word_positions(tokenizer, "Small left pleural effusion, small.")
    assert list(found) == ["<SOS>", "Small", "left", "pleural", "effusion", "small", "<EOS>"]

    def n_tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    assert found["<SOS>"] == 0 and found["Small"] == 1
    assert found["small"] == 1 + n_tokens("Small left pleural effusion,")  # the second "small", own row
    assert found["<EOS>"] == 1 + n_tokens("Small left pleural effusion, small.")


def _word_rows(per_class: dict[str, list[dict[str, float]]], runs: int = 1) -> pd.DataFrame:
    """words.parquet rows from hand-written phrases: per class, one dict word → CNR per phrase."""
    rows, sample = [], 0
    for category, phrases in per_class.items():
        for words in phrases:
            for run in range(runs):
                rows += [
                    {"run": run, "sample": f"{sample:06d}", "category": category, "word": w, "cnr": c + run}
                    for w, c in words.items()
                ]
            sample += 1
    return pd.DataFrame(rows, columns=["run", "sample", "category", "word", "cnr"])


def test_word_analysis_counts_per_class_keeps_case_and_honours_the_threshold():
    from cxrdiff.ground import word_analysis

    special = {"<SOS>": -0.5, "<EOS>": 0.4}
    cardio = [{**special, "cardiomegaly": 1.0, "Moderate": 0.9}] * 3 + [{**special, "cardiomegaly": 1.2}]
    # "small" 3 times in Pneumothorax; "Small" twice (another word: case kept); "left" 3 times in
    # Pneumothorax but also 4 times in Cardiomegaly-free Edema rows: counted per class, never pooled
    ptx = [{**special, "small": 0.2, "left": 0.8}] * 3 + [{**special, "Small": 2.0}] * 2
    edema = [{**special, "left": 5.0, "edema": 1.5}] * 4
    words = _word_rows({"Cardiomegaly": cardio, "Pneumothorax": ptx, "Edema": edema})
    result = word_analysis(words, min_count=2)  # more than 2 phrases of the class
    assert result["min_count"] == 2 and result["counting"] == "per class, case kept"
    assert result["counts"]["Cardiomegaly"] == {"<EOS>": 4, "<SOS>": 4, "cardiomegaly": 4, "Moderate": 3}
    assert result["counts"]["Pneumothorax"] == {"<EOS>": 5, "<SOS>": 5, "left": 3, "small": 3}  # "Small": 2
    top = result["top3"]["Cardiomegaly"]
    assert [(r["word"], r["n"]) for r in top] == [("cardiomegaly", 4), ("Moderate", 3), ("<EOS>", 4)]
    assert top[0]["cnr"] == pytest.approx((3 * 1.0 + 1.2) / 4)
    assert [r["word"] for r in result["top3"]["Pneumothorax"]] == ["left", "<EOS>", "small"]  # "Small" 2.0: too rare
    assert [r["word"] for r in result["top3"]["Edema"]] == ["left", "edema", "<EOS>"]
    assert result["top3"]["Edema"][0]["cnr"] == pytest.approx(5.0)  # Pneumothorax's "left" not mixed in
    assert result["eos_cnr"] == pytest.approx(0.4)
    # the class's own words among the ranked, whatever their rank ("Moderate" is no Cardiomegaly word)
    assert [(w["word"], w["n"]) for w in result["class_words"]["Cardiomegaly"]] == [("cardiomegaly", 4)]
    assert [w["word"] for w in result["class_words"]["Edema"]] == ["edema"]
    assert result["class_words"]["Pneumothorax"] == []
    stricter = word_analysis(words, min_count=3)
    assert "Moderate" not in stricter["counts"]["Cardiomegaly"] and "left" not in stricter["counts"]["Pneumothorax"]
    # with two runs, counts come from the first run and the CNR is the mean over both runs
    twice = word_analysis(_word_rows({"Cardiomegaly": cardio}, runs=2), min_count=2)
    assert twice["counts"]["Cardiomegaly"]["cardiomegaly"] == 4
    assert twice["top3"]["Cardiomegaly"][0]["cnr"] == pytest.approx((3 * 1.0 + 1.2) / 4 + 0.5)


def test_grounded_latent_mean_or_a_seeded_posterior_draw():
    from cxrdiff.ground import GroundingInput, grounded_latent

    rng = np.random.default_rng(0)
    mean = rng.normal(size=(4, 8, 8)).astype(np.float32)
    logvar = np.full((4, 8, 8), np.log(0.25), np.float32)  # std 0.5
    sample = GroundingInput(sample="000007", phrase="x", latent=mean, logvar=logvar)
    assert grounded_latent(sample, GroundConfig(latent="mean"), run=0) is mean
    drawn = grounded_latent(sample, GroundConfig(latent="sample", seed=3), run=1)
    eps = np.random.default_rng(np.random.SeedSequence([3 + 1, 7, 1])).standard_normal((4, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(drawn, mean + 0.5 * eps, rtol=1e-6)
    assert np.array_equal(drawn, grounded_latent(sample, GroundConfig(latent="sample", seed=3), run=1))
    assert not np.allclose(drawn, grounded_latent(sample, GroundConfig(latent="sample", seed=3), run=0))
    other = GroundingInput(sample="000008", phrase="x", latent=mean, logvar=logvar)
    assert not np.allclose(drawn, grounded_latent(other, GroundConfig(latent="sample", seed=3), run=1))


def test_union_joins_an_image_and_class_across_phrases_per_phrase_keeps_them_apart(tiny_model, ms_cxr, tmp_path):
    """Two phrases of one image and class with different boxes: `union` (Table 1) scores each phrase
    against both boxes, `per-phrase` (Table 3) against its own."""
    from cxrdiff.ground import load_samples

    table = pd.read_parquet(ms_cxr)
    extra = table.iloc[[0]].copy()
    extra["label_text"] = "left effusion"
    extra["boxes"] = [[[4.0, 4.0, 8.0, 8.0]]]
    extra["boxes_original"] = [[[5.0, 5.0, 10.0, 10.0]]]
    folder = tmp_path / "prepared"
    folder.mkdir()
    pd.concat([table, extra], ignore_index=True).to_parquet(folder / "ms_cxr.parquet", index=False)
    write_manifest(folder, "prepare", extra={"scaling_factor": 0.18215})
    own = [list(map(float, b)) for b in table["boxes"][0]]
    union = load_samples(_config(tiny_model, tmp_path / "g", data=folder / "ms_cxr.parquet"))
    assert union[0].boxes == [*own, [4.0, 4.0, 8.0, 8.0]] and union[-1].boxes == union[0].boxes
    assert union[0].boxes_original[-1] == [5.0, 5.0, 10.0, 10.0]
    assert union[2].boxes == [list(map(float, b)) for b in table["boxes"][2]]  # another image: its own
    apart = load_samples(_config(tiny_model, tmp_path / "g", data=folder / "ms_cxr.parquet", boxes="per-phrase"))
    assert apart[0].boxes == own and apart[-1].boxes == [[4.0, 4.0, 8.0, 8.0]]
    assert union[0].logvar is not None and apart[0].logvar is not None  # --latent sample reads the log-variance
    mean_only = load_samples(_config(tiny_model, tmp_path / "g", data=folder / "ms_cxr.parquet", latent="mean"))
    assert mean_only[0].logvar is None


def test_latents_prepared_with_another_scaling_factor_are_refused(tiny_model, ms_cxr, tmp_path, monkeypatch):
    import shutil

    import cxrdiff.models
    from cxrdiff.cli import main
    from cxrdiff.ground import check_inputs

    other = tmp_path / "prepared"
    other.mkdir()
    shutil.copy(ms_cxr, other / "ms_cxr.parquet")
    write_manifest(other, "prepare", extra={"scaling_factor": 0.5})
    monkeypatch.setattr(cxrdiff.models, "load_components", None)  # refused before any weight is read
    config = _config(tiny_model, tmp_path / "o", data=other / "ms_cxr.parquet")
    with pytest.raises(
        InputError, match=r"scaling factor 0\.5, but --model .* has 0\.18215; .*--allow-scaling-mismatch"
    ):
        ground(config)
    argv = ["cxrdiff", "ground", "--model", str(tiny_model), "--data", str(other / "ms_cxr.parquet"), "--out",
            str(tmp_path / "o")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2 and not (tmp_path / "o").exists()
    check_inputs(dataclasses.replace(config, allow_scaling_mismatch=True))  # allowed: no error


@pytest.mark.slow
def test_single_image_from_pacs_a_dicom_without_suffix(tiny_model, tmp_path, comps):
    """`--image` takes a DICOM as PACS exports it (no suffix); its latent is that of its converted picture."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from cxrdiff.images import load_grayscale, resize_center_crop, to_model_input

    grey = _image([[40, 30, 30, 30]], 0)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta, ds.Modality, ds.Rows, ds.Columns = meta, "CR", *grey.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation, ds.PixelData = "MONOCHROME2", (grey.astype("<u2") * 16).tobytes()
    image = tmp_path / "IM0001"
    ds.save_as(image, enforce_file_format=True)
    out = tmp_path / "single"
    ground(GroundConfig(model=tiny_model, out=out, image=image, prompt="left effusion", steps=2, window=2))
    with np.load(out / "heatmaps.npz") as maps:
        assert maps["000000"].shape == (16, 16)
    from cxrdiff.ground.single import encode_image

    latent = encode_image(comps, image, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        expected = comps.vae.encode(to_model_input(resize_center_crop(load_grayscale(image), 64))).latent_dist.mean
    np.testing.assert_allclose(latent[0], expected[0].numpy(), atol=1e-5)  # (mean, logvar)[0]


def test_a_single_images_overlay_is_drawn_at_the_images_own_size(tmp_path):
    """--image's overlay: the image's pixels one for one (here 384 × 256, not the model's 64 px frame), the map
    taken back through prepare's centre crop (the cut-away sides show 0), a title and a colour bar beside."""
    import io

    from PIL import Image

    from cxrdiff.ground import image_overlay

    Image.fromarray(np.full((256, 384), 128, np.uint8)).save(tmp_path / "wide.png")
    heat = np.zeros((16, 16), np.float32)
    heat[:, 8:] = 1.0  # the right half of the frame, which is the image's middle 256 columns (64 cut each side)
    config = GroundConfig(image=tmp_path / "wide.png", prompt="mild cardiomegaly", word=("cardiomegaly",))
    with Image.open(io.BytesIO(image_overlay(config, heat, 64))) as png:
        rgb = np.asarray(png.convert("RGB")).astype(int)
    assert 384 < rgb.shape[1] < 384 + 120 and 256 < rgb.shape[0] < 256 + 80, rgb.shape  # title above, bar right
    is_hot = rgb[..., 0] > rgb[..., 2] + 40  # jet's 1 (dark red) over the grey
    is_cold = rgb[..., 2] > rgb[..., 0] + 40  # jet's 0 (dark blue) over the grey
    rows = np.flatnonzero(is_hot.sum(axis=1) > 100)  # the image's rows: >100 hot pixels (the bar has a few)
    assert 250 <= len(rows) <= 256  # the image is 256 px high, one pixel per pixel
    row = rows[len(rows) // 2]
    hot, cold = np.flatnonzero(is_hot[row]), np.flatnonzero(is_cold[row])
    assert 120 <= len(hot) <= 136  # the crop's right 128 columns (blended over a few at the edge)
    assert 185 <= len(cold[cold < hot.min()]) <= 195  # 64 cut away + the crop's left 128 columns, at 0
    assert 60 <= len(cold[(cold > hot.max()) & (cold < hot.max() + 80)]) <= 66  # the right 64 cut away: 0


def test_the_settings_key_spells_noise_seeds_as_runs_and_precision_as_dtype(tiny_model, tmp_path):
    """GroundConfig.KEY_SPELLING: the key holds `runs` and `dtype` (torch's names), not the fields' names."""
    from cxrdiff.ground import GroundConfig, ground_settings

    key = ground_settings(GroundConfig(model=tiny_model, out=tmp_path / "g", noise_seeds=3, precision="bf16"))
    assert (key["runs"], key["dtype"]) == (3, "bfloat16") and "noise_seeds" not in key and "precision" not in key
    assert ground_settings(GroundConfig(model=tiny_model, out=tmp_path / "g"))["dtype"] == "auto"


def test_a_model_with_a_nan_weight_is_an_error_naming_the_phrase_not_chance(tiny_model, ms_cxr, tmp_path):
    """One NaN weight makes every attention map NaN: that must stop the run (exit 1) naming the phrase and the
    cause, not score AUC 0.5 / CNR 0 as if the model had looked nowhere in particular."""
    import shutil

    from safetensors.torch import load_file, save_file

    from cxrdiff.errors import RunError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights_file = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    weights["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(weights, weights_file)
    out = tmp_path / "g"
    expected = r"sample 000000 \('Small left pleural effusion\.'\): .*not finite.*UNet weight conv_in\.weight"
    with pytest.raises(RunError, match=expected):
        ground(_config(broken, out, data=ms_cxr, limit=1, steps=2, window=1, overlays=False))
    assert RunError.exit_code == 1
    assert not (out / "scores.parquet").exists() and not (out / "manifest.json").exists()


def test_absurd_guidance_is_a_range_error(tiny_model, ms_cxr, tmp_path):
    with pytest.raises(InputError, match=r"--guidance.*1e\+30"):
        ground(_config(tiny_model, tmp_path / "o", data=ms_cxr, mode="invert", guidance=1e30))


@pytest.mark.parametrize(("width", "height"), [(1, 3000), (31, 64)])
def test_an_image_below_the_models_resolution_is_refused_before_weights(tiny_model, tmp_path, monkeypatch, width,
                                                                         height):  # fmt: skip
    """The tiny model's frame is 64 px: an image whose short side is under 32 px is refused as prepare refuses it
    (a 1 × 3,000 px image would otherwise be enlarged 64 times into a 768,066 px tall overlay)."""
    from PIL import Image

    import cxrdiff.models

    image = tmp_path / "thin.png"
    Image.fromarray(np.full((height, width), 100, np.uint8)).save(image)
    monkeypatch.setattr(cxrdiff.models, "load_components", None)  # must fail before any weight is read
    config = GroundConfig(model=tiny_model, out=tmp_path / "o", image=image, prompt="left effusion")
    with pytest.raises(InputError, match=rf"^--image {image}: {width}x{height} px is too small for the model's 64 px"):
        ground(config)
    assert not (tmp_path / "o").exists()


def test_a_long_images_overlay_is_bounded(tmp_path):
    """An image of 40 × 6,000 px (allowed: its short side is over half the frame) would be drawn 7 times enlarged,
    42,000 px tall; the overlay's longest side stays within the figure bound, titles and colour bar included."""
    import io

    from PIL import Image

    from cxrdiff.figures import MAX_FIGURE_PIXELS
    from cxrdiff.ground import image_overlay

    Image.fromarray(np.full((6000, 40), 128, np.uint8)).save(tmp_path / "long.png")
    config = GroundConfig(image=tmp_path / "long.png", prompt="left effusion")
    with Image.open(io.BytesIO(image_overlay(config, np.ones((16, 16), np.float32), 64))) as png:
        assert MAX_FIGURE_PIXELS * 0.9 < max(png.size) <= MAX_FIGURE_PIXELS + 100, png.size  # + the title's margin


@pytest.mark.slow
def test_shards_and_two_ranks_equal_one_process(tiny_model, ms_cxr, tmp_path):
    """Shard 1/2 then 0/2 (the last merges), and 2 gloo ranks × 2 shards at once, give one process's tables."""
    config = _config(tiny_model, tmp_path / "one", data=ms_cxr, steps=2, window=1, batch_size=1, noise_seeds=2)
    ground(config)
    first = ground(dataclasses.replace(config, out=tmp_path / "shards", shard="1/2"))
    n_batches = 2 * len(ROWS)
    assert first == {"out": str(tmp_path / "shards"), "complete": False, "missing_batches": n_batches - n_batches // 2}
    with pytest.raises(RunError, match=f"{n_batches - n_batches // 2} batches missing"):
        ground(dataclasses.replace(config, out=tmp_path / "shards", finalize=True))
    ground(dataclasses.replace(config, out=tmp_path / "shards", shard="0/2"))

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    args = ["ground", "--model", str(tiny_model), "--data", str(ms_cxr), "--out", str(tmp_path / "grid"),
            "--steps", "2", "--window", "1", "--batch-size", "1", "--noise-seeds", "2"]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cxrdiff"]
    procs = [subprocess.Popen([*launch, *args, "--shard", f"{i}/2"], env=env, stderr=subprocess.PIPE, text=True)
             for i in range(2)]  # fmt: skip
    assert [p.wait(timeout=400) for p in procs] == [0, 0], [p.communicate()[1][-2000:] for p in procs]
    # in this process: exactly one process's numbers; in other processes, float32 rounding (oneDNN picks its
    # kernels per process) moves the maps' last bits, so those are compared to 1e-5
    for folder, exact in (("shards", True), ("grid", False)):
        for table in ("scores.parquet", "words.parquet"):
            got, want = pd.read_parquet(tmp_path / folder / table), pd.read_parquet(tmp_path / "one" / table)
            pd.testing.assert_frame_equal(got, want, check_exact=exact, rtol=1e-4, atol=1e-5)
        with np.load(tmp_path / folder / "heatmaps.npz") as got, np.load(tmp_path / "one" / "heatmaps.npz") as want:
            assert sorted(got.files) == sorted(want.files)
            for k in want.files:
                assert np.array_equal(got[k], want[k]) if exact else np.allclose(got[k], want[k], atol=1e-5), k
        assert read_manifest(tmp_path / folder, "ground") and not (tmp_path / folder / ".parts").exists()
