"""`cxrdiff finetune`: train SD's UNet (and, for Finetune_L, its text encoder) on prepared latents.

One readable loop under accelerate, so the same code runs on one CPU, one GPU or many nodes:
check inputs and claim --out → plan the global batch → load the base model → build optimizer and EMA →
resume from the newest complete checkpoint → train (noise, timestep, epsilon or v target, MSE) →
export a diffusers pipeline folder, manifest last.

Exact resume is the design constraint: every random draw comes from generators whose states are saved
per rank, and the data order is a seeded, epoch-based permutation over all rows, so the data position
is just "samples consumed" and a resumed run continues at the exact step, not the start of an epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Literal, NoReturn

import numpy as np

from cxrdiff.artifacts import (
    MANIFEST,
    StepFolder,
    atomic_dir,
    atomic_path,
    input_identity,
    read_manifest,
)
from cxrdiff.config import settings, to_dict
from cxrdiff.console import interactive, log, progress
from cxrdiff.data import LABELS
from cxrdiff.errors import InputError, RunError
from cxrdiff.models import Components, check_model_folder
from cxrdiff.speed import limit_cpu_threads

STEP = "finetune"
DEFAULT_STEPS = {True: 30_000, False: 60_000}  # frozen / learnable text encoder (the paper)
NO_FINDING = "No Finding"
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
_RESULT_KEYS = ("steps", "text_encoder", "weights", "final_loss")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a fine-tuning run; saved in the output manifest and every checkpoint."""

    # Fields that do not change what is trained: a run folder resumes (or, finished, extends) under other
    # values of these; any other field differing is refused by the folder claim.
    NOT_SETTINGS: ClassVar[tuple[str, ...]] = (
        "out",
        "steps",
        "per_device_batch_size",
        "mixed_precision",
        "gradient_checkpointing",
        "checkpoint_every",
        "keep_checkpoints",
        "export_weights",
        "log_every",
        "validation_prompts",
        "validate_every",
        "validation_steps",
        "stop_after_step",
        "compile",
        "fused_adamw",
        "tf32",
        "channels_last",
    )

    data: Path | None = None
    base_model: Path | None = None
    out: Path | None = None
    frozen_text: bool | None = None
    steps: int | None = None
    batch_size: int = 256
    per_device_batch_size: int | None = None
    lr: float = 5e-5
    text_lr: float | None = None
    ucg_no_finding: float = 0.3
    ucg_caption: float = 0.1  # COCO data (prepare --format coco): P(empty prompt) for any caption, the common rule
    prompt_source: str = "impression"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    ema: bool = False
    ema_decay: float = 0.9999
    export_weights: Literal["raw", "ema"] = "raw"
    seed: int = 0
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None
    latent_sampling: Literal["sample", "mean"] = "sample"
    weight_decay: float = 0.01
    log_every: int = 10
    validation_prompts: tuple[str, ...] = ()
    validate_every: int = 0
    validation_steps: int = 25
    stop_after_step: int | None = None  # act as if preempted after this step (tests, SLURM drills)
    # speed levers (cxrdiff.speed): same results up to float noise, so a resumed run may change them
    compile: bool = False  # torch.compile the UNet
    fused_adamw: bool = False  # fused AdamW kernel (GPUs)
    tf32: bool = False  # TF32 matmuls and convolutions (NVIDIA GPUs)
    channels_last: bool = False  # NHWC memory format for the UNet


# --- input checks (no weights read) ----------------------------------------------------------


