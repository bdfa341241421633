"""What `cxrdiff report` is asked for (`ReportConfig`), and the shape of the steps it calls."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from cxrdiff.choices import ClassifierPositives, OtherSources

STEP = "report"


StepFn = Callable[[Any], Any]


Steps = Mapping[str, tuple[StepFn, type]]  # "sample" / "ground" → (step function, its config class)


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Settings of `cxrdiff report` (sampling and grounding defaults follow the paper). Plain data: the
    classifier, an object, is passed to `report` beside it."""

    NOT_SETTINGS: ClassVar[tuple[str, ...]] = ("out", "batch_size", "device", "workers")

    runs: tuple[Path, ...] = ()
    out: Path | None = None
    real: Path | None = None  # prepared folder: test.parquet (real p19 images, prompts), ms_cxr.parquet
    inception_weights: Path | None = None
    xrv_weights: Path | None = None
    n_fid: int = 5000
    diversity_prompts: int = 100
    random_features: bool = False
    names: tuple[str, ...] = ()  # display names, one per run; default: the folder names
    label: tuple[str, ...] = ()  # NAME=DIR: names the setting group of the run in DIR (groups: trainings.py)
    fid: bool = True  # FID on InceptionV3 (needs weights or random_features)
    fid_xrv: bool = True  # FID_XRV and the torchxrayvision classifier check (needs weights or random_features)
    sample_steps: int = 75
    guidance: float = 4.0
    scheduler: str = "pndm"
    ground_steps: int = 50
    ground_window: int = 40
    ground_limit: int | None = None
    min_word_count: int = 25  # Table 6: a word ranks in a class when it occurs in more than this many phrases
    classifier_positives: ClassifierPositives = "only"  # only: d is the image's only label (the paper's)
    checkpoints: bool = False  # also evaluate each run's kept checkpoints: CNR and fidelity over training steps
    checkpoint_every: int = 1  # with checkpoints: every Nth kept checkpoint, counted back from the newest
    table4_p19_only: bool = False  # Table 4 from the p19 prompts only: the MS-CXR phrases are not sampled
    other_sources: OtherSources = "grounding"  # runs trained on labels / file: texts: Table 7's grounding only
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"  # for the fidelity feature networks
    workers: int = 1  # runs measured side by side on a multi-core CPU (one process each; ignored with CUDA)
    # Today's benchmarks (report/benchmark.py, docs/method.md "Feature networks"): FD, KID and precision / recall /
    # density / coverage on each feature network, overall and per class. Networks: inception, xrv, classifier,
    # hf:DIR or hf:NAME=DIR (a local Hugging Face vision model, e.g. RadDino); () = those the FDs above use.
    features: tuple[str, ...] = ()
    min_class_images: int = 25  # per class: measured when both sides have at least this many images (>= 2)
    kid_subsets: int = 100  # torch-fidelity's default (>= 1)
    kid_subset_size: int = 1000  # torch-fidelity's default, clipped to the smaller set (>= 2)
    prdc_k: int = 5  # neighbourhood of precision / recall / density / coverage (CheXGenBench: 5; >= 1)
    # Privacy (report/privacy.py, docs/method.md "Privacy"): each generated image's nearest training image, a copy
    # rate calibrated on the held-out test images, the closest pairs, Dutt et al.'s memorization score per prompt.
    no_privacy: bool = False
    privacy_features: str = ""  # the network for the nearest-training search; "" = the first of `features`
    privacy_max_train: int | None = None  # training images searched (a seeded sample; None = all; >= 1)
    privacy_quantile: float = 0.95  # copy threshold: this quantile of held-out test similarities, in (0, 1)
    privacy_pixels: int = 64  # pixel correlation at this size (8 to 512)
    privacy_pairs: int = 6  # closest pairs shown per run and measure (1 to 50)
    memorization_prompts: int = 16  # training prompts scored, and as many held-out ones (0: off; <= 1000)
    memorization_noise: int = 4  # noise draws per prompt (Dutt et al.: 4; 1 to 64)
    memorization_steps: int = 50  # DDIM steps the score averages over (1 to 1000)
