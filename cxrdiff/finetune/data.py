"""What the loop trains on: the prepared latents of each rank's rows in a seeded per-epoch order (`TrainData`)
and the text of each row with the unconditional-guidance rule (`TrainingText`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.data import LABELS
from cxrdiff.errors import InputError

NO_FINDING = "No Finding"
DEID_MARKER = re.compile(r"[ \t]*(?:_{3,}[ \t]*)+")  # MIMIC's de-identification placeholders "___", their spaces
BEFORE_PUNCTUATION = re.compile(r"[ \t]*(?:_{3,}[ \t]*)+(?=[,.;:!?)]|$)")


def strip_deid_markers(text: str) -> str:
    """The text without MIMIC's "___" markers: a marker before punctuation or at the end goes with its spaces
    ("Compared to ___." → "Compared to."), one between words leaves one space ("Dr. ___ was" → "Dr. was"); a text
    left without a letter or digit ("___." → ".") is the empty prompt."""
    stripped = DEID_MARKER.sub(" ", BEFORE_PUNCTUATION.sub("", text)).strip()
    return stripped if any(c.isalnum() for c in stripped) else ""


class TrainingText:
    """The training text of each row (impression, class names, or a random alternative per class),
    with the unconditional-guidance rule: samples whose only positive label is No Finding get "".
    COCO rows (`any_row`) hold every caption of their image: one is drawn per step, and any row may get "".
    `deid_markers="strip"` removes MIMIC's "___" markers from every text (`strip_deid_markers`)."""

    def __init__(
        self,
        source: str,
        impressions: Sequence[Any],
        labels: np.ndarray,
        ucg: float,
        any_row=False,
        deid_markers: str = "keep",
    ):
        if deid_markers not in ("keep", "strip"):
            raise InputError(f"--deid-markers {deid_markers!r}: expected keep or strip")
        self.source, self.impressions, self.ucg = source, impressions, ucg
        self.strip = deid_markers == "strip"
        self.positive = labels == 1.0  # (rows, 14); NaN, 0 and -1 (uncertain) are not positive
        nf = LABELS.index(NO_FINDING)
        self.no_finding_only = self.positive[:, nf] & (self.positive.sum(axis=1) == 1)  # (rows,)
        self.eligible = np.ones(len(labels), dtype=bool) if any_row else self.no_finding_only  # (rows,)
        self.alternatives = check_prompt_source(source)

    def text(self, row: int, rng: np.random.Generator) -> str:
        text = self.drawn(row, rng)
        return strip_deid_markers(text) if self.strip else text

    def drawn(self, row: int, rng: np.random.Generator) -> str:
        """The row's text as the source gives it (markers kept)."""
        if self.source == "impression":
            value = self.impressions[row]
            if isinstance(value, list | tuple):  # COCO: every caption of the image, one drawn per step
                return str(value[rng.integers(len(value))])
            return str(value)
        classes = np.flatnonzero(self.positive[row])
        if self.source == "labels":  # the reference code: the class names in random order, space-joined
            return " ".join(LABELS[c] for c in rng.permutation(classes))
        picks = [c for c in classes if c in self.alternatives]
        if not len(classes) and LABELS.index(NO_FINDING) in self.alternatives:
            picks = [LABELS.index(NO_FINDING)]  # no positive label at all reads as a normal study
        return " ".join(self.alternatives[c][rng.integers(len(self.alternatives[c]))] for c in picks)

    def batch(self, rows: np.ndarray, rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Prompts for `rows`, whether each was eligible for the empty prompt, and whether it got it."""
        eligible = self.eligible[rows]  # (batch,)
        dropped = eligible & (rng.random(len(rows)) < self.ucg)  # (batch,)
        texts = ["" if d else self.text(int(r), rng) for r, d in zip(rows, dropped, strict=True)]
        return texts, eligible, dropped


def check_prompt_source(source: str) -> dict[int, list[str]]:
    """Validate `--prompt-source`; for `file:PATH` read its CSV (columns label, a CheXpert name, and text)."""
    import pandas as pd

    if not source.startswith("file:"):
        if source not in ("impression", "labels"):
            raise InputError(f"--prompt-source {source!r}: expected impression, labels or file:PATH")
        return {}
    path = Path(source[5:])
    if not path.is_file():
        raise InputError(f"--prompt-source file:{path}: file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"--prompt-source file:{path}: not a readable CSV ({exc})") from None
    missing = {"label", "text"} - set(table.columns)
    if missing:
        raise InputError(f"--prompt-source file:{path}: missing column(s) {', '.join(sorted(missing))}")
    unknown = sorted(set(table["label"]) - set(LABELS))
    if unknown:
        raise InputError(f"--prompt-source file:{path}: unknown label(s) {', '.join(unknown[:3])}")
    out: dict[int, list[str]] = {}
    for label, text in zip(table["label"], table["text"], strict=True):
        out.setdefault(LABELS.index(label), []).append(text)
    return out


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
        try:
            self.captions = "captions" in pq.read_schema(self.shards[0]).names  # COCO: every caption, no labels
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise unreadable_shard(self.shards[0], exc) from None
        text_column, label_columns = ("captions", []) if self.captions else ("impression", list(LABELS))
        for shard in self.shards:
            try:
                table = pq.read_table(shard, columns=[text_column, "latent_shape", *label_columns])
            except Exception as exc:  # pyarrow raises several types for missing columns and bad files
                raise unreadable_shard(shard, exc) from None
            if table.num_rows and tuple(table.column("latent_shape")[0].as_py()) != self.shape:
                raise InputError(f"{shard}: latent_shape {table.column('latent_shape')[0]} != {list(self.shape)}")
            counts.append(table.num_rows)
            impressions += table.column(text_column).to_pylist()
            if self.captions:
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