def batch_plan(batch_size: int, per_device: int | None, processes: int) -> tuple[int, int]:
    """Split the global batch: per_device × processes × accumulation = batch_size, or an InputError."""
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    if batch_size % processes:
        raise InputError(f"--batch-size {batch_size} is not divisible by the {processes} processes")
    if per_device is None:
        per_device = min(16, batch_size // processes)
        while (batch_size // processes) % per_device:
            per_device -= 1
    if per_device < 1:
        raise InputError(f"--per-device-batch-size {per_device}: must be at least 1")
    if (batch_size // processes) % per_device:
        raise InputError(
            f"--batch-size {batch_size} is not per-device {per_device} × {processes} processes × an integer "
            "number of accumulation steps; choose --per-device-batch-size dividing "
            f"{batch_size // processes}"
        )
    return per_device, batch_size // (processes * per_device)


def _config_components(model: Path) -> Components:
    """Components holding only the configs, so shape checks use the model's own arithmetic before any load."""

    def cfg(part: str, name: str = "config.json") -> SimpleNamespace:
        try:
            return SimpleNamespace(config=SimpleNamespace(**json.loads((model / part / name).read_text())))
        except json.JSONDecodeError as exc:
            raise InputError(f"{model / part / name}: not valid JSON ({exc})") from None

    comps = Components(cfg("unet"), cfg("vae"), None, None, None, path=model)
    if not hasattr(comps.vae.config, "scaling_factor"):
        comps.vae.config.scaling_factor = 0.18215  # diffusers' default when the config omits it
    return comps


def check_prepared(data: Path, model: Path) -> dict[str, Any]:
    """Refuse a prepared folder whose latents were not made by this base model's VAE at its resolution."""
    manifest = read_manifest(data, "prepare")
    known = {**manifest.get("config", {}), **manifest}  # prepare records these at the top level
    comps = _config_components(model)
    for key in ("latent_shape", "scaling_factor", "resolution"):
        if key not in known:
            raise InputError(f"{data / MANIFEST}: no '{key}'; re-run `cxrdiff prepare`")
    if tuple(known["latent_shape"]) != comps.latent_shape or int(known["resolution"]) != comps.resolution:
        raise InputError(
            f"--data {data}: latents {list(known['latent_shape'])} at {known['resolution']} px do not fit "
            f"--base-model {model} (latents {list(comps.latent_shape)} at {comps.resolution} px); "
            "prepare the data with this base model"
        )
    if not math.isclose(float(known["scaling_factor"]), comps.scaling_factor, rel_tol=1e-6):
        raise InputError(
            f"--data {data}: VAE scaling factor {known['scaling_factor']} differs from --base-model {model}'s "
            f"{comps.scaling_factor}; prepare the data with this base model"
        )
    from cxrdiff.models import vae_fingerprint

    stored, mine = known.get("vae_fingerprint"), vae_fingerprint(model)
    if stored is None:
        log.warning(f"{data / MANIFEST}: cannot verify that its latents came from {model}'s VAE (no fingerprint)")
    elif stored != mine:
        raise InputError(
            f"--data {data}: latents were made by a different VAE than --base-model {model}'s "
            "(vae_fingerprint differs); prepare the data with this base model"
        )
    return manifest


def _with_defaults(config: FinetuneConfig) -> FinetuneConfig:
    """Fill derived defaults (steps, text lr) and refuse bad values, before anything heavy happens."""
    for name in ("data", "base_model", "out"):
        if getattr(config, name) is None:
            raise InputError(f"--{name.replace('_', '-')} is required")
    if config.frozen_text is None:
        raise InputError("choose --frozen-text (Finetune_F) or --learnable-text (Finetune_L)")
    steps = config.steps if config.steps is not None else DEFAULT_STEPS[config.frozen_text]
    for name, value, low in (
        ("steps", steps, 1),
        ("checkpoint-every", config.checkpoint_every, 1),
        ("keep-checkpoints", config.keep_checkpoints, 1),
        ("log-every", config.log_every, 1),
        ("validate-every", config.validate_every, 0),
    ):
        if value < low:
            raise InputError(f"--{name} {value}: must be at least {low}")
    for name, value in (("lr", config.lr), ("text-lr", config.text_lr)):
        if value is not None and not value > 0:
            raise InputError(f"--{name} {value}: must be positive")
    if not 0.0 <= config.ucg_no_finding <= 1.0:
        raise InputError(f"--ucg-no-finding {config.ucg_no_finding}: must be a probability in [0, 1]")
    if not 0.0 <= config.ucg_caption <= 1.0:
        raise InputError(f"--ucg-caption {config.ucg_caption}: must be a probability in [0, 1]")
    if config.export_weights == "ema" and not config.ema:
        raise InputError("--export-weights ema needs --ema")
    if config.snr_gamma is not None and not config.snr_gamma > 0:
        raise InputError(f"--snr-gamma {config.snr_gamma}: must be positive")
    return dataclasses.replace(config, steps=steps, text_lr=config.text_lr if config.text_lr is not None else config.lr)


def run_settings(config: FinetuneConfig) -> dict[str, Any]:
    """What a run folder's settings key is made of: the config less its NOT_SETTINGS, with the data, the
    base model and a prompt file by identity (a re-prepared data folder is another run)."""
    source = config.prompt_source
    if source.startswith("file:"):
        source = f"file:{input_identity(source[5:])}"
    identities = {"data": input_identity(config.data), "base_model": input_identity(config.base_model)}
    mine = settings(config, prompt_source=source, **identities)
    unused = "ucg_no_finding" if data_format(config.data) == "coco" else "ucg_caption"  # the other data's UCG rule
    return {k: v for k, v in mine.items() if k != unused}


def data_format(data: Path | None) -> str:
    """The prepared folder's format: coco (`prepare --format coco`), else mimic (also with no manifest to read)."""
    try:
        return str(json.loads((Path(data) / MANIFEST).read_text()).get("format", "mimic"))
    except (TypeError, OSError, ValueError):
        return "mimic"


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What `check_inputs` accepted: the config with its defaults filled, the --out folder and the model."""

    config: FinetuneConfig
    folder: StepFolder
    model_dir: Path


def check_inputs(config: FinetuneConfig) -> Inputs:
    """Refuse bad values, data that does not fit the base model and an --out that cannot hold this run,
    all before any weight is read. The claim only checks here: it is written once the batch plan (which
    needs the process count) is accepted, so a refused run leaves no folder behind."""
    config = _with_defaults(config)
    model_dir = check_model_folder(config.base_model)
    check_prepared(Path(config.data), model_dir)
    check_prompt_source(config.prompt_source)
    if data_format(config.data) == "coco" and config.prompt_source != "impression":
        raise InputError(f"--prompt-source {config.prompt_source}: COCO data trains on its captions (impression)")
    folder = StepFolder.claim(config.out, STEP, run_settings(config), create=False)
    if folder.state != "new":
        Checkpoints(folder.out).check(config.steps)
    return Inputs(config, folder, model_dir)


# --- training text ----------------------------------------------------------------------------


class TrainingText:
    """The training text of each row (impression, class names, or a random alternative per class),
    with the unconditional-guidance rule: samples whose only positive label is No Finding get "".
    COCO rows (`any_row`) hold every caption of their image: one is drawn per step, and any row may get ""."""

    def __init__(self, source: str, impressions: Sequence[Any], labels: np.ndarray, ucg: float, any_row=False):
        self.source, self.impressions, self.ucg = source, impressions, ucg
        self.positive = labels == 1.0  # (rows, 14); NaN, 0 and -1 (uncertain) are not positive
        nf = LABELS.index(NO_FINDING)
        self.no_finding_only = self.positive[:, nf] & (self.positive.sum(axis=1) == 1)  # (rows,)
        self.eligible = np.ones(len(labels), dtype=bool) if any_row else self.no_finding_only  # (rows,)
        self.alternatives = check_prompt_source(source)

    def text(self, row: int, rng: np.random.Generator) -> str:
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


# --- data -------------------------------------------------------------------------------------


def _fixed_size_binary(column: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A pyarrow binary column of equal-length float16 blobs as one (rows, *shape) array, without copies."""
    import pyarrow as pa

    chunk = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n, size = len(chunk), int(np.prod(shape)) * 2
    offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset : chunk.offset + n + 1]
    if n and not (np.diff(offsets) == size).all():
        raise InputError(f"latents of {size} bytes expected (shape {list(shape)}); a shard holds other sizes")
    data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[0] + n * size]
    return data.view("<f2").reshape(n, *shape)


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
        self.captions = "captions" in pq.read_schema(self.shards[0]).names  # COCO: every caption, no labels
        text_column, label_columns = ("captions", []) if self.captions else ("impression", list(LABELS))
        for shard in self.shards:
            try:
                table = pq.read_table(shard, columns=[text_column, "latent_shape", *label_columns])
            except Exception as exc:  # pyarrow raises several types for missing columns and bad files
                raise InputError(f"{shard}: not a readable prepared shard ({str(exc).splitlines()[0]})") from None
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
            table = pq.read_table(self.shards[s], columns=self.columns, memory_map=True)
            local = rows[pick] - self.offsets[s]
            for c, name in enumerate(self.columns):
                latents[pick, c] = _fixed_size_binary(table.column(name).take(local), self.shape)
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


# --- the model --------------------------------------------------------------------------------


def _module_class() -> type:
    import torch

    class TextToNoise(torch.nn.Module):
        """UNet and text encoder in one module, so DDP, FSDP and DeepSpeed wrap, sync and save one model."""

        def __init__(self, unet: Any, text_encoder: Any, train_text: bool):
            super().__init__()
            self.unet, self.text_encoder, self.train_text = unet, text_encoder, train_text

        def forward(self, noisy: Any, timesteps: Any, input_ids: Any, attention_mask: Any = None) -> Any:
            with contextlib.nullcontext() if self.train_text else torch.no_grad():
                hidden = self.text_encoder(input_ids, attention_mask=attention_mask)[0]  # (batch, tokens, width)
            return self.unet(noisy, timesteps, encoder_hidden_states=hidden).sample  # (batch, C, H, W)

    return TextToNoise


# --- checkpoints ------------------------------------------------------------------------------


class Checkpoints:
    """A run's resumable states, `out/checkpoints/step-NNNNNNN/`: accelerate's model, optimizer and LR
    scheduler state, the EMA, every rank's generators (`rng-R.pt`) and the data position (`state.json`).

    A checkpoint is complete or absent: all ranks write into one hidden folder that is renamed when
    every rank is done. Only the newest `keep` stay. Whether a checkpoint may be resumed under a
    config is the folder claim's decision (`run_settings`), not the checkpoint's.
    """

    def __init__(self, out: Path, keep: int = 1) -> None:
        self.out, self.folder, self.keep = Path(out), Path(out) / CHECKPOINTS, keep

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:07d}"

    def saved(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (a half-written one is still under a hidden temporary name)."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := re.fullmatch(r"step-(\d{7})", p.name))]
        return sorted(f for f in found if (f[1] / "state.json").is_file())

    def latest(self) -> tuple[int, Path] | None:
        saved = self.saved()
        return saved[-1] if saved else None

    def check(self, steps: int, processes: int | None = None) -> None:
        """Refuse resuming a run already past `steps`, or one saved by another number of processes."""
        latest = self.latest()
        if latest is None:
            return
        step, path = latest
        if step > steps:
            raise InputError(f"--out {self.out}: holds a run already at step {step}, past --steps {steps}")
        if processes is None:
            return
        saved_by = json.loads((path / "state.json").read_text())["processes"]
        if saved_by != processes:
            raise InputError(
                f"--out {self.out}: checkpoints from {saved_by} processes, now {processes}; resume with as many"
            )

    def save(self, run: TrainingRun, step: int, rng: dict[str, Any]) -> Path:
        """Every rank writes its part (`rng` is its generators' state) into one folder; prune old ones."""
        import torch
        from accelerate.utils import broadcast_object_list

        accelerator, final = run.accelerator, self.path(step)
        with contextlib.ExitStack() as stack:
            holder = [stack.enter_context(atomic_dir(final)) if run.main else None]
            broadcast_object_list(holder)
            tmp = Path(holder[0])
            accelerator.wait_for_everyone()
            accelerator.save_state(tmp, safe_serialization=True)
            torch.save({**rng, **_save_ema(run, tmp)}, tmp / f"rng-{run.rank}.pt")
            accelerator.wait_for_everyone()
            if run.main:
                samples = step * run.config.batch_size
                state = {"step": step, "samples_seen": samples, "processes": run.world, "config": to_dict(run.config)}
                (tmp / "state.json").write_text(json.dumps(state, indent=2))
        accelerator.wait_for_everyone()
        if run.main:
            for _, old in self.saved()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, run: TrainingRun, path: Path) -> None:
        """Restore weights, optimizer, LR scheduler, EMA and this rank's generators from `path`."""
        import torch

        run.accelerator.load_state(path)
        own = torch.load(path / f"rng-{run.rank}.pt", weights_only=True)
        if run.ema is not None:
            from safetensors.torch import load_file

            shadow = load_file(path / "ema.safetensors")
            run.ema.load_state_dict({**own["ema"], "shadow_params": [shadow[n] for n in run.unet_names()]})
            run.ema.to(run.device)
        _set_rng_state(own, run.gen, run.np_gen)


