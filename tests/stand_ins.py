"""Stand-ins for the sample and ground steps that tests of the report pass instead of the real ones: folders of
the same shape, owned with StepFolder as the real steps own theirs (a finished folder with the same settings
returns at once, one made with other settings raises OtherSettings); their configs (the fields the report sets,
with the real steps' defaults and NOT_SETTINGS); and a hand-made feature network."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from PIL import Image

from cxrdiff.artifacts import StepFolder, input_identity
from cxrdiff.config import settings, to_dict
from cxrdiff.data import LABELS


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


def claim(cfg: Any, step: str, **inputs: Any) -> StepFolder:
    """The folder claim a real step makes: its settings with the model and `inputs` by identity."""
    identities = {k: input_identity(v) for k, v in inputs.items()}
    return StepFolder.claim(cfg.out, step, settings(cfg, model=input_identity(cfg.model), **identities))


def sample_step(
    image: Callable[[Any, np.random.Generator, int, int, Any], np.ndarray],
    seed: Callable[[Any], int] = lambda cfg: cfg.seed + cfg.n_per_prompt,
    on_call: Callable[[Any], None] = lambda cfg: None,
) -> Callable[[Any], dict]:
    """A sample step writing `image(cfg, rng, prompt_index, image_index, prompt_row)` (grey uint8) for each of
    `n_per_prompt` images of each prompt, and samples.parquet; `on_call(cfg)` when it does work."""

    def sample(cfg: Any) -> dict:
        folder = claim(cfg, "sample", prompts=cfg.prompts)
        if folder.finished:
            return {}
        on_call(cfg)
        test = pd.read_parquet(cfg.prompts).head(cfg.limit)
        rng = np.random.default_rng(seed(cfg))
        rows = []
        for p, (_, row) in enumerate(test.iterrows()):
            for r in range(cfg.n_per_prompt):
                i = p * cfg.n_per_prompt + r
                Image.fromarray(image(cfg, rng, p, i, row)).save(cfg.out / f"{i:06d}.png")
                labels = {c: row[c] for c in LABELS if c in row}
                rows.append({"index": i, "file": f"{i:06d}.png", "prompt": str(row[cfg.prompt_column]),
                             "prompt_index": p, "repeat": r, **labels})  # fmt: skip
        pd.DataFrame(rows).to_parquet(cfg.out / "samples.parquet")
        folder.finish(config=to_dict(cfg), inputs={"model": cfg.model}, seed=cfg.seed)
        return {}

    return sample


def ground_step(write: Callable[[Any], None]) -> Callable[[Any], dict]:
    """A ground step whose `write(cfg)` fills the folder (summary.json at least)."""

    def ground(cfg: Any) -> dict:
        folder = claim(cfg, "ground", data=cfg.data)
        if folder.finished:
            return {}
        write(cfg)
        folder.finish(config=to_dict(cfg), inputs={"model": cfg.model}, seed=cfg.seed)
        return {}

    return ground


def steps(sample: Callable[[Any], dict], ground: Callable[[Any], dict]) -> dict[str, tuple[Callable, type]]:
    """The `steps` argument of `cxrdiff.report.report`."""
    return {"sample": (sample, SampleConfig), "ground": (ground, GroundConfig)}


class Brightness:
    """A hand-made classifier and feature network (the mean and spread of the grey values): fidelity numbers
    without weights."""

    name = "brightness"
    classes = ("Edema",)
    cache_key = "v1"

    def scores(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).mean(1, keepdims=True)

    def features(self, x: Any) -> Any:
        import torch

        return torch.stack([x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3))], 1)
