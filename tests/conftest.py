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
    from cxrdiff.models import write_tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    write_tiny_model(path, seed=0)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from cxrdiff.models import clip_tokenizer

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