def _save_ema(run: TrainingRun, folder: Path) -> dict[str, Any]:
    """The EMA's shadow weights as safetensors (main process); its small state goes in every rank's file."""
    if run.ema is None:
        return {}
    ema_state = run.ema.state_dict()
    if run.main:
        from safetensors.torch import save_file

        params = zip(run.unet_names(), ema_state["shadow_params"], strict=True)
        save_file({n: t.detach().cpu().contiguous() for n, t in params}, folder / "ema.safetensors")
    return {"ema": {k: v for k, v in ema_state.items() if k != "shadow_params"}}


def _rng_state(gen: Any, np_gen: np.random.Generator) -> dict[str, Any]:
    import torch

    state = {
        "generator": gen.get_state(),
        "numpy_generator": json.dumps(np_gen.bit_generator.state),
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], gen: Any, np_gen: np.random.Generator) -> None:
    import torch

    gen.set_state(state["generator"])
    np_gen.bit_generator.state = json.loads(state["numpy_generator"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = json.loads(state["numpy"])
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- a kept checkpoint as a model ---------------------------------------------------------------

CHECKPOINT_STEP = "checkpoint"  # the step name of an exported checkpoint's folder (sample and ground take it)


def checkpoint_identity(path: Path) -> dict[str, Any]:
    """What identifies a checkpoint without reading its weights: its state.json (step, run config) by sha256
    and its weight files by name, size and mtime (a retrained run rewrites them)."""
    import hashlib

    state = hashlib.sha256((path / "state.json").read_bytes()).hexdigest()
    weights = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.glob("*.safetensors"))}
    return {"state_sha256": state, "weights": weights}


