"""Every usage error before any weight is read, and the samples to ground: the prepared folder's format is
read once (`formats.format_record`) and its reader, from `READERS`, turns the rows into `GroundingInput`s."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxrdiff.artifacts import MANIFEST, StepFolder, read_manifest
from cxrdiff.config import check_ranges
from cxrdiff.errors import InputError
from cxrdiff.formats import FormatRecord, format_record
from cxrdiff.ground.coco import read_coco
from cxrdiff.ground.config import STEP, GroundConfig, GroundingInput, ground_settings
from cxrdiff.ground.mscxr import read_mscxr
from cxrdiff.ground.single import image_samples

# A data format's reader: (the Parquet table, the config, its path) → one `GroundingInput` per row.
READERS: dict[str, Callable[[Any, GroundConfig, Path], list[GroundingInput]]] = {
    "mimic": read_mscxr,
    "coco": read_coco,
    **{name: read_mscxr for name in ("nih", "openi", "csv")},  # the public sets' grounding rows: MS-CXR's columns
}


def check_inputs(config: GroundConfig) -> None:
    """Every usage error, before any weight is read."""
    from cxrdiff.models import check_model_folder, check_sampling_steps

    if config.model is None:
        raise InputError("--model: required (a diffusers Stable Diffusion folder)")
    if config.out is None:
        raise InputError("--out: required (the folder to write heatmaps and scores to)")
    if (config.data is None) == (config.image is None):
        raise InputError("give exactly one of --data (ms_cxr.parquet) or --image (with --prompt)")
    if config.image is not None and not config.prompt:
        raise InputError(f"--image {config.image}: --prompt is required with --image")
    if config.data is not None and config.prompt:
        raise InputError("--prompt: only with --image (the phrases come from --data)")
    check_ranges(config)
    if config.window > config.steps:
        raise InputError(f"--window {config.window}: must be between 1 and --steps ({config.steps})")
    if config.image is not None and (config.frame != "prepared" or config.boxes != "union"):
        raise InputError("--frame/--boxes: only with --data (a single image has no boxes)")
    check_model_folder(config.model)
    check_sampling_steps(config.model, config.steps)
    check_scaling_factor(config)
    StepFolder.claim(config.out, STEP, ground_settings(config), create=False)  # the kind of folder, early


def check_scaling_factor(config: GroundConfig) -> None:
    """Latents prepared with another scaling factor than the model's VAE has came from another VAE (or its
    config was changed): grounding them would feed the UNet latents of the wrong scale, so they are refused
    before any weight is read, unless `--allow-scaling-mismatch` (then the recorded factor is used)."""
    from cxrdiff.models import model_geometry

    if config.data is None or not Path(config.data).is_file():
        return  # single-image mode encodes with the model's own VAE; a missing file is load_samples' error
    recorded = data_manifest(Path(config.data)).get("scaling_factor")
    model_factor = model_geometry(Path(config.model), None)[2]
    if recorded is None or math.isclose(float(recorded), model_factor) or config.allow_scaling_mismatch:
        return
    raise InputError(
        f"--data {config.data}: latents prepared with VAE scaling factor {recorded}, but --model {config.model} "
        f"has {model_factor}; prepare again with this model's VAE, or pass --allow-scaling-mismatch"
    )


def data_manifest(data: Path) -> dict[str, Any]:
    """The manifest of the prepare folder that holds `--data` (which is named when it is not in one)."""
    folder = data.absolute().parent
    if not (folder / MANIFEST).is_file():
        raise InputError(
            f"--data {data}: not in a `cxrdiff prepare` output folder (no {MANIFEST} beside it); "
            "give the ms_cxr.parquet of a prepared folder"
        )
    return read_manifest(folder, "prepare")


def load_samples(config: GroundConfig) -> list[GroundingInput]:
    """The samples to ground: the rows of `--data` as its format's reader reads them, or the single image."""
    if config.image is not None:
        return image_samples(config)
    import pyarrow.parquet as pq

    path = Path(config.data)
    if not path.is_file():
        raise InputError(f"--data {path}: file not found (give ms_cxr.parquet from `cxrdiff prepare`)")
    data_manifest(path)
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise InputError(f"--data {path}: not a readable Parquet file ({str(exc).strip().splitlines()[0]})") from None
    record = format_record(path.absolute().parent)
    check_regions(record, config, path)
    return READERS[record.name](table, config, path)


def check_regions(record: FormatRecord, config: GroundConfig, path: Path) -> None:
    """A format whose grounding set holds masks has them in the prepared frame only, one per image and class."""
    if record.regions != "masks":
        return
    if config.frame != "prepared":
        raise InputError(
            f"--frame {config.frame}: --data {path} holds {record.label} masks, stored in the prepared frame only"
        )
    if config.boxes == "per-box":
        raise InputError(f"--boxes per-box: --data {path} holds one mask per image and category, not boxes")


def check_words(config: GroundConfig, samples: list[GroundingInput]) -> None:
    """Each `--word` is in the prompt (`--image`) or in at least one phrase (`--data`): a typo would silently
    fall back to all word tokens in every sample. Only the tokenizer is read."""
    if not config.word:
        return
    from cxrdiff.text_encoders import load_tokenizer
    from cxrdiff.tokens import word_token_spans

    tokenizer = load_tokenizer(Path(config.model) / "tokenizer")
    for w in config.word:
        if config.image is not None:
            word_token_spans(tokenizer, samples[0].phrase, w)  # not in the prompt: an input error, before weights
        elif not any(word_token_spans(tokenizer, s.phrase, w, missing="empty", truncation="drop") for s in samples):
            raise InputError(f"--word {w!r}: occurs in none of the {len(samples)} phrases of --data {config.data}")
