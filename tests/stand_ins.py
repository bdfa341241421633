"""The config classes of stand-in sample and ground steps (tests of the report pass stand-ins for the real
steps): the fields the report sets, with the real steps' defaults, frozen, with their NOT_SETTINGS."""

from __future__ import annotations

import dataclasses
from typing import ClassVar


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    NOT_SETTINGS: ClassVar[tuple[str, ...]] = ("out", "batch_size")
    model: object = None
    out: object = None
    prompts: object = None
    prompt_column: str = "impression"
    n_per_prompt: int = 1
    limit: int | None = None
    steps: int = 75
    guidance: float = 4.0
    scheduler: str = "pndm"
    seed: int = 0
    batch_size: int = 8


@dataclasses.dataclass(frozen=True)
class GroundConfig:
    NOT_SETTINGS: ClassVar[tuple[str, ...]] = ("out",)
    model: object = None
    out: object = None
    data: object = None
    steps: int = 50
    window: int = 40
    seed: int = 0
    limit: int | None = None
    min_word_count: int = 25
    boxes: str = "union"
