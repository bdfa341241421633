"""What `cxrdiff report` is asked for (`ReportConfig`), and the shape of the steps it calls."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar

from cxrdiff.choices import ClassifierPositives, OtherSources
from cxrdiff.config import Range
from cxrdiff.errors import InputError
from cxrdiff.ground.config import GroundConfig
from cxrdiff.metrics.intervals import MIN_RESAMPLES
from cxrdiff.sample import SampleConfig

STEP = "report"


StepFn = Callable[[Any], Any]


Steps = Mapping[str, tuple[StepFn, type]]  # "sample" / "ground" → (step function, its config class)


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Settings of `cxrdiff report` (sampling and grounding defaults follow the paper). Plain data: the
    classifier, an object, is passed to `report` beside it."""

    NOT_SETTINGS: ClassVar[tuple[str, ...]] = ("out", "batch_size", "device", "workers", "emit_jobs")

    runs: tuple[Path, ...] = ()
    out: Path | None = None
    real: Path | None = None  # prepared folder: test.parquet (real p19 images, prompts), ms_cxr.parquet
    inception_weights: Path | None = None
    xrv_weights: Path | None = None
    n_fid: Annotated[int, Range(ge=2)] = 5000
    diversity_prompts: Annotated[int, Range(ge=1)] = 100
    random_features: bool = False
    names: tuple[str, ...] = ()  # display names, one per run; default: the folder names
    label: tuple[str, ...] = ()  # NAME=DIR: names the setting group of the run in DIR (groups: trainings.py)
    fid: bool = True  # FID on InceptionV3 (needs weights or random_features)
    fid_xrv: bool = True  # FID_XRV and the torchxrayvision classifier check (needs weights or random_features)
    # sampling and grounding as the steps' own defaults (the paper's), one value per concept
    sample_steps: Annotated[int, Range(ge=1)] = SampleConfig.steps
    guidance: Annotated[float, Range(ge=1.0)] = SampleConfig.guidance
    scheduler: str = SampleConfig.scheduler
    ground_steps: Annotated[int, Range(ge=1)] = GroundConfig.steps
    ground_window: Annotated[int, Range(ge=1)] = GroundConfig.window
    ground_limit: Annotated[int | None, Range(ge=1)] = None
    # Table 6: a word ranks in a class when it occurs in more than this many phrases
    min_word_count: Annotated[int, Range(ge=0)] = 25
    classifier_positives: ClassifierPositives = "only"  # only: d is the image's only label (the paper's)
    # the classifier check on its own prompt set: K prompts per class and K No Finding ones drawn from the test
    # rows (report/classifier_set.py); None: on the p19 samples, as many per class as the test set holds
    classifier_prompts_per_class: Annotated[int | None, Range(ge=1)] = None
    checkpoints: bool = False  # also evaluate each run's kept checkpoints: CNR and fidelity over training steps
    # with checkpoints: every Nth kept checkpoint, counted back from the newest
    checkpoint_every: Annotated[int, Range(ge=1)] = 1
    table4_p19_only: bool = False  # Table 4 from the p19 prompts only: the MS-CXR phrases are not sampled
    other_sources: OtherSources = "grounding"  # runs trained on labels / file: texts: Table 7's grounding only
    seed: Annotated[int, Range(ge=0)] = 0  # sampling, grounding and every bootstrap
    # bootstrap resamples of the intervals over phrases, prompts and images (fewer than 200: too noisy percentiles)
    resamples: Annotated[int, Range(ge=MIN_RESAMPLES)] = 1000
    # over generated images for Fréchet distances (each is one eigen-decomposition); 0: no interval
    fd_resamples: Annotated[int, Range(ge=0)] = 200
    batch_size: Annotated[int, Range(ge=1)] = 8
    device: str = "cpu"  # for the fidelity feature networks
    # runs measured side by side on a multi-core CPU (one process each; ignored with CUDA)
    workers: Annotated[int, Range(ge=1)] = 1
    emit_jobs: Path | None = None  # write the sample/ground commands of every sub-folder here, run nothing

    # Today's benchmarks (report/benchmark.py, docs/method.md "Feature networks"): FD, KID and precision / recall /
    # density / coverage on each feature network, overall and per class. Networks: inception, xrv, classifier,
    # hf:DIR or hf:NAME=DIR (a local Hugging Face vision model, e.g. RadDino); () = those the FDs above use.
    features: tuple[str, ...] = ()
    # per class: measured when both sides have at least this many images
    min_class_images: Annotated[int, Range(ge=2)] = 25
    kid_subsets: Annotated[int, Range(ge=1)] = 100  # torch-fidelity's default
    kid_subset_size: Annotated[int, Range(ge=2)] = 1000  # torch-fidelity's default, clipped to the smaller set
    # neighbourhood of precision / recall / density / coverage (CheXGenBench: 5)
    prdc_k: Annotated[int, Range(ge=1)] = 5
    # Privacy (report/privacy/, docs/method.md "Privacy"): each generated image's nearest training image, a copy
    # rate calibrated on the held-out test images, the closest pairs, Dutt et al.'s memorization score per prompt.
    no_privacy: bool = False
    privacy_features: str = ""  # the network for the nearest-training search; "" = the first of `features`
    # training images searched (a seeded sample; None = all)
    privacy_max_train: Annotated[int | None, Range(ge=1)] = None
    # copy threshold: this quantile of held-out test similarities
    privacy_quantile: Annotated[float, Range(gt=0.0, lt=1.0)] = 0.95
    privacy_pixels: Annotated[int, Range(ge=8, le=512)] = 64  # pixel correlation at this size
    privacy_pairs: Annotated[int, Range(ge=1, le=50)] = 6  # closest pairs shown per run and measure
    # training prompts scored, and as many held-out ones (0: off)
    memorization_prompts: Annotated[int, Range(ge=0, le=1000)] = 16
    memorization_noise: Annotated[int, Range(ge=1, le=64)] = 4  # noise draws per prompt (Dutt et al.: 4)
    memorization_steps: Annotated[int, Range(ge=1, le=1000)] = 50  # DDIM steps the score averages over


def check_name(name: str, where: str) -> str:
    """A run or group name becomes a folder (`runs/<name>/`): a plain name only, never a path."""
    if (
        not name
        or name in (".", "..")
        or any(sep in name for sep in ("/", "\\"))
        or name.startswith("-")
        or name != name.strip()
        or not name.isprintable()
        or len(name.encode()) > 200
    ):
        raise InputError(
            f"{where}: {name!r} is not a plain name (a run's name is a folder name: no '/' or '\\', not '.' or "
            "'..', no leading '-' or spaces, printable, at most 200 bytes)"
        )
    return name