def export_checkpoint(run: str | os.PathLike, step: int, out: str | os.PathLike) -> dict[str, Any]:
    """Write the kept checkpoint `step` of a finished run as a model folder (a `checkpoint` step folder):
    the run's VAE, tokenizer and scheduler with the checkpoint's UNet and text encoder, the UNet's EMA when
    the run exported EMA weights; so `sample` and `ground` read it as they read the run. The weights are
    exactly those the run's own export would have written at that step. Returns at once when `out` holds
    this checkpoint's export already."""
    from safetensors.torch import load_file

    from cxrdiff.models import load_components, save_components

    run, out = Path(run), Path(out)
    manifest = read_manifest(run, STEP)
    kept = dict(Checkpoints(run).saved())
    if step not in kept:
        have = ", ".join(str(s) for s in kept) or "none"
        raise InputError(f"{run}: no kept checkpoint at step {step} (kept: {have})")
    path, weights = kept[step], manifest.get("weights", "raw")
    wanted = {"run": os.fspath(run.resolve()), "step": step, "weights": weights}
    wanted["checkpoint"] = checkpoint_identity(path)
    folder = StepFolder.claim(out, CHECKPOINT_STEP, wanted)
    if folder.finished:
        return {"out": str(out), "step": step}
    comps = load_components(run)
    state = load_file(path / "model.safetensors")
    comps.text_encoder.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")})
    if weights == "ema":
        comps.unet.load_state_dict(load_file(path / "ema.safetensors"))
    else:
        comps.unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    save_components(comps, out)
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    folder.finish(
        config={"run": os.fspath(run), "step": step},
        inputs={"run": run},
        seed=manifest.get("seed"),
        files=files,
        extra={"steps": step, "text_encoder": manifest.get("text_encoder"), "weights": weights},
    )
    return {"out": str(out), "step": step}


