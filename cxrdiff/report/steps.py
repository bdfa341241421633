"""The step folders a report makes or reuses for each run: samples, diversity sets and grounding, each called
through the step's own function on a sub-folder of `--out` (a finished one with the same settings returns at
once; one made with other settings is removed and made again), and the small readers they share.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cxrdiff.artifacts import (
    MANIFEST,
    OtherSettings,
    damaged_file,
    input_identity,
    manifest_hash,
    read_manifest,
    write_json,
)
from cxrdiff.console import log
from cxrdiff.errors import InputError
from cxrdiff.report.config import ReportConfig, StepFn, Steps, check_name


class Deferred(Exception):  # noqa: N818 (not an error: a step written down instead of run)
    """Raised by a stand-in step that wrote its command down (`report --emit-jobs`): `run_step` returns its folder."""


def default_steps() -> dict[str, tuple[StepFn, type]]:
    from cxrdiff import ground, sample

    return {"sample": (sample.sample, sample.SampleConfig), "ground": (ground.ground, ground.GroundConfig)}


def run_step(name: str, fn: StepFn, config: Any, done: list[str]) -> Path:
    """Call a step on its sub-folder: it returns at once when that is finished with these settings; one
    made with other settings is removed and made again. `name` joins `done` when the folder's manifest
    changed (something was computed), which is also what invalidates the metrics measured on it."""
    out = Path(config.out)
    before = manifest_hash(out)
    try:
        fn(config)
    except Deferred:
        return out
    except OtherSettings:
        log.info("report: %s in %s was made with other settings or inputs; recomputing it", name, out)
        shutil.rmtree(out)
        fn(config)
    after = manifest_hash(out)
    if after is None:
        raise InputError(f"{out}: the {name} step finished without a manifest")
    fault, reused = damaged_file(out), after == before
    if fault is not None and reused:  # a finished folder it was about to reuse: made again
        log.warning("report: %s; making %s in %s again", fault, name, out)
        shutil.rmtree(out)
        fn(config)
        fault, reused = damaged_file(out), False
    if fault is not None:
        raise InputError(f"{fault}; delete {out} and run the report again")
    if reused:
        log.info("report: %s is up to date in %s", name, out)
    else:
        done.append(name)
    return out


def cached(path: Path, key: str, measure: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """The numbers saved in `path` if they were measured with this key, else measured now and saved;
    and whether they were measured now."""
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("key") == key:
        return {k: v for k, v in saved.items() if k != "key"}, False
    measured = measure()
    write_json(path, {"key": key, **measured})
    return measured, True


def read_table(path: Path) -> Any:
    import pandas as pd

    return pd.read_parquet(path)


def image_path(value: str, real: Path) -> Path:
    path = Path(value)
    if path.is_absolute() or path.exists():
        return path
    mimic = read_manifest(real).get("config", {}).get("mimic")
    return Path(mimic) / path if mimic else real / path


def image_size(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as img:
        return int(min(img.size))


def run_kind(path: Path) -> str:
    from cxrdiff.models import check_model_folder

    kind = read_manifest(path, ("finetune", "checkpoint"))["step"] if (path / MANIFEST).is_file() else "base model"
    check_model_folder(path)
    return kind


def identity(path: Path | None) -> str | None:
    return input_identity(path) if path is not None and Path(path).exists() else None


def run_names(config: ReportConfig) -> tuple[str, ...]:
    """Each run's name (its folder under `runs/`): `names`, else the run folder's own name."""
    if config.names:
        names = tuple(check_name(str(n), "names") for n in config.names)
    else:
        names = tuple(check_name(Path(os.path.abspath(r)).name, f"run {r}") for r in config.runs)
    if len(names) != len(config.runs):
        raise InputError(f"names: {len(names)} given for {len(config.runs)} runs")
    if len(set(names)) != len(names):
        raise InputError(
            f"runs: names are not unique ({', '.join(names)}); give each run its own with `names = [...]` in a "
            "--config TOML file, or rename the run folders"
        )
    return names


def phrases_share_an_image_class(ms_cxr: Path) -> bool:
    """Whether some image and class has several phrases: only then do `union` (Table 1's boxes) and
    `per-phrase` (Table 3's) score differently, and the report grounds a second time for Table 3."""
    table = read_table(ms_cxr)[["dicom_id", "category_name"]]
    return bool(table.duplicated().any())


# Table 4's two prompt sources: (table in the prepared folder, extra sample options, sub-folder suffix)
PROMPT_SETS = {
    "p19": ("test.parquet", {}, ""),
    "ms-cxr": ("ms_cxr.parquet", {"prompt_column": "label_text"}, "-ms-cxr"),
}


def sample_folders(
    config: ReportConfig, run: Path, folder: Path, real: Path, steps: Steps, done: list[str], prompts: str = "p19"
) -> tuple[Path, Path]:
    """Samples (one per prompt, --n-fid) and the diversity set (4 images per prompt, --diversity-prompts) of
    one run, made or reused; from the p19 test prompts or, for Table 4's second column, the MS-CXR phrases,
    both made the same way (sampler, seed rule, counts)."""
    table, extra, suffix = PROMPT_SETS[prompts]
    sample_fn, sample_config = steps["sample"]
    common = dict(model=run, steps=config.sample_steps, guidance=config.guidance, scheduler=config.scheduler)
    common.update(seed=config.seed, batch_size=config.batch_size, prompts=real / table, **extra)
    samples = run_step(
        f"samples{suffix}",
        sample_fn,
        sample_config(out=folder / f"samples{suffix}", n_per_prompt=1, limit=config.n_fid, **common),
        done,
    )
    diversity = run_step(
        f"diversity{suffix}",
        sample_fn,
        sample_config(out=folder / f"diversity{suffix}", n_per_prompt=4, limit=config.diversity_prompts, **common),
        done,
    )
    return samples, diversity


def ground_folders(
    config: ReportConfig, run: Path, folder: Path, real: Path, steps: Steps, done: list[str]
) -> dict[str, Path]:
    """The grounding of one run on MS-CXR, made or reused: `union` for Table 1, and `per-phrase` for
    Table 3 (the same folder when they cannot differ)."""
    ground_fn, ground_config = steps["ground"]
    grounding = grounding_settings(config, run, real)
    ground = {"union": run_step("ground", ground_fn, ground_config(out=folder / "ground", **grounding), done)}
    ground["per-phrase"] = ground["union"]
    if phrases_share_an_image_class(real / "ms_cxr.parquet"):
        per_phrase = ground_config(out=folder / "ground-per-phrase", boxes="per-phrase", **grounding)
        ground["per-phrase"] = run_step("ground per phrase", ground_fn, per_phrase, done)
    return ground


def grounding_settings(config: ReportConfig, model: Path, real: Path) -> dict[str, Any]:
    """How the report grounds a model (a run or one of its checkpoints) on the MS-CXR phrases."""
    return dict(
        model=model,
        data=real / "ms_cxr.parquet",
        steps=config.ground_steps,
        window=config.ground_window,
        seed=config.seed,
        limit=config.ground_limit,
        min_word_count=config.min_word_count,
    )


def grounding_only(config: ReportConfig, setting: Mapping[str, Any]) -> bool:
    """Whether a run is grounded and not sampled: one trained on another text than impressions (labels, a
    `file:` set), which the paper measures in Table 7 alone, unless `--other-sources full`."""
    return config.other_sources == "grounding" and setting.get("prompt_source") not in (None, "impression")


def recorded_real(config: ReportConfig) -> Path | None:
    """The prepared folder the report measures against: --real, else the one the first run that records its
    data was trained on; None when neither is known."""
    if config.real is not None:
        return Path(config.real)
    for run in config.runs:
        if (Path(run) / MANIFEST).is_file():
            data = read_manifest(run).get("inputs", {}).get("data", {}).get("path")
            if data:
                return Path(data)
    return None
