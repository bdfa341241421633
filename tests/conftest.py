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