# --- the run ----------------------------------------------------------------------------------


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Train, checkpoint, resume and export; returns where the model is and what the run did."""
    inputs = check_inputs(config)
    config, folder = inputs.config, inputs.folder
    if folder.finished and folder.manifest.get("steps") == config.steps:
        log.info(f"{folder.out}: already trained to step {config.steps}; nothing to do")
        return _result(folder.out, folder.manifest)
    accelerator, trackers = _start_accelerator(config)
    limit_cpu_threads(accelerator.device)
    per_device, accum = _plan_batch(accelerator, config)
    checkpoints = Checkpoints(folder.out, config.keep_checkpoints)
    _own_folder(accelerator, folder, checkpoints, config.steps)
    run = _load_run(config, inputs.model_dir, accelerator, per_device, accum)
    start = _resume(run, checkpoints)
    if accelerator.is_main_process and trackers:
        accelerator.init_trackers(STEP, config={k: v for k, v in _flat(config).items() if v is not None})
    last_loss = _train(run, checkpoints, start)
    if config.validation_prompts and not (config.validate_every and config.steps % config.validate_every == 0):
        _validate(run, config.steps)
    result = _export(run, folder, last_loss)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also ends the process group: last
    return result


def _result(out: Path, values: dict[str, Any]) -> dict[str, Any]:
    return {"out": str(out), **{k: values[k] for k in _RESULT_KEYS}}


def _start_accelerator(config: FinetuneConfig) -> tuple[Any, str | None]:
    """The accelerate state of this process (and the trackers it logs to, if tensorboard is installed)."""
    from accelerate import Accelerator

    trackers = "tensorboard" if _has_tensorboard() else None
    try:
        accelerator = Accelerator(
            mixed_precision=config.mixed_precision, log_with=trackers, project_dir=Path(config.out) / "logs"
        )
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"--mixed-precision {config.mixed_precision}: {str(exc).splitlines()[0]}") from None
    return accelerator, trackers


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def _flat(config: FinetuneConfig) -> dict[str, Any]:
    return {k: (", ".join(v) if isinstance(v, list) else v) for k, v in to_dict(config).items()}


def _plan_batch(accelerator: Any, config: FinetuneConfig) -> tuple[int, int]:
    """Per-device batch and accumulation steps for this many processes (see `batch_plan`)."""
    world = accelerator.num_processes
    per_device, accum = batch_plan(config.batch_size, config.per_device_batch_size, world)
    if accelerator.is_main_process:
        log.info(
            f"global batch {config.batch_size} = {per_device} per device × {world} processes × {accum} "
            f"accumulation steps; {config.steps} steps; text encoder "
            + ("frozen" if config.frozen_text else f"learnable (lr {config.text_lr})")
        )
    return per_device, accum


def _own_folder(accelerator: Any, folder: StepFolder, checkpoints: Checkpoints, steps: int) -> None:
    """Write the claim (main process) once the run is accepted for this process count; a finished run
    given more steps becomes unfinished again (claim first, then no manifest) and resumes."""
    checkpoints.check(steps, processes=accelerator.num_processes)
    if accelerator.is_main_process:
        if folder.finished:
            folder.reopen()
        else:
            StepFolder.claim(folder.out, folder.step, folder.settings)
    accelerator.wait_for_everyone()


@dataclasses.dataclass
class TrainingRun:
    """Everything one process trains with (built by `_load_run`); the phases below take it whole."""

    config: FinetuneConfig
    accelerator: Any
    per_device: int
    accum: int
    comps: Components
    data: TrainData
    text: TrainingText
    model: Any  # the prepared TextToNoise module
    optimizer: Any
    lr_scheduler: Any
    ema: Any  # diffusers' EMAModel of the UNet, or None
    noise_scheduler: Any
    gen: Any  # this rank's torch generator: every tensor draw
    np_gen: np.random.Generator  # this rank's numpy generator: UCG and alternative prompts

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> Any:
        return self.accelerator.device

    def unet_names(self) -> list[str]:
        return [n for n, _ in self.accelerator.unwrap_model(self.model).unet.named_parameters()]


def _load_run(config: FinetuneConfig, model_dir: Path, accelerator: Any, per_device: int, accum: int) -> TrainingRun:
    """Load the base model and this rank's data, build the model, optimizer and EMA, seed the generators."""
    from diffusers import DDPMScheduler

    from cxrdiff.models import load_components

    rank, world = accelerator.process_index, accelerator.num_processes
    comps = load_components(model_dir)
    with_logvar = config.latent_sampling == "sample"
    data = TrainData(Path(config.data), comps.latent_shape, config.seed, rank, world, with_logvar=with_logvar)
    ucg = config.ucg_caption if data.captions else config.ucg_no_finding
    text = TrainingText(config.prompt_source, data.impressions, data.labels, ucg, any_row=data.captions)
    model, optimizer, lr_scheduler, ema = _build_model(config, comps, accelerator)
    noise_scheduler = DDPMScheduler.from_config(comps.scheduler.config)
    prediction = noise_scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise InputError(f"--base-model {model_dir}: prediction_type {prediction!r} is not epsilon or v_prediction")
    gen, np_gen = _seeded_generators(config.seed, rank, accelerator.device)
    return TrainingRun(
        config=config,
        accelerator=accelerator,
        per_device=per_device,
        accum=accum,
        comps=comps,
        data=data,
        text=text,
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        ema=ema,
        noise_scheduler=noise_scheduler,
        gen=gen,
        np_gen=np_gen,
    )


