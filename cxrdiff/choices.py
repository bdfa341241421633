"""Every fixed set of choices, in one place: the configs annotate their fields with these, the CLI builds
its `--option` choices (and shell completion) from them, so the two cannot drift apart. No heavy imports."""

from __future__ import annotations

from enum import StrEnum
from types import SimpleNamespace
from typing import Literal, get_args, get_origin

Precision = Literal["no", "fp16", "bf16"]
SamplePrecision = Literal["auto", "no", "fp16", "bf16"]  # auto: bf16 on CUDA, fp32 on CPU
Scheduler = Literal["pndm", "ddim", "dpm"]  # pndm with PLMS steps is the paper's sampler
ExportWeights = Literal["raw", "ema"]
LatentSampling = Literal["sample", "mean"]
GroundMode = Literal["noise", "invert"]
CnrKind = Literal["signed", "abs"]
BoxMode = Literal["union", "per-box", "per-phrase"]  # union: an image's boxes of a class; per-phrase: a phrase's
# prepare: what a report without an IMPRESSION gives (none: it is dropped, as in the paper)
TextFallback = Literal["none", "findings", "last-paragraph", "findings,last-paragraph"]
ClassifierPositives = Literal["only", "any"]  # only: d is the image's only label (the paper's); any: d among others
# report: runs trained on another text than impressions (labels, file:) — grounded only (Table 7, as the paper
# measured them) or also sampled and scored for fidelity
OtherSources = Literal["grounding", "full"]
Frame = Literal["prepared", "original"]
PredictionType = Literal["epsilon", "v_prediction"]
PublishedModel = Literal["sd2-base", "sd2-768", "sd15"]  # `cxrdiff model random --like`
PublishedTextEncoder = Literal["bert-base"]  # `cxrdiff model random --text-encoder-like`
TextInit = Literal["pretrained", "token-local", "both"]  # `cxrdiff demo --text-init`: the tiny text encoder's start
PhantomKind = Literal["mimic", "coco"]  # `cxrdiff phantom --kind`: a MIMIC-CXR-shaped tree or a COCO-layout set
DataFormat = Literal["mimic", "coco", "nih", "openi", "csv"]  # `cxrdiff prepare --format` (docs/public-sets.md)
DicomContrast = Literal["mimic-jpg", "window"]  # mimic-jpg: MIMIC-CXR-JPG's own conversion; window: the file's window
# finetune: MIMIC's de-identification markers ("___") in the training text: kept (as the paper trained) or stripped
DeidMarkers = Literal["keep", "strip"]
ReportTo = Literal["auto", "tensorboard", "wandb", "none"]  # `finetune --report-to`: the metrics tracker


def enum(name: str, choices: object) -> type[StrEnum]:
    """A StrEnum of a Literal's values, for Typer (which shows and completes enum choices)."""
    return StrEnum(name, {value: value for value in get_args(choices)})  # type: ignore[return-value]


def enums() -> SimpleNamespace:
    """Every choice above as a StrEnum of the same name (`enums().Scheduler`), for the CLI's options."""
    return SimpleNamespace(
        **{name: enum(name, value) for name, value in globals().items() if get_origin(value) is Literal}
    )
