"""Session fixtures: the tiny model is built once and shared (tests must not modify it)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random SD2-shaped diffusers folder (64 px images, 16×16×4 latents, real CLIP vocabulary)."""
    from cxrdiff.model.tiny import write_tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    write_tiny_model(path, seed=0)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from cxrdiff.model.tiny import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="session")
def phantom_tree(tmp_path_factory):
    """A small phantom MIMIC-CXR tree (24 patients, 96 px wide, some DICOM); tests must not modify it."""
    from cxrdiff.phantom import PhantomConfig, make_phantom

    path = tmp_path_factory.mktemp("phantom") / "mimic"
    make_phantom(PhantomConfig(path, patients=24, seed=0, size=96, dicom_fraction=0.2, workers=0))
    return path


@pytest.fixture(scope="session")
def phantom_prepared(phantom_tree, tiny_model, tmp_path_factory):
    """`cxrdiff prepare` of `phantom_tree` with the tiny model (64 px, shards of 16); tests must not modify it."""
    from cxrdiff.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    config = PrepareConfig(
        mimic=phantom_tree,
        ms_cxr=phantom_tree / "MS_CXR_Local_Alignment_v1.0.0.csv",
        base_model=tiny_model,
        out=out,
        test_size=8,
        test_no_finding_max=0.25,
        batch_size=8,
        shard_size=16,
        workers=0,
    )
    prepare(config)
    return out


@pytest.fixture(scope="session")
def phantom_texts(phantom_prepared):
    """The impressions of `phantom_prepared`'s training shards (phantom report text)."""
    import pyarrow.parquet as pq

    shards = sorted(phantom_prepared.glob("train-*.parquet"))
    return [t for shard in shards for t in pq.read_table(shard, columns=["impression"]).column(0).to_pylist()]


@pytest.fixture(scope="session")
def tiny_bert(phantom_texts, tmp_path_factory):
    """A tiny random BERT (width 24, unlike the tiny UNet's 32) with a 120-entry WordPiece tokenizer trained
    offline on phantom text (so rarer words split into several pieces), context 64, as a local Hugging Face
    folder; tests must not modify it."""
    from cxrdiff.text_encoders import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert", phantom_texts, vocab_size=120)


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory):
    """A randomly initialised one-layer DINOv2 folder with its image processor (RadDino's kind, no download)."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("hf") / "tiny-dinov2"
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28, patch_size=14
    )
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    return folder
