"""What the loop trains on: the prepared latents of each rank's rows in a seeded per-epoch order (`TrainData`)
and the text of each row with the unconditional-guidance rule (`TrainingText`, in `cxrdiff.training_text`,
which the report shares)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.data import LABELS
from cxrdiff.errors import InputError
from cxrdiff.formats import format_record
from cxrdiff.training_text import (
    NO_FINDING,
    TrainingText,
    check_prompt_source,
    strip_deid_markers,
)

__all__ = ["NO_FINDING", "TrainData", "TrainingText", "check_prompt_source", "fixed_size_binary", "strip_deid_markers"]


def fixed_size_binary(column: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A pyarrow binary column of equal-length float16 blobs as one (rows, *shape) array, without copies."""
    import pyarrow as pa

    chunk = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n, size = len(chunk), int(np.prod(shape)) * 2
    offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset : chunk.offset + n + 1]
    if n and not (np.diff(offsets) == size).all():
        raise InputError(f"latents of {size} bytes expected (shape {list(shape)}); a shard holds other sizes")
    data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[0] + n * size]
    return data.view("<f2").reshape(n, *shape)


def unreadable_shard(shard: Path, exc: Exception) -> InputError:
    """A shard pyarrow cannot read, named, with the first line of pyarrow's reason."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InputError(f"{shard}: not a readable prepared shard ({reason}); re-run `cxrdiff prepare` into a new folder")


class TrainData:
    """Rows in a seeded permutation per epoch; sample g of the run is row perm[epoch(g)][g mod rows].

    Global batch s is samples [s·B, (s+1)·B); within it, micro-step a of rank r takes every
    `world`-th sample starting at a·P·W + r. Each rank loads only its own rows of an epoch (and the
    next epoch in the background), so memory and reading are split over the ranks.
    """

    def __init__(self, folder: Path, shape: tuple[int, ...], seed: int, rank: int, world: int, with_logvar: bool):
        import pyarrow.parquet as pq

        self.shards = sorted(folder.glob("train-*.parquet"))
        if not self.shards:
            raise InputError(f"--data {folder}: no train-*.parquet shards")
        self.shape, self.seed, self.rank, self.world = tuple(shape), seed, rank, world
        self.columns = ["latent_mean", "latent_logvar"] if with_logvar else ["latent_mean"]
        counts, impressions, labels = [], [], []
        self.format = format_record(folder)
        text_column, label_columns = self.format.text_column, list(LABELS) if self.format.labelled else []
        for shard in self.shards:
            try:
                table = pq.read_table(shard, columns=[text_column, "latent_shape", *label_columns])
            except Exception as exc:  # pyarrow raises several types for missing columns and bad files
                raise unreadable_shard(shard, exc) from None
            if table.num_rows and tuple(table.column("latent_shape")[0].as_py()) != self.shape:
                raise InputError(f"{shard}: latent_shape {table.column('latent_shape')[0]} != {list(self.shape)}")
            counts.append(table.num_rows)
            impressions += table.column(text_column).to_pylist()
            if not self.format.labelled:
                labels.append(np.full((table.num_rows, len(LABELS)), np.nan, dtype=np.float32))
            else:
                labels.append(np.stack([table.column(n).to_numpy(zero_copy_only=False) for n in LABELS], axis=1))
        self.rows = sum(counts)
        if not self.rows:
            raise InputError(f"--data {folder}: the train shards hold no rows")
        self.offsets = np.cumsum([0, *counts])
        self.impressions = impressions
        self.labels = np.concatenate(labels).astype(np.float32)  # (rows, 14)
        self._epochs: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1)  # pyarrow reads release the GIL

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.rows)

    def _mine(self, epoch: int) -> tuple[int, np.ndarray]:
        """First in-epoch index this rank owns and the rows it will read for the epoch."""
        first = (self.rank - epoch * self.rows) % self.world
        return first, self.permutation(epoch)[first :: self.world]

    def _load_epoch(self, epoch: int) -> tuple[int, np.ndarray, np.ndarray]:
        import pyarrow.parquet as pq

        first, rows = self._mine(epoch)
        order = np.argsort(rows, kind="stable")
        latents = np.empty((len(rows), len(self.columns), *self.shape), dtype=np.float16)
        shard_of = np.searchsorted(self.offsets, rows[order], side="right") - 1
        for s in np.unique(shard_of):
            pick = order[shard_of == s]
            local = rows[pick] - self.offsets[s]
            try:  # the latents are read here, per epoch: a shard damaged after the first read fails now
                table = pq.read_table(self.shards[s], columns=self.columns, memory_map=True)
                for c, name in enumerate(self.columns):
                    latents[pick, c] = fixed_size_binary(table.column(name).take(local), self.shape)
            except InputError:
                raise
            except Exception as exc:  # pyarrow raises several types (ArrowInvalid, OSError) for damaged pages
                raise unreadable_shard(self.shards[s], exc) from None
        return first, rows, latents

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray, np.ndarray]:
        if epoch not in self._epochs:
            self._epochs[epoch] = self._pool.submit(self._load_epoch, epoch)
        for old in [e for e in self._epochs if e < epoch]:
            del self._epochs[old]
        if epoch + 1 not in self._epochs:
            self._epochs[epoch + 1] = self._pool.submit(self._load_epoch, epoch + 1)
        return self._epochs[epoch].result()

    def micro_batch(self, step: int, micro: int, per_device: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and stored latents (per_device, 1|2, C, H, W) of this rank's part of one micro-step."""
        start = step * batch_size + micro * per_device * self.world + self.rank
        rows, latents = [], []
        for g in range(start, start + per_device * self.world, self.world):
            epoch, index = divmod(g, self.rows)
            first, epoch_rows, epoch_latents = self._epoch(epoch)
            slot = (index - first) // self.world
            rows.append(epoch_rows[slot])
            latents.append(epoch_latents[slot])
        return np.asarray(rows), np.stack(latents)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