def _build_model(config: FinetuneConfig, comps: Components, accelerator: Any) -> tuple[Any, Any, Any, Any]:
    """UNet and text encoder as one prepared module (the text encoder trained only when learnable),
    AdamW at a constant learning rate as the paper, and the UNet's EMA with --ema."""
    import torch

    from cxrdiff.speed import set_tf32, speed_up_unet

    set_tf32(config.tf32)
    unet, text_encoder = comps.unet, comps.text_encoder
    unet.train().requires_grad_(True)
    text_encoder.train(not config.frozen_text).requires_grad_(not config.frozen_text)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if not config.frozen_text:
            text_encoder.gradient_checkpointing_enable()
    speed_up_unet(unet, compile=config.compile, channels_last=config.channels_last)
    model = _module_class()(unet, text_encoder, train_text=not config.frozen_text)
    groups = [{"params": list(unet.parameters()), "lr": config.lr}]
    if not config.frozen_text:
        groups.append({"params": list(text_encoder.parameters()), "lr": config.text_lr})
    optimizer = torch.optim.AdamW(
        groups, betas=(0.9, 0.999), weight_decay=config.weight_decay, eps=1e-8, fused=config.fused_adamw or None
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema = None
    if config.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(accelerator.unwrap_model(model).unet.parameters(), decay=config.ema_decay)
        ema.to(accelerator.device)
    return model, optimizer, lr_scheduler, ema


def _seeded_generators(seed: int, rank: int, device: Any) -> tuple[Any, np.random.Generator]:
    """This rank's generators for every draw of the run; the global RNGs are seeded alike for libraries."""
    import torch

    seeds = np.random.SeedSequence([seed, rank]).generate_state(2)
    gen = torch.Generator(device=device).manual_seed(int(seeds[0]))
    np_gen = np.random.default_rng(int(seeds[1]))
    random.seed(int(seeds[0]))
    np.random.seed(int(seeds[1]) % 2**32)
    torch.manual_seed(int(seeds[0]))
    return gen, np_gen


def _resume(run: TrainingRun, checkpoints: Checkpoints) -> int:
    """Load the newest checkpoint, if any; returns the step training continues from."""
    train_log = run.out / TRAIN_LOG
    latest = checkpoints.latest()
    if latest is None:
        if run.main and train_log.exists():
            _truncate_log(train_log, 0)
        return 0
    start, path = latest
    checkpoints.load(run, path)
    if run.main:
        log.info(f"resuming {run.out} at step {start} from {path.name}")
        _truncate_log(train_log, start)
    return start


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step, so a resumed run's log reads like an uninterrupted one."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))


# --- the training loop ------------------------------------------------------------------------


def _train(run: TrainingRun, checkpoints: Checkpoints, start: int) -> float:
    """Train from step `start` to the end; returns the last step's loss."""
    steps: Iterable[int] = range(start, run.config.steps)
    if run.main:
        steps = progress(steps, total=run.config.steps - start, description=STEP)
    train_log = _TrainLog(run)
    last_loss = float("nan")
    try:
        with _StopFlag() as stop:
            for step in steps:
                last_loss = _train_step(run, checkpoints, train_log, stop, step)
    finally:
        train_log.close()
        run.data.close()
    return last_loss


def _train_step(run: TrainingRun, checkpoints: Checkpoints, train_log: _TrainLog, stop: _StopFlag, step: int) -> float:
    """One optimizer step over all micro-steps, then its log line, checkpoint, validation and signal check."""
    config = run.config
    rng_before = _rng_state(run.gen, run.np_gen)
    stats = _accumulate(
        run, step, stop
    )  # summed over ranks: each rank's mean loss, UCG eligible, UCG dropped, signals seen
    loss = stats[0].item() / run.world
    if not math.isfinite(loss):
        _stop_on_nan(run, checkpoints, step, loss, rng_before)
    grad_norm = _optimizer_step(run)
    done = step + 1
    train_log.step(done, loss, grad_norm, stats)
    if config.stop_after_step is not None and done == config.stop_after_step:
        os.kill(os.getpid(), signal.SIGUSR1)  # a drill: exactly what SLURM's preemption signal does
        time.sleep(0.01)  # let the handler run
        stats[3] += float(stop.raised is not None)
    preempted = stats[3].item() > 0
    if done % config.checkpoint_every == 0 or done == config.steps or preempted:
        checkpoints.save(run, done, _rng_state(run.gen, run.np_gen))
    if config.validation_prompts and config.validate_every and done % config.validate_every == 0:
        _validate(run, done)
    if preempted:
        raise RunError(f"stopped by a signal after step {done}; re-run the same command to resume")
    return loss


def _accumulate(run: TrainingRun, step: int, stop: _StopFlag) -> Any:
    """Forward and backward over this rank's micro-steps; the step's statistics reduced over the ranks."""
    import torch

    loss_sum = torch.zeros((), device=run.device)
    eligible = dropped = 0
    for micro in range(run.accum):
        loss, elig, drop = _micro_step(run, step, micro)
        loss_sum += loss
        eligible, dropped = eligible + elig, dropped + drop
    stats = torch.tensor(
        [loss_sum.item() / run.accum, eligible, dropped, float(stop.raised is not None)],
        device=run.device,
        dtype=torch.float64,
    )
    return run.accelerator.reduce(stats, reduction="sum")


def _micro_step(run: TrainingRun, step: int, micro: int) -> tuple[Any, int, int]:
    """One micro-batch: prompts (UCG rule), latent draw, noise, timestep, loss, backward (gradients
    synchronised on the last micro-step only). Returns the loss and the UCG eligible/dropped counts."""
    import torch

    config, device, accelerator, scheduler = run.config, run.device, run.accelerator, run.noise_scheduler
    rows, stored = run.data.micro_batch(step, micro, run.per_device, config.batch_size)
    texts, eligible, dropped = run.text.batch(rows, run.np_gen)
    tokenizer = run.comps.tokenizer
    tokens = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    stored = torch.from_numpy(stored).to(device, torch.float32)  # (batch, 1|2, C, H, W)
    latents = stored[:, 0]  # (batch, C, H, W)
    if config.latent_sampling == "sample":
        eps = torch.randn(latents.shape, generator=run.gen, device=device)  # (batch, C, H, W)
        latents = latents + torch.exp(0.5 * stored[:, 1]) * eps
    latents = latents * run.comps.scaling_factor
    noise = torch.randn(latents.shape, generator=run.gen, device=device)  # (batch, C, H, W)
    t = torch.randint(0, int(scheduler.config.num_train_timesteps), (len(rows),), generator=run.gen, device=device)
    noisy = scheduler.add_noise(latents, noise, t)
    prediction = scheduler.config.prediction_type
    target = noise if prediction == "epsilon" else scheduler.get_velocity(latents, noise, t)
    use_mask = bool(getattr(run.comps.text_encoder.config, "use_attention_mask", False))
    mask = tokens.attention_mask.to(device) if use_mask else None
    sync = contextlib.nullcontext() if micro == run.accum - 1 else accelerator.no_sync(run.model)
    with sync:
        with accelerator.autocast():
            pred = run.model(noisy, t, tokens.input_ids.to(device), mask)  # ids: (batch, tokens)
        loss = _loss(pred.float(), target.float(), t, scheduler, config.snr_gamma, prediction)
        accelerator.backward(loss / run.accum)
    return loss.detach(), int(eligible.sum()), int(dropped.sum())


def _loss(pred: Any, target: Any, t: Any, scheduler: Any, snr_gamma: float | None, prediction: str) -> Any:
    """MSE on the target; with `snr_gamma`, Min-SNR weighting (Hang et al. 2023) per sample."""
    import torch.nn.functional as F

    if snr_gamma is None:
        return F.mse_loss(pred, target)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, t)  # (batch,)
    weight = snr.clamp(max=snr_gamma) / (snr + 1 if prediction == "v_prediction" else snr)  # (batch,)
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=tuple(range(1, pred.ndim)))  # (batch,)
    return (per_sample * weight).mean()


