"""The resume points and the merge: each batch of each run is saved as a part file (npz, then json) as soon as
it is scored, so a killed job redoes only the missing ones; rank 0 merges all parts into the outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import StepFolder, atomic_path, write_json
from cxrdiff.config import to_dict
from cxrdiff.errors import RunError
from cxrdiff.ground.config import GroundConfig, GroundingInput
from cxrdiff.ground.tables import (
    SCORE_COLUMNS,
    conventions,
    laterality_summary,
    tables,
    word_analysis,
    write_parquet,
)


def part_name(run: int, c: int) -> str:
    """The part files' stem of one run's batch."""
    return f"r{run:03d}-c{c:05d}"


def pending(parts: Path, runs: int, n_chunks: int, rank: int, ranks: int) -> list[tuple[int, int]]:
    """(run, batch) pairs this process still has to do: every `ranks`-th one, less those with a part file."""
    return [
        (run, c)
        for run in range(runs)
        for c in range(n_chunks)
        if (run * n_chunks + c) % ranks == rank and not (parts / f"{part_name(run, c)}.json").is_file()
    ]


def save_part(parts: Path, run: int, c: int, result: dict[str, Any]) -> None:
    """One batch's results: the npz first, the json last (its presence marks the batch done)."""
    name = part_name(run, c)
    with atomic_path(parts / f"{name}.npz") as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **result["heatmaps"])
    write_json(parts / f"{name}.json", {k: result[k] for k in ("rows", "words", "skipped")})


def read_parts(parts: Path, config: GroundConfig, n_chunks: int) -> tuple[dict[str, np.ndarray], list, list, list]:
    """Every part, in run and batch order: heatmaps (keyed `<sample>_r<run>` with several runs), score rows,
    word rows and skip notes."""
    heatmaps, rows, words, skipped = {}, [], [], []
    for run in range(config.noise_seeds):
        for c in range(n_chunks):
            name = part_name(run, c)
            if not (parts / f"{name}.json").is_file():
                raise RunError(f"{parts / name}: a batch has no results; re-run the same command to finish it")
            part = json.loads((parts / f"{name}.json").read_text())
            rows += part["rows"]
            words += part["words"]
            skipped += part["skipped"]
            with np.load(parts / f"{name}.npz") as maps:
                heatmaps.update({f"{k}_r{run}" if config.noise_seeds > 1 else k: maps[k] for k in maps.files})
    return heatmaps, rows, words, skipped


def merge(folder: StepFolder, parts: Path, config: GroundConfig, n_chunks: int, samples: list[GroundingInput],
          frame_size: int) -> dict[str, Any]:  # fmt: skip
    """Rank 0: the part files → heatmaps.npz, scores.parquet, words.parquet, summary.json, manifest."""
    import pandas as pd

    out = folder.out
    heatmaps, rows, words, skipped = read_parts(parts, config, n_chunks)
    with atomic_path(out / "heatmaps.npz") as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **heatmaps)
    files = ["heatmaps.npz"]
    summary: dict[str, Any] = {
        "samples": len(samples),
        "conventions": conventions(config, frame_size),
        "skipped": skipped,
    }
    if config.image is not None:
        summary["tokens"] = rows[0]["tokens"]
        summary["token_source"] = rows[0]["token_source"]
        summary["phrase"] = rows[0]["phrase"]
        value = rows[0]["laterality"]
        summary["side"], summary["laterality"] = rows[0]["side"], value if np.isfinite(value) else None
    else:
        scores = pd.DataFrame(rows, columns=SCORE_COLUMNS)
        write_parquet(scores, out / "scores.parquet")
        files.append("scores.parquet")
        summary.update(tables(scores, config.noise_seeds))
        summary["laterality"] = laterality_summary(scores, config.noise_seeds)
        word_table = pd.DataFrame(words, columns=["run", "sample", "category", "word", "cnr"])
        write_parquet(word_table, out / "words.parquet")
        files.append("words.parquet")
        summary["word_analysis"] = word_analysis(word_table, config.min_word_count)
    if config.overlays:
        files += sorted(f"overlays/{p.name}" for p in (out / "overlays").glob("*.png"))
    write_json(out / "summary.json", summary)
    files.append("summary.json")
    inputs = {"model": config.model}
    if config.data is not None:
        inputs["data"] = Path(config.data).parent
    folder.finish(to_dict(config), inputs=inputs, seed=config.seed, files=files)
    shutil.rmtree(parts, ignore_errors=True)
    return summary
