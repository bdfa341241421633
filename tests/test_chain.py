"""The steps chained through their folders on phantom data: prepare → finetune → sample → ground."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_prepared import tiny_run

from cxrdiff.artifacts import manifest_hash, read_manifest


@pytest.mark.slow
def test_phantom_prepare_finetune_sample_ground(phantom_prepared, tiny_model, tmp_path):
    from cxrdiff.finetune import finetune
    from cxrdiff.ground import GroundConfig, ground
    from cxrdiff.models import load_components
    from cxrdiff.sample import SampleConfig, sample

    run = tmp_path / "frozen"
    finetune(tiny_run(phantom_prepared, tiny_model, run, per_device_batch_size=None, lr=1e-3))
    manifest = read_manifest(run, "finetune")
    assert manifest["inputs"]["data"]["manifest_sha256"] == manifest_hash(phantom_prepared)

    samples = tmp_path / "samples"
    sample(SampleConfig(model=run, out=samples, prompts=phantom_prepared / "test.parquet", limit=3, steps=3))
    table = pd.read_parquet(samples / "samples.parquet")
    test = pd.read_parquet(phantom_prepared / "test.parquet")
    assert list(table["prompt"]) == list(test["impression"][:3])
    assert all((samples / f).is_file() for f in table["file"])

    comps = load_components(run)
    latents = torch.randn(2, *comps.latent_shape, generator=torch.Generator().manual_seed(0))
    context = comps.text_encoder(
        comps.tokenizer(["pleural effusion"] * 2, padding="max_length", return_tensors="pt").input_ids
    )[0]
    with torch.no_grad():
        before = comps.unet(latents, 500, context).sample

    out = tmp_path / "ground"
    ground(GroundConfig(model=run, out=out, data=phantom_prepared / "ms_cxr.parquet", steps=4, window=3, limit=6))
    for name in ("heatmaps.npz", "scores.parquet", "words.parquet", "summary.json", "manifest.json"):
        assert (out / name).is_file(), name
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) > 0 and scores[["auc_roc", "top1", "cnr"]].notna().all().all()
    assert len(list((out / "overlays").glob("*.png"))) == len(scores)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conventions"]["cnr"] == "signed" and np.isfinite(summary["average"]["cnr"]["mean"])

    reloaded = load_components(run)  # grounding read the model and changed nothing in it
    with torch.no_grad():
        after = reloaded.unet(latents, 500, context).sample
    assert torch.equal(before, after)