def _optimizer_step(run: TrainingRun) -> Any:
    """Clip, step, zero the gradients and update the EMA; returns the gradient norm (None unclipped)."""
    grad_norm = None
    if run.config.max_grad_norm > 0:
        grad_norm = run.accelerator.clip_grad_norm_(run.model.parameters(), run.config.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(run.accelerator.unwrap_model(run.model).unet.parameters())
    return grad_norm


def _stop_on_nan(
    run: TrainingRun, checkpoints: Checkpoints, step: int, loss: float, rng_before: dict[str, Any]
) -> NoReturn:
    """Stop on a non-finite loss, keeping (or saving) the state before this step for inspection."""
    run.optimizer.zero_grad(set_to_none=True)
    path = checkpoints.path(step)
    if not path.is_dir():
        path = checkpoints.save(run, step, rng_before)
    raise RunError(f"loss is {loss} at step {step + 1}; the last good state (step {step}) is in {path}")


class _StopFlag:
    """SIGTERM / SIGUSR1 (SLURM preemption) only set a flag; ranks agree on it at a step boundary."""

    def __init__(self) -> None:
        self.raised: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = signum

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread: signals cannot be caught here
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _TrainLog:
    """`train_log.jsonl` (main process), the trackers and plain progress lines in batch jobs; images/s
    is measured over the steps since the last line."""

    def __init__(self, run: TrainingRun) -> None:
        self.run = run
        self.file = open(run.out / TRAIN_LOG, "a") if run.main else None  # noqa: SIM115 (append-only log)
        self.window_start, self.window_images = time.perf_counter(), 0

    def step(self, done: int, loss: float, grad_norm: Any, stats: Any) -> None:
        config, optimizer = self.run.config, self.run.optimizer
        self.window_images += config.batch_size
        if self.file is None or not (done % config.log_every == 0 or done == config.steps):
            return
        elapsed = time.perf_counter() - self.window_start
        record = {
            "step": done,
            "loss": loss,
            "lr": optimizer.param_groups[0]["lr"],
            "text_lr": None if config.frozen_text else optimizer.param_groups[1]["lr"],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "images_per_s": self.window_images / elapsed if elapsed > 0 else None,
            "memory_mb": _memory_mb(self.run.device),
            "ucg_eligible": int(stats[1].item()),
            "ucg_dropped": int(stats[2].item()),
            "epoch": done * config.batch_size // self.run.data.rows,
        }
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.run.accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=done)
        if not interactive():
            log.info(f"step {done}/{config.steps} loss {loss:.4f} {record['images_per_s']:.1f} img/s")
        self.window_start, self.window_images = time.perf_counter(), 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _memory_mb(device: Any) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- validation and export --------------------------------------------------------------------


