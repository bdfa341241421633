"""The seed of each generated image, shared by the steps that draw the same noise: `sample` draws its images
with it and the report's memorization score its noise, so both reproduce from the recorded rule alone."""

from __future__ import annotations

import hashlib

SEED_RULE = 'int.from_bytes(sha256(f"cxrdiff-sample:{seed}:{prompt_index}:{repeat}".encode()).digest()[:8], "big") >> 1'


def image_seed(seed: int, prompt_index: int, repeat: int) -> int:
    """The generator seed of one image (`SEED_RULE`): a 63-bit integer from sha256, so it is stable across
    Python versions and platforms (unlike `hash`) and independent of batching and sharding."""
    digest = hashlib.sha256(f"cxrdiff-sample:{seed}:{prompt_index}:{repeat}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
