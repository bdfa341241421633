"""The prepared GPU benchmark (run by bench/gpu.sh): SD2-base's architecture, random weights, 512 px, bf16.

    .venv/bin/python bench/gpu_bench.py --out DIR [--budget-s 400] [--quick]

Measures, each through cxrdiff's own code, with peak GPU memory (max_memory_allocated) for each:
- VAE encoding (`prepare`) images/s;
- training images/s at batch 16 and 32, gradient checkpointing off/on, --compile off/on (bf16 mixed
  precision, fused AdamW, TF32), timed over a few steps after warm-up steps (which include compiling);
- full fine-tuning against LoRA (`finetune --lora-rank`, rank 4, 16, 64; UNet only and UNet + text encoder) at
  batch 16, checkpointing and compile off: images/s, peak memory and trainable parameters;
- sampling images/s (`sample`: PLMS 75 steps, guidance 4, batch 16), end to end (load + generate + write);
- grounding seconds per image (`ground`: 50 DDIM steps, the last 40 captured, batch 8), end to end.
Training configurations run in order of importance until --budget-s is spent; the rest are listed as
skipped. Writes DIR/gpu_bench.json and DIR/gpu_bench.md. `--quick` runs the same code on the tiny model
at 64 px with small batches (compile traced with aot_eager): a check that the script works, on a CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

# (batch, gradient checkpointing, compile, LoRA rank or None: full, text encoder trained), most wanted first
TRAIN_CONFIGS = [
    (16, False, False, None, False),
    (32, False, False, None, False),
    # full fine-tuning (the first row; with the text encoder here) against LoRA, UNet only and UNet + text encoder
    (16, False, False, None, True),
    (16, False, False, 4, False),
    (16, False, False, 4, True),
    (16, False, False, 16, False),
    (16, False, False, 16, True),
    (16, False, False, 64, False),
    (16, False, False, 64, True),
    (16, True, False, None, False),
    (32, True, False, None, False),
    (16, False, True, None, False),
    (32, False, True, None, False),
    (16, True, True, None, False),
    (32, True, True, None, False),
]


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _reset_peak() -> None:
    """Free what the last measurement left, zero the peak counter, and forget accelerate's state (each step
    makes its own Accelerator, with its own mixed precision, as in a fresh process)."""
    import torch
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_inputs(work: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    """The model, the phantom and its prepared latents; returns the model and the VAE-encoding row."""
    from cxrdiff.model.published import write_random_model
    from cxrdiff.model.tiny import write_tiny_model
    from cxrdiff.phantom import PhantomConfig, make_phantom
    from cxrdiff.prepare import PrepareConfig, prepare

    model = work / "model"
    write_tiny_model(model) if args.quick else write_random_model(model, "sd2-base")
    make_phantom(PhantomConfig(work / "mimic", patients=args.patients, size=args.resolution))
    _reset_peak()
    result = prepare(
        PrepareConfig(
            mimic=work / "mimic",
            ms_cxr=work / "mimic" / "MS_CXR_Local_Alignment_v1.0.0.csv",
            base_model=model,
            out=work / "prepared",
            test_size=args.prompts,
            test_no_finding_max=1.0,
            batch_size=args.sample_batch,
        )
    )
    images = result["train_rows"] + result["test_rows"] + result["ms_cxr_rows"]
    row = {
        "what": f"VAE encode (prepare, batch {args.sample_batch})",
        "value": round(images / result["encode_seconds"], 2),
        "unit": "images/s",
        "peak_gb": _peak_gb(),
        "note": f"{images} images",
    }
    return model, row


def train_row(
    work: Path, model: Path, batch: int, checkpointing: bool, compile: bool, rank: int | None, text: bool, args
) -> dict:
    """Images/s of `cxrdiff finetune`'s own step at this batch (one process, bf16, fused AdamW, TF32), full or
    LoRA (`rank`), text encoder frozen or trained."""
    import torch

    from cxrdiff import finetune as ft

    config = ft.FinetuneConfig(
        data=work / "prepared",
        base_model=model,
        out=work / f"train-{batch}-{checkpointing}-{compile}-{rank}-{text}",
        frozen_text=not text,
        steps=args.warmup + args.steps,
        batch_size=batch,
        per_device_batch_size=batch,
        mixed_precision="bf16",
        gradient_checkpointing=checkpointing,
        compile=compile,
        fused_adamw=True,
        tf32=True,
        lora_rank=rank,
    )
    torch._dynamo.reset()
    _reset_peak()
    inputs = ft.check_inputs(config)
    accelerator, _ = ft.start_accelerator(inputs.config)
    run = ft.load_run(inputs.config, inputs.model_dir, accelerator, batch, 1)
    with ft.StopFlag() as stop:
        start = time.perf_counter()
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                _sync()
                warm, start = time.perf_counter() - start, time.perf_counter()
            ft.accumulate(run, step, stop)
            ft.optimizer_step(run)
        _sync()
        seconds = time.perf_counter() - start
    trainable = accelerator.unwrap_model(run.model).parameter_counts["trainable"]
    row = {
        "what": f"train {args.resolution} px bf16, batch {batch}, checkpointing {'on' if checkpointing else 'off'}, "
        f"compile {'on' if compile else 'off'}, {_training_words(rank, text)}",
        "value": round(args.steps * batch / seconds, 2),
        "unit": "images/s",
        "peak_gb": _peak_gb(),
        "note": f"{args.steps} steps after {args.warmup} warm-up steps ({warm:.0f} s); {trainable:,} trainable",
    }
    del run
    return row


def _training_words(rank: int | None, text: bool) -> str:
    return ("full" if rank is None else f"LoRA r{rank}") + (" + text encoder" if text else ", text frozen")


def sample_row(work: Path, model: Path, args) -> dict:
    from cxrdiff.sample import SampleConfig, sample

    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(f"small left pleural effusion ({i})" for i in range(args.prompts)) + "\n")
    _reset_peak()
    start = time.perf_counter()
    sample(
        SampleConfig(
            model=model,
            out=work / "sample",
            prompts_file=prompts,
            steps=args.sample_steps,
            guidance=4.0,
            batch_size=args.sample_batch,
            tf32=True,
        )
    )
    seconds = time.perf_counter() - start
    return {
        "what": f"sample (PLMS {args.sample_steps}, guidance 4, batch {args.sample_batch})",
        "value": round(args.prompts / seconds, 2),
        "unit": "images/s",
        "peak_gb": _peak_gb(),
        "note": f"{args.prompts} images, end to end (load + generate + write)",
    }


def ground_row(work: Path, model: Path, args) -> dict:
    import pandas as pd

    from cxrdiff.ground import GroundConfig, ground

    available = len(pd.read_parquet(work / "prepared" / "ms_cxr.parquet"))
    images = min(args.ground_images, available)
    _reset_peak()
    start = time.perf_counter()
    ground(
        GroundConfig(
            model=model,
            out=work / "ground",
            data=work / "prepared" / "ms_cxr.parquet",
            limit=images,
            steps=args.ground_steps,
            window=args.ground_window,
            batch_size=args.ground_batch,
            tf32=True,
            overlays=False,
        )
    )
    seconds = time.perf_counter() - start
    return {
        "what": f"ground ({args.ground_steps} DDIM steps, last {args.ground_window}, batch {args.ground_batch})",
        "value": round(seconds / images, 3),
        "unit": "s/image",
        "peak_gb": _peak_gb(),
        "note": f"{images} images, end to end (load + capture + score)",
    }


def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"{meta['device']}, {meta['date']}, torch {meta['torch']}, model {meta['model']}",
        "",
        "| measurement | value | unit | peak GPU memory (GB) | note |",
        "|---|---:|---|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['what']} | {r['value'] if r['value'] is not None else '—'} | {r['unit']} | "
                     f"{r['peak_gb'] if r['peak_gb'] is not None else '—'} | {r['note']} |")  # fmt: skip
    (out / "gpu_bench.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: OUT/work, removed)")
    parser.add_argument("--budget-s", type=float, default=400, help="stop starting training configurations after")
    parser.add_argument("--quick", action="store_true", help="tiny model, 64 px, small batches (a CPU check)")
    args = parser.parse_args()
    full = not args.quick
    args.resolution, args.patients = (512, 60) if full else (64, 8)
    args.warmup, args.steps = (3, 5) if full else (1, 1)
    args.prompts, args.sample_batch, args.sample_steps = (32, 16, 75) if full else (4, 2, 3)
    args.ground_images, args.ground_batch = (16, 8) if full else (2, 2)
    args.ground_steps, args.ground_window = (50, 40) if full else (4, 3)
    plain = [(2, c, k, r, t) for _, c, k, r, t in TRAIN_CONFIGS if r is None and not t]  # full, text frozen
    train_configs = TRAIN_CONFIGS if full else [*plain[::2], (2, False, False, 16, True)]
    import shutil

    import torch

    from cxrdiff import speed

    if args.quick:
        speed.COMPILE_BACKEND = "aot_eager"  # Inductor's C++ build takes minutes per graph on a CPU
    began = time.perf_counter()
    device = _device()
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "model": "tiny (quick check)" if args.quick else "random SD2-base (cxrdiff model random --like sd2-base)",
    }
    work = args.work or args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows: list[dict] = []
    try:
        model, encode = make_inputs(work, args)
        rows += [encode, sample_row(work, model, args), ground_row(work, model, args)]
        write_results(args.out, meta, rows)  # something to show even if training is cut short
        for batch, checkpointing, compile, rank, text in train_configs:
            if time.perf_counter() - began > args.budget_s:
                what = f"train batch {batch}, checkpointing {checkpointing}, compile {compile}, "
                what += _training_words(rank, text)
                rows.append({"what": what, "value": None, "unit": "images/s", "peak_gb": None, "note": "skipped"})
                continue
            rows.append(train_row(work, model, batch, checkpointing, compile, rank, text, args))
            write_results(args.out, meta, rows)
    finally:
        meta["seconds"] = round(time.perf_counter() - began, 1)
        write_results(args.out, meta, rows)
        shutil.rmtree(work, ignore_errors=True)
    print((args.out / "gpu_bench.md").read_text())


if __name__ == "__main__":
    main()