def _validate(run: TrainingRun, step: int) -> None:
    """Render the validation prompts with the current weights (main process; others wait)."""
    import torch

    accelerator, comps, config = run.accelerator, run.comps, run.config
    if run.main:
        from diffusers import StableDiffusionPipeline

        inner = accelerator.unwrap_model(run.model)
        pipe = StableDiffusionPipeline(
            vae=comps.vae.to(accelerator.device),
            text_encoder=inner.text_encoder,
            tokenizer=comps.tokenizer,
            unet=inner.unet,
            scheduler=comps.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        folder = run.out / "validation" / f"step-{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        inner.eval()
        with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
            for i, prompt in enumerate(config.validation_prompts):
                generator = torch.Generator(accelerator.device).manual_seed(config.seed + i)
                image = pipe(prompt, num_inference_steps=config.validation_steps, generator=generator).images[0]
                with atomic_path(folder / f"{i:02d}.png") as tmp:
                    image.save(tmp, format="PNG")
        inner.unet.train()
        inner.text_encoder.train(not config.frozen_text)
        comps.vae.to("cpu")
    accelerator.wait_for_everyone()


def _export(run: TrainingRun, folder: StepFolder, last_loss: float) -> dict[str, Any]:
    """Write the pipeline folder (main process), then the manifest, last, which marks the run finished."""
    config, out = run.config, run.out
    state = run.accelerator.get_state_dict(run.model)  # full weights on the main process under DDP/FSDP/DeepSpeed
    extra = {
        "steps": config.steps,
        "text_encoder": "frozen" if config.frozen_text else "learnable",
        "weights": config.export_weights,
        "ema": config.ema,
        "global_batch_size": config.batch_size,
        "per_device_batch_size": run.per_device,
        "processes": run.world,
        "gradient_accumulation_steps": run.accum,
        "images_seen": config.steps * config.batch_size,
        "prediction_type": run.comps.prediction_type,
        "latent_sampling": config.latent_sampling,
        "final_loss": last_loss,
        "ucg_rule": {"eligible": "any caption", "p": config.ucg_caption}
        if run.data.captions
        else {"eligible": "samples whose only positive label is No Finding", "p": config.ucg_no_finding},
    }
    if run.main:
        _write_pipeline(run, state)
        relative = (p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
        files = [
            r.as_posix() for r in relative if r.parts[0] != CHECKPOINTS and not any(s.startswith(".") for s in r.parts)
        ]
        folder.finish(
            config=to_dict(config),
            inputs={"data": config.data, "base_model": config.base_model},
            seed=config.seed,
            files=files,
            extra=extra,
        )
    return _result(out, extra)


def _write_pipeline(run: TrainingRun, state: dict[str, Any]) -> None:
    """Base parts + trained UNet (+ text encoder if learnable); with --ema the other UNet beside it."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from cxrdiff.models import save_components

    comps, config, out = run.comps, run.config, run.out
    unet = UNet2DConditionModel.from_config(comps.unet.config)
    unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    ema_unet = None
    if run.ema is not None:
        ema_unet = UNet2DConditionModel.from_config(comps.unet.config)
        run.ema.copy_to(ema_unet.parameters())
        if config.export_weights == "ema":
            unet, ema_unet = ema_unet, unet
    text = comps.text_encoder
    if not config.frozen_text:
        text = CLIPTextModel(comps.text_encoder.config)
        text.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")})
    parts = Components(unet=unet, vae=comps.vae.to("cpu"), text_encoder=text, tokenizer=comps.tokenizer, scheduler=None)
    tmp = out / ".pipeline"
    save_components(parts, tmp, scheduler=comps.scheduler)
    if ema_unet is not None:
        other = "unet_raw" if config.export_weights == "ema" else "unet_ema"
        ema_unet.save_pretrained(tmp / other, safe_serialization=True)
    for item in sorted(tmp.iterdir()):  # each part lands whole (rename); the manifest, last, marks completion
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    shutil.rmtree(tmp, ignore_errors=True)
