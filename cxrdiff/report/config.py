"""What `cxrdiff report` is asked for (`ReportConfig`), and the shape of the steps it calls."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar

from cxrdiff.choices import ClassifierPositives, OtherSources
from cxrdiff.config import Range
from cxrdiff.errors import InputError

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
    n_fid: Annotated[int, Range(ge=2)] = 5000
    diversity_prompts: Annotated[int, Range(ge=1)] = 100
    random_features: bool = False
    names: tuple[str, ...] = ()  # display names, one per run; default: the folder names
    label: tuple[str, ...] = ()  # NAME=DIR: names the setting group of the run in DIR (groups: trainings.py)
    fid: bool = True  # FID on InceptionV3 (needs weights or random_features)
    fid_xrv: bool = True  # FID_XRV and the torchxrayvision classifier check (needs weights or random_features)
    sample_steps: Annotated[int, Range(ge=1)] = 75
    guidance: Annotated[float, Range(ge=1.0)] = 4.0
    scheduler: str = "pndm"
    ground_steps: Annotated[int, Range(ge=1)] = 50
    ground_window: Annotated[int, Range(ge=1)] = 40
    ground_limit: Annotated[int | None, Range(ge=1)] = None
    # Table 6: a word ranks in a class when it occurs in more than this many phrases
    min_word_count: Annotated[int, Range(ge=0)] = 25
    classifier_positives: ClassifierPositives = "only"  # only: d is the image's only label (the paper's)
    checkpoints: bool = False  # also evaluate each run's kept checkpoints: CNR and fidelity over training steps
    # with checkpoints: every Nth kept checkpoint, counted back from the newest
    checkpoint_every: Annotated[int, Range(ge=1)] = 1
    table4_p19_only: bool = False  # Table 4 from the p19 prompts only: the MS-CXR phrases are not sampled
    other_sources: OtherSources = "grounding"  # runs trained on labels / file: texts: Table 7's grounding only
    seed: Annotated[int, Range(ge=0)] = 0  # sampling, grounding and every bootstrap
    # bootstrap resamples of the intervals over phrases, prompts and images
    resamples: Annotated[int, Range(ge=10)] = 1000
    # over generated images for Fréchet distances (each is one eigen-decomposition); 0: no interval
    fd_resamples: Annotated[int, Range(ge=0)] = 200
    batch_size: Annotated[int, Range(ge=1)] = 8
    device: str = "cpu"  # for the fidelity feature networks
    # runs measured side by side on a multi-core CPU (one process each; ignored with CUDA)
    workers: Annotated[int, Range(ge=1)] = 1


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
