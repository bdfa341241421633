"""A small synthetic `cxrdiff prepare` folder that follows docs/artifacts.md exactly.

Used by the finetune tests (and bench/bench_finetune.py) until the real phantom → prepare chain can
build one; swap `build_prepared` for that chain without touching the tests that use it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxrdiff.artifacts import write_manifest
from cxrdiff.data import LABELS, latent_to_bytes

FINDINGS = {
    "Cardiomegaly": "Moderate cardiomegaly.",
    "Pleural Effusion": "Small left pleural effusion.",
    "Edema": "Mild pulmonary edema.",
    "Pneumothorax": "Small right apical pneumothorax.",
    "Atelectasis": "Bibasilar atelectasis.",
}
NORMAL = ("No acute cardiopulmonary process.", "No acute intrathoracic abnormality.")


def prepared_rows(n: int, latent_shape: tuple[int, int, int], seed: int = 0, fill: float | None = None) -> list[dict]:
    """Rows of a train shard: every third row has a finding, the rest are 'No Finding' only.

    `fill` replaces every latent mean by one value (NaN makes data that breaks training)."""
    rng = np.random.default_rng(seed)
    names = list(FINDINGS)
    rows = []
    for i in range(n):
        labels = {name: float("nan") for name in LABELS}
        if i % 3 == 2:
            finding = names[(i // 3) % len(names)]
            labels[finding] = 1.0
            labels["Support Devices"] = 0.0
            impression = FINDINGS[finding]
        else:
            labels["No Finding"] = 1.0
            if i % 6 == 1:
                labels["Support Devices"] = -1.0  # uncertain is not positive: still No-Finding-only
            impression = NORMAL[i % 2]
        mean = rng.standard_normal(latent_shape).astype(np.float32)
        if fill is not None:
            mean[:] = fill
        logvar = np.full(latent_shape, -6.0, np.float32) + 0.1 * rng.standard_normal(latent_shape).astype(np.float32)
        rows.append(
            {
                "dicom_id": f"d{i:06d}",
                "subject_id": 10000000 + i // 2,
                "study_id": 50000000 + i,
                "view": "PA" if i % 2 else "AP",
                "impression": impression,
                "impression_source": "impression",
                **labels,
                "image_path": f"files/p10/p{10000000 + i // 2}/s{50000000 + i}/d{i:06d}.jpg",
                "latent_mean": latent_to_bytes(mean),
                "latent_logvar": latent_to_bytes(logvar),
                "latent_shape": list(latent_shape),
            }
        )
    return rows


def _schema() -> pa.Schema:
    return pa.schema(
        [
            ("dicom_id", pa.string()),
            ("subject_id", pa.int64()),
            ("study_id", pa.int64()),
            ("view", pa.string()),
            ("impression", pa.string()),
            ("impression_source", pa.string()),
            *[(name, pa.float32()) for name in LABELS],
            ("image_path", pa.string()),
            ("latent_mean", pa.binary()),
            ("latent_logvar", pa.binary()),
            ("latent_shape", pa.list_(pa.int32())),
        ]
    )


def build_prepared(
    out: str | os.PathLike,
    *,
    n: int = 24,
    shard_size: int = 10,
    latent_shape: tuple[int, int, int] = (4, 16, 16),
    resolution: int = 64,
    scaling_factor: float = 0.18215,
    vae_fingerprint: str | None = None,
    seed: int = 0,
    fill: float | None = None,
    model: str | os.PathLike | None = None,
) -> Path:
    """Write train-NNNNN.parquet shards and a 'prepare' manifest (geometry at the top level, as prepare
    writes it); `vae_fingerprint` is what `cxrdiff.models.vae_fingerprint(base_model)` returns, and `model`'s
    where one is given (as though its VAE had made the latents)."""
    if model is not None:
        from cxrdiff.models import vae_fingerprint as fingerprint

        vae_fingerprint = fingerprint(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = prepared_rows(n, latent_shape, seed, fill)
    schema = _schema()
    for k, start in enumerate(range(0, n, shard_size)):
        table = pa.Table.from_pylist(rows[start : start + shard_size], schema=schema)
        pq.write_table(table, out / f"train-{k:05d}.parquet")
    geometry = {"resolution": resolution, "latent_shape": list(latent_shape), "scaling_factor": scaling_factor}
    extra = {**geometry, "latent_storage": "mean+logvar", "latent_dtype": "float16", "counts": {"train": n}}
    if vae_fingerprint is not None:
        extra["vae_fingerprint"] = vae_fingerprint
    write_manifest(out, "prepare", config={"resolution": resolution, "seed": seed}, seed=seed, extra=extra)
    return out


# Losses of `tiny_run`'s frozen run on `build_prepared`'s folder (seed 0, batch 4 = 2 × 2 accumulation, 3 steps),
# computed once on CPU.
PINNED_FROZEN_LOSSES = (1.1567013263702393, 1.142768383026123, 1.1265671253204346)


def tiny_run(data: Path, base_model: Path, out: Path, **changes):
    """The tests' fine-tuning config: 3 frozen-text steps of batch 4 (2 × 2 accumulation), a checkpoint at step 2,
    a log line each step; `changes` override any field."""
    from cxrdiff.finetune import FinetuneConfig

    base = dict(data=data, base_model=base_model, out=out, frozen_text=True, steps=3, batch_size=4,
                per_device_batch_size=2, checkpoint_every=2, log_every=1)  # fmt: skip
    return FinetuneConfig(**{**base, **changes})


def train_log(out: Path) -> list[dict]:
    """A run's train_log.jsonl, a record per logged step."""
    import json

    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def logged_losses(out: Path) -> list[float]:
    """Each logged step's loss."""
    return [record["loss"] for record in train_log(out)]


def weights(folder: Path) -> dict:
    """The tensors of the one .safetensors file of a model part's folder (unet/, text_encoder/, ...)."""
    from safetensors.torch import load_file

    (file,) = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    return load_file(file)
