"""`cxrdiff sample`: classifier-free guided sampling at scale, every image reproducible on its own.

The denoising loop is diffusers' own `StableDiffusionPipeline`, called on batches of prompts with one
CPU `torch.Generator` per image, so each image equals what plain diffusers makes for that prompt alone:

    pipe(prompt, negative_prompt="", generator=torch.Generator().manual_seed(seed),
         num_inference_steps=steps, guidance_scale=guidance)

with the same scheduler and dtype. Each image's `seed` is `image_seed(seed, prompt_index, repeat)`: it
does not depend on the batch size, on `--limit`, or on how many processes share the work. The image with
`index = prompt_index * n_per_prompt + repeat` is `NNNNNN.png`; `samples.parquet` lists every image with its
prompt, seed and settings (and the test set's labels and ids when the prompts came from `test.parquet`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, ClassVar, get_args

import numpy as np

from cxrdiff.artifacts import MANIFEST, StepFolder, atomic_path, input_identity, read_manifest
from cxrdiff.choices import SamplePrecision, Scheduler
from cxrdiff.config import Range, check_ranges, settings, to_dict
from cxrdiff.console import log, progress
from cxrdiff.data import LABELS
from cxrdiff.distributed import process_state
from cxrdiff.errors import InputError, RunError
from cxrdiff.images import grey_from_pipeline
from cxrdiff.models import check_model_folder, check_sampling_steps
from cxrdiff.seeds import SEED_RULE, image_seed
from cxrdiff.shards import Shard, finish_share, label, parse_shard, share
from cxrdiff.speed import limit_cpu_threads, set_tf32, speed_up_unet
from cxrdiff.stopping import StopFlag, stop_signals

# diffusers scheduler class and the overrides of the folder's scheduler config that make the named sampler
# (the paper: PLMS). DDIM must not clip x0 in latent space: StableDiffusionPipeline.__init__ forces
# clip_sample=False on any scheduler it is built with, but not on one assigned later, so we say it here.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "dpm": ("DPMSolverMultistepScheduler", {}),
}
PRECISIONS = get_args(SamplePrecision)
STEP = "sample"
TABLE = "samples.parquet"
ID_COLUMNS = ("dicom_id", "subject_id", "study_id")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Paper defaults: PLMS 75 steps, guidance 4, the empty prompt as the unconditional one."""

    # What does not decide the pixels or the file names; the prompts count by their text, the model by
    # its identity, the precision by the dtype it resolves to (see `sample_settings`).
    NOT_SETTINGS: ClassVar[tuple[str, ...]] = (
        "out", "model", "prompts", "prompts_file", "prompt", "prompt_column", "batch_size", "limit",
        "mixed_precision", "device", "compile", "tf32", "channels_last", "shard", "finalize",
        "dist_timeout",
    )  # fmt: skip

    model: Path | None = None
    out: Path | None = None
    prompts: Path | None = None
    prompts_file: Path | None = None
    prompt: str | None = None
    prompt_column: str = "impression"
    n_per_prompt: Annotated[int, Range(ge=1)] = 1
    steps: Annotated[int, Range(ge=1)] = 75
    guidance: Annotated[float, Range(ge=1.0)] = 4.0
    scheduler: Scheduler = "pndm"
    seed: Annotated[int, Range(ge=0)] = 0
    batch_size: Annotated[int, Range(ge=1)] = 8
    limit: Annotated[int | None, Range(ge=1)] = None
    mixed_precision: SamplePrecision = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    device: str | None = None  # default: accelerate's device for this process
    compile: bool = False  # speed levers (cxrdiff.speed): torch.compile the UNet,
    tf32: bool = False  # TF32 matmuls (NVIDIA GPUs),
    channels_last: bool = False  # NHWC UNet
    shard: str | None = None  # I/N or slurm (cxrdiff.shards): this job's share of the images
    finalize: bool = False  # only write the table and manifest once every shard's images exist
    dist_timeout: Annotated[int, Range(ge=1)] = 1800  # seconds a rank waits for the others in a collective


def image_file(index: int) -> str:
    return f"{index:06d}.png"


def make_scheduler(model: str | os.PathLike, name: str) -> Any:
    """The named sampler built from the model folder's own scheduler config (betas, offsets, prediction)."""
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    return cls.from_config(cls.load_config(Path(model) / "scheduler"), **overrides)


# --- inputs -----------------------------------------------------------------------------------


@dataclasses.dataclass
class SamplePrompts:
    """The prompt list and, per prompt, the test set's extra columns (ids, labels) if known."""

    texts: list[str]
    extra: dict[str, list[Any]]
    source: str


