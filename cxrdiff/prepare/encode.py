"""Encoding a prepared unit with the VAE: images decoded in loader workers, latents (mean and log-variance)
written as one Parquet file per unit, each process its share, joined in order by the main process.

Every data format uses this one encoder; what differs between formats is its `Layout` (the unit's columns,
and whether images keep their colour), never a flag in here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import atomic_path, write_json
from cxrdiff.choices import DicomContrast
from cxrdiff.console import progress
from cxrdiff.data import (
    latent_to_bytes,
)
from cxrdiff.errors import InputError
from cxrdiff.images import ImageRefused, load_grayscale, load_rgb, resize_center_crop, to_model_input, too_small
from cxrdiff.prepare.config import PrepareConfig
from cxrdiff.processes import loader_worker_init

STATE = ".prepare"  # plan and per-unit skip lists; hidden, not part of the artifact
SKIPPED_COLUMNS = ("part", "dicom_id", "subject_id", "study_id", "reason", "detail", "path")


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a data format's units look like: `schema(unit)` gives the Parquet schema (the latents last), and
    `columns(unit, rows, sizes, resolution)` any columns computed from the decoded images (e.g. MS-CXR's boxes
    in the prepared frame); `rgb` keeps colour (COCO) instead of grey (radiographs)."""

    schema: Callable[[str], Any]
    columns: Callable[[str, Any, list[tuple[int, int]], int], dict[str, list]] | None = None
    rgb: bool = False


def skipped_row(part: str, row: Any, reason: str, detail: str = "", path: str = "") -> dict[str, Any]:
    """One row of skipped.csv (SKIPPED_COLUMNS) for a planned row that did not become a prepared row."""
    subject, study = row.get("subject_id", float("nan")), row.get("study_id", float("nan"))
    return {
        "part": part,
        "dicom_id": str(row["dicom_id"] if "dicom_id" in row else row.get("image_id", "")),  # COCO: the image id
        "subject_id": int(subject) if subject == subject else -1,
        "study_id": int(study) if study == study else -1,
        "reason": reason,
        "detail": detail,
        "path": path,
    }


class ImageSet:
    """Decode + resize + crop, in DataLoader workers so that JPEG decoding overlaps the VAE. An image that
    cannot be used comes back as None with the reason (a `skipped.csv` reason) and the detail."""

    def __init__(self, paths: list[str], resolution: int, dicom_contrast: DicomContrast = "mimic-jpg", rgb=False):
        self.paths, self.resolution, self.dicom_contrast = paths, resolution, dicom_contrast
        self.rgb = rgb  # COCO: colour kept, (H, W, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, int, int, str, str]:
        path = self.paths[i]
        try:
            image = load_rgb(path) if self.rgb else load_grayscale(path, self.dicom_contrast)
            height, width = image.shape[:2]
            if too_small(width, height, self.resolution):
                raise ImageRefused(path, "image too small", f"{width}x{height} for resolution {self.resolution}")
            return i, resize_center_crop(image, self.resolution), width, height, "", ""
        except ImageRefused as exc:
            return i, None, 0, 0, exc.reason, str(exc)
        except InputError as exc:
            return i, None, 0, 0, "unreadable image", str(exc)
        except Exception as exc:  # a decoder fault in one file must not stop the run
            return i, None, 0, 0, "unreadable image", f"{path}: {type(exc).__name__}: {exc}"


def encode_batch(vae: Any, pixels: Any) -> tuple[np.ndarray, np.ndarray]:
    """The VAE posterior's mean and log-variance, before the scaling factor, as float16 arrays."""
    import torch

    with torch.inference_mode():
        posterior = vae.encode(pixels).latent_dist
    mean = posterior.mean.float().cpu().numpy().astype(np.float16)  # (batch, channels, h, w)
    logvar = posterior.logvar.float().cpu().numpy().astype(np.float16)  # (batch, channels, h, w)
    return mean, logvar


def unit_table(unit: str, rows, mean: np.ndarray, logvar: np.ndarray, sizes: list[tuple[int, int]], resolution: int,
               layout: Layout):  # fmt: skip
    """A unit's Parquet rows: the plan's columns, the layout's computed columns and the latents."""
    import pyarrow as pa

    schema = layout.schema(unit)
    data: dict[str, list] = {name: rows[name].tolist() for name in schema.names if name in rows.columns}
    data["latent_mean"] = [latent_to_bytes(m) for m in mean]
    data["latent_logvar"] = [latent_to_bytes(v) for v in logvar]
    data["latent_shape"] = [list(m.shape) for m in mean]
    if layout.columns is not None:
        data.update(layout.columns(unit, rows, sizes, resolution))
    return pa.Table.from_pydict({name: data[name] for name in schema.names}, schema=schema)


def encode_unit(
    acc: Any, vae: Any, rows, unit: str, out: Path, resolution: int, batch_size: int, workers: int,
    layout: Layout, dicom_contrast: DicomContrast = "mimic-jpg",
):  # fmt: skip
    """Each process encodes its contiguous share of the unit into a part; the main process joins the parts in
    order into `<unit>.parquet` (its skips first, then the file, both written atomically), in the data
    format's `layout`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from torch.utils.data import DataLoader

    part = "ms_cxr" if unit == "ms_cxr" else unit.split("-")[0]
    state = out / STATE
    mine = rows.iloc[np.array_split(np.arange(len(rows)), acc.num_processes)[acc.process_index]]
    loader = DataLoader(
        ImageSet(list(mine["image_path"]), resolution, dicom_contrast, rgb=layout.rgb),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=list,
        shuffle=False,
        worker_init_fn=loader_worker_init,  # a killed prepare leaves no worker behind
    )
    batches = progress(loader, total=len(loader), description=f"encode {unit}") if acc.is_main_process else loader
    tables, skipped = [], []
    dtype = next(vae.parameters()).dtype
    for batch in batches:
        good = [item for item in batch if item[1] is not None]
        for index, _, _, _, reason, detail in (item for item in batch if item[1] is None):
            row = mine.iloc[index]
            skipped.append(skipped_row(part, row, reason, detail, row["image_path"]))
        if not good:
            continue
        pixels = to_model_input(np.stack([item[1] for item in good]))  # (batch, 3, res, res)
        mean, logvar = encode_batch(vae, pixels.to(acc.device, dtype))  # (batch, channels, h, w)
        sizes = [(item[2], item[3]) for item in good]
        tables.append(unit_table(unit, mine.iloc[[item[0] for item in good]], mean, logvar, sizes, resolution, layout))
    table = pa.concat_tables(tables) if tables else layout.schema(unit).empty_table()
    rank = f"{acc.process_index:03d}"
    with atomic_path(state / f"{unit}.part-{rank}.parquet") as tmp:
        pq.write_table(table, tmp)
    write_json(state / f"{unit}.part-{rank}.skipped.json", skipped)
    del tables, table
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    acc.wait_for_everyone()
    if acc.is_main_process:
        parts = [state / f"{unit}.part-{r:03d}.parquet" for r in range(acc.num_processes)]
        skips = [state / f"{unit}.part-{r:03d}.skipped.json" for r in range(acc.num_processes)]
        write_json(state / f"{unit}.skipped.json", [s for path in skips for s in json.loads(path.read_text())])
        with atomic_path(out / f"{unit}.parquet") as tmp:
            pq.write_table(pa.concat_tables([pq.read_table(p) for p in parts]), tmp)
        for path in [*parts, *skips]:
            path.unlink()
    acc.wait_for_everyone()


def load_vae(base_model: Path, device: Any) -> Any:
    """The base model's VAE in float32, frozen; one line naming the folder when it cannot be loaded."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(base_model / "vae", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{base_model / 'vae'}: cannot load the VAE ({str(exc).splitlines()[0]})") from None
    return vae.eval().requires_grad_(False).to(device)  # float32: the latents are stored as float16 anyway


def load_base_tokenizer(base_model: Path) -> Any:
    """The base model's tokenizer (for marking prompts longer than its context)."""
    from cxrdiff.text_encoders import load_tokenizer

    try:
        return load_tokenizer(base_model / "tokenizer")
    except (OSError, ValueError) as exc:
        raise InputError(f"{base_model / 'tokenizer'}: cannot load the tokenizer ({exc})") from None


def loader_workers(config: PrepareConfig, processes: int) -> int:
    """Image-decoding processes per accelerate process: --workers, else what the CPU count allows."""
    if config.workers is not None:
        return max(0, config.workers)
    return max(0, min(8, (os.cpu_count() or 1) // processes - 1))