def read_prompts(config: SampleConfig) -> SamplePrompts:
    """Exactly one of --prompts / --prompts-file / --prompt, read and checked (not yet limited)."""
    given = [n for n in ("prompts", "prompts_file", "prompt") if getattr(config, n) is not None]
    if len(given) != 1:
        flags = " / ".join(f"--{n.replace('_', '-')}" for n in ("prompts", "prompts_file", "prompt"))
        what = "none" if not given else ", ".join(f"--{n.replace('_', '-')}" for n in given)
        raise InputError(f"give exactly one prompt source ({flags}); got {what}")
    if config.prompt is not None:
        return SamplePrompts([config.prompt], {}, "--prompt")
    if config.prompts_file is not None:
        path = Path(config.prompts_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise InputError(f"--prompts-file {path}: file not found") from None
        except (UnicodeDecodeError, IsADirectoryError) as exc:
            raise InputError(f"--prompts-file {path}: not a UTF-8 text file ({exc})") from None
        texts = [line.strip() for line in lines if line.strip()]  # blank lines are not prompts
        if not texts:
            raise InputError(f"--prompts-file {path}: no prompts (one per line expected)")
        return SamplePrompts(texts, {}, os.fspath(path))
    return _read_prompt_table(Path(config.prompts), config.prompt_column)


def _read_prompt_table(path: Path, column: str) -> SamplePrompts:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise InputError(f"--prompts {path}: file not found (expected test.parquet from `cxrdiff prepare`)")
    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for non-Parquet files
        raise InputError(f"--prompts {path}: not a Parquet file ({type(exc).__name__})") from None
    if column not in names:
        raise InputError(f"--prompts {path}: no '{column}' column (has: {', '.join(names)})")
    keep = [column] + [c for c in (*ID_COLUMNS, *LABELS) if c in names]
    try:
        table = pq.read_table(path, columns=keep)
    except Exception as exc:  # pyarrow raises several types (ArrowInvalid, OSError) for damaged pages
        raise InputError(
            f"--prompts {path}: not a readable Parquet file ({str(exc).strip().splitlines()[0]})"
        ) from None
    texts = table.column(column).to_pylist()
    missing = sum(t is None for t in texts)
    if missing:
        raise InputError(f"--prompts {path}: {missing} row(s) with an empty '{column}'")
    if not texts:
        raise InputError(f"--prompts {path}: no rows")
    extra = {c: table.column(c).to_pylist() for c in keep[1:]}
    return SamplePrompts([str(t) for t in texts], extra, os.fspath(path))


def check_inputs(config: SampleConfig) -> SamplePrompts:
    """Every fault of the options, the model folder and the prompts, before any weight is read."""
    if config.model is None:
        raise InputError("--model is required (a finetune output or a diffusers base-model folder)")
    if config.out is None:
        raise InputError("--out is required (the folder for the images)")
    check_ranges(config)
    if config.scheduler not in SCHEDULERS:
        raise InputError(f"--scheduler {config.scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
    if config.mixed_precision not in PRECISIONS:
        raise InputError(f"mixed_precision {config.mixed_precision!r}: expected one of {', '.join(PRECISIONS)}")
    model = Path(config.model)
    if (model / MANIFEST).is_file():
        read_manifest(model, ("finetune", "checkpoint"))  # a prepare/sample folder given as --model is refused
    check_model_folder(model)
    check_sampling_steps(model, config.steps)
    return read_prompts(config)


def sample_settings(config: SampleConfig, prompts: SamplePrompts, dtype: str) -> dict[str, Any]:
    """What decides the pixels and the file names (not the batch size, the limit or the device)."""
    prompts_sha256 = hashlib.sha256(json.dumps(prompts.texts).encode()).hexdigest()
    return settings(config, model=input_identity(config.model), prompts_sha256=prompts_sha256, dtype=dtype)


def _resolve_dtype(precision: str, device: Any) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "no"
    return precision


# --- the run ----------------------------------------------------------------------------------


def sample(config: SampleConfig, shard: tuple[int, int] | None = None) -> dict[str, Any] | None:
    """Generate this process's share of the images, skip those already written, and (once all exist)
    write `samples.parquet` and the manifest.

    The share comes from accelerate (process p of P takes images p, p + P, ...) composed with `--shard`
    (`shard=(i, n)` here, or `config.shard`): shard i of n takes share i·P + p of n·P (`cxrdiff.shards`).
    Shards share `--out`; whichever completes the last images writes the table and manifest, or
    `config.finalize` does once all exist. Only the main process returns the result (the others None).
    SIGTERM / SIGUSR1 stop it after the current batch (`Stopped`, exit 75); the same command resumes.
    """
    prompts = check_inputs(config)
    part = Shard(*shard) if shard is not None else parse_shard(config.shard)
    if part is not None and not 0 <= part.index < part.count:
        raise InputError(f"shard {tuple(part)!r}: expected (index, count) with 0 <= index < count")
    import torch

    state = process_state(config.dist_timeout)
    distributed, main = state.num_processes > 1, state.is_main_process
    mine_of = share(part, state.process_index, state.num_processes)
    who = label(part, state.process_index, state.num_processes)
    device = torch.device(config.device) if config.device else state.device
    limit_cpu_threads(device)
    dtype_name = _resolve_dtype(config.mixed_precision, device)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]

    out = Path(config.out)
    wanted = sample_settings(config, prompts, dtype_name)
    if main and not config.finalize:
        folder = StepFolder.claim(out, STEP, wanted, part=tuple(part) if part is not None else None)
    if distributed or config.finalize:  # the other processes check what the main one claimed
        state.wait_for_everyone()
        folder = StepFolder.claim(out, STEP, wanted, create=False) if not main or config.finalize else folder
    n_prompts = len(prompts.texts) if config.limit is None else min(config.limit, len(prompts.texts))
    total = n_prompts * config.n_per_prompt
    mine = range(mine_of.index, total, mine_of.count)
    if folder.finished and folder.manifest.get("images") == total:
        log.info("%s: already complete; nothing to do", out)
        return None if not main else _result(folder.manifest, out, mine_of.count)
    if config.finalize and folder.state == "new":
        raise InputError(f"--out {out}: no sample run with these settings to finalize")
    todo = [] if config.finalize else [i for i in mine if not (out / image_file(i)).is_file()]
    log.info("sample%s: %d images in %s, %d of this share's %d to make", f" [{who}]" if who else "", total, out,
             len(todo), len(mine))  # fmt: skip

    start = time.perf_counter()
    if todo:
        with stop_signals("sample") as stop:
            _generate(config, prompts, todo, out, device, dtype, stop, who)
    seconds = time.perf_counter() - start
    if distributed:
        state.wait_for_everyone()
    result: dict[str, Any] = {
        "out": os.fspath(out),
        "images": total,
        "processes": mine_of.count,
        "generated": len(todo),  # by this process
        "skipped": len(mine) - len(todo),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else None,
    }
    if not main:
        return None  # the main process reports (and the CLI prints one result, not one per process)
    missing = sum(not (out / image_file(i)).is_file() for i in range(total))
    result["missing"] = missing
    result["complete"] = not missing
    write = lambda: _finish(folder, config, prompts, n_prompts, dtype_name, total)  # noqa: E731
    later = "the table is written when all exist"
    finish_share(folder, config.finalize, missing, of=total, noun="images", later=later, write=write)
    return {**result, "table": os.fspath(out / TABLE)} if not missing else result


def _finish(
    folder: StepFolder, config: SampleConfig, prompts: SamplePrompts, n_prompts: int, dtype_name: str, total: int
) -> None:
    """The table and the manifest, once every image exists (by one process: see `StepFolder.finalizing`)."""
    out = folder.out
    over = _prompts_over_context(config.model, prompts.texts[:n_prompts])
    _write_table(config, prompts, n_prompts, out, dtype_name, over)
    _cleanup_temporaries(out)
    folder.finish(
        config=to_dict(config),
        inputs={"model": config.model, **({"prompts": Path(config.prompts).parent} if config.prompts else {})},
        seed=config.seed,
        files=[image_file(i) for i in range(total)] + [TABLE],
        extra={
            "images": total,
            "prompts": n_prompts,
            "prompts_over_context": sum(over),
            "dtype": dtype_name,
            "scheduler_class": SCHEDULERS[config.scheduler][0],
            "scheduler_overrides": SCHEDULERS[config.scheduler][1],
            "seed_rule": SEED_RULE,
        },
    )


def _result(manifest: dict[str, Any], out: Path, processes: int) -> dict[str, Any]:
    """The result of a finished run, from its manifest (nothing made, nothing missing)."""
    images = manifest["images"]
    return {
        "out": os.fspath(out),
        "images": images,
        "processes": processes,
        "generated": 0,
        "skipped": images,
        "seconds": 0.0,
        "images_per_s": None,
        "missing": 0,
        "complete": True,
        "table": os.fspath(out / TABLE),
    }


def _generate(
    config: SampleConfig,
    prompts: SamplePrompts,
    todo: list[int],
    out: Path,
    device: Any,
    dtype: Any,
    stop: StopFlag,
    who: str = "",
) -> None:
    """Run the pipeline on batches of (prompt, generator) and write each image as it is done."""
    import torch

    from cxrdiff.models import load_components, pipeline
    from cxrdiff.text_encoders import encode

    comps = load_components(config.model)
    pipe = pipeline(comps, scheduler=make_scheduler(config.model, config.scheduler)).to(device)
    if dtype != torch.float32:  # cast only when asked: diffusers warns on any `to(dtype=...)`
        pipe.to(dtype=dtype)
    if comps.text_projection is not None:  # not a pipeline part: moved with it by hand
        comps.text_projection.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    set_tf32(config.tf32)
    speed_up_unet(pipe.unet, compile=config.compile, channels_last=config.channels_last)
    batches = [todo[i : i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    done = 0
    for batch in progress(batches, description=f"sample [{who}]: batches" if who else "sample: batches"):
        stop.check(f"{done} of this share's {len(todo)} images")
        texts = [prompts.texts[i // config.n_per_prompt] for i in batch]
        generators = [
            torch.Generator().manual_seed(image_seed(config.seed, i // config.n_per_prompt, i % config.n_per_prompt))
            for i in batch
        ]
        if comps.native:  # SD's own CLIP pair: the pipeline encodes the prompts, as diffusers users do
            text: dict[str, Any] = {"prompt": texts, "negative_prompt": [""] * len(batch)}
        else:  # another text encoder (finetune --text-encoder): encoded here, given as embeddings
            text = {
                "prompt_embeds": encode(comps.text, texts, device, dtype),
                "negative_prompt_embeds": encode(comps.text, [""] * len(batch), device, dtype),
            }
        images = pipe(
            **text,
            generator=generators,
            num_inference_steps=config.steps,
            guidance_scale=config.guidance,
            output_type="pt",
        ).images  # (batch, 3, height, width) in [0, 1]
        if not torch.isfinite(images).all():
            raise RunError(f"non-finite pixels in images {batch[0]}..{batch[-1]} (try --mixed-precision no)")
        for index, grey in zip(batch, grey_from_pipeline(images), strict=True):
            write_png(out / image_file(index), grey)
        done += len(batch)


def write_png(path: Path, grey: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(grey, mode="L").save(tmp, format="PNG")


def _prompts_over_context(model: Path, texts: list[str]) -> list[bool]:
    """Per prompt: longer than the text encoder's context (start and end tokens included), so the pipeline's
    tokenizer keeps only its first tokens. Logged and stored (`truncated`), never silent."""
    from cxrdiff.text_encoders import load_tokenizer

    tokenizer = load_tokenizer(Path(model) / "tokenizer")
    limit = int(tokenizer.model_max_length)
    over = [len(ids) > limit for ids in tokenizer(texts, truncation=False)["input_ids"]] if texts else []
    if any(over):
        log.warning("%d of %d prompts are longer than the text encoder's %d tokens: the tokenizer keeps their "
                    "first %d (column `truncated`)", sum(over), len(texts), limit, limit)  # fmt: skip
    return over


def _write_table(
    config: SampleConfig, prompts: SamplePrompts, n_prompts: int, out: Path, dtype_name: str, over: list[bool]
) -> Path:
    """One row per image, recomputed from the prompt list (not from what each process did)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = config.n_per_prompt
    total = n_prompts * n
    prompt_index = [i // n for i in range(total)]
    repeat = [i % n for i in range(total)]
    columns: dict[str, Any] = {
        "index": pa.array(range(total), pa.int64()),
        "file": pa.array([image_file(i) for i in range(total)], pa.string()),
        "prompt": pa.array([prompts.texts[p] for p in prompt_index], pa.string()),
        "prompt_index": pa.array(prompt_index, pa.int64()),
        "truncated": pa.array([over[p] for p in prompt_index], pa.bool_()),
        "repeat": pa.array(repeat, pa.int32()),
        "seed": pa.array(
            [image_seed(config.seed, p, r) for p, r in zip(prompt_index, repeat, strict=True)], pa.int64()
        ),
        "scheduler": pa.array([config.scheduler] * total, pa.string()),
        "steps": pa.array([config.steps] * total, pa.int32()),
        "guidance": pa.array([config.guidance] * total, pa.float64()),
        "dtype": pa.array([dtype_name] * total, pa.string()),
        "model": pa.array([os.fspath(Path(config.model).resolve())] * total, pa.string()),
    }
    for name, values in prompts.extra.items():
        kind = pa.float32() if name in LABELS else None
        columns[name] = pa.array([values[p] for p in prompt_index], kind)
    path = out / TABLE
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)
    return path


def _cleanup_temporaries(out: Path) -> None:
    """Half-written PNGs of a killed run (hidden temporaries); only called once every image exists."""
    for tmp in out.glob(".*.png.tmp-*"):
        tmp.unlink(missing_ok=True)
