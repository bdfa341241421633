"""SD2-base's exact architecture (random weights) through every step on a CPU: seconds and peak RAM per step.

    OMP_NUM_THREADS=2 .venv/bin/python bench/full_size.py [--model DIR] [--resolution 512] [--json FILE]
        [--text-encoder-like bert-base] [--stages "model random,phantom,prepare,finetune step,ground"]

Steps, each in a fresh process (its peak RSS is the step's peak memory, read with wait4):
- `model random`: `cxrdiff model random --like sd2-base` (skipped with --model); with `--text-encoder-like
  bert-base`, conditioned on a random BERT-base (109 M parameters, context 512) through a learned 768 → 1024
  map, as `finetune --text-encoder` conditions on CXR-BERT or RadBERT;
- `phantom`: a few phantom patients at the resolution (not a model step; listed for completeness);
- `prepare`: VAE-encode the phantom's images (`cxrdiff.prepare`);
- `finetune step`: one optimizer step of `cxrdiff.finetune`'s own loop (frozen text, gradient checkpointing,
  batch 1, fused AdamW so that no full-size temporaries are made), without the checkpoint and export a whole
  run adds;
- `ground`: `cxrdiff.ground` on one MS-CXR-style phrase, a few DDIM steps, capture on all 16 layers;
- `sample`: `cxrdiff.sample`, one image, a few PLMS steps, guidance 4.
`--stages` runs only the named ones (the model stage's folder is needed by the others unless --model).

    OMP_NUM_THREADS=2 .venv/bin/python bench/full_size.py --training [--variants "LoRA r16" ...] [--model DIR]

`--training`: full fine-tuning against LoRA instead: one optimizer step of finetune's loop per variant (`TRAINING`:
full and LoRA rank 4, 16, 64, each UNet only and UNet + text encoder), batch 1, gradient checkpointing, fused
AdamW, fp32, each in a fresh process on synthetic latents at the resolution (no prepare: the latents' values do not
change the memory); trainable and total parameters from the run itself. `--counts` prints every variant's
parameters from the architecture on the meta device, in seconds, without training.
Results: a table on stdout, and with --json the same as JSON. docs/performance.md keeps the numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def stage_model(work: Path, args: argparse.Namespace) -> dict:
    from cxrdiff.model.published import write_random_model

    return write_random_model(work / "sd2-base", "sd2-base", seed=0, text_encoder_like=args.text_encoder_like)


def stage_phantom(work: Path, args: argparse.Namespace) -> dict:
    from cxrdiff.phantom import PhantomConfig, make_phantom

    make_phantom(PhantomConfig(work / "mimic", patients=args.patients, size=args.resolution, workers=0))
    return {"images": len(list((work / "mimic").rglob("*.jpg")))}


def stage_prepare(work: Path, args: argparse.Namespace) -> dict:
    from cxrdiff.prepare import PrepareConfig, prepare

    mimic = work / "mimic"
    config = PrepareConfig(
        mimic=mimic,
        ms_cxr=mimic / "MS_CXR_Local_Alignment_v1.0.0.csv",
        base_model=args.model,
        out=work / "prepared",
        resolution=args.resolution,
        test_size=2,
        test_no_finding_max=1.0,
        batch_size=2,
        workers=0,
    )
    return prepare(config)


def stage_finetune_step(work: Path, args: argparse.Namespace) -> dict:
    from cxrdiff import finetune as ft

    config = ft.FinetuneConfig(
        data=work / "prepared",
        base_model=args.model,
        out=work / "finetune",
        frozen_text=True,
        steps=1,
        batch_size=1,
        gradient_checkpointing=True,
        fused_adamw=True,
    )
    inputs = ft.check_inputs(config)
    accelerator, _ = ft.start_accelerator(inputs.config)
    per_device, accum = ft.plan_batch(accelerator, inputs.config)
    run = ft.load_run(inputs.config, inputs.model_dir, accelerator, per_device, accum)
    start = time.perf_counter()
    with ft.StopFlag() as stop:
        stats = ft.accumulate(run, 0, stop)
        ft.optimizer_step(run)
    return {"loss": round(stats.loss, 4), "step_seconds": round(time.perf_counter() - start, 1)}


def stage_ground(work: Path, args: argparse.Namespace) -> dict:
    from cxrdiff.ground import GroundConfig, ground

    config = GroundConfig(
        model=args.model,
        out=work / "ground",
        data=work / "prepared" / "ms_cxr.parquet",
        limit=1,
        steps=args.ground_steps,
        window=args.ground_steps,
        batch_size=1,
        overlays=False,
    )
    return ground(config)


def stage_sample(work: Path, args: argparse.Namespace) -> dict:
    from cxrdiff.sample import SampleConfig, sample

    config = SampleConfig(
        model=args.model,
        out=work / "sample",
        prompt="small left pleural effusion",
        steps=args.sample_steps,
        guidance=4.0,
        batch_size=1,
        mixed_precision="no",
    )
    return sample(config)


TRAINING = {  # the --training comparison: name → (LoRA rank, None: every weight; text encoder trained)
    "full": (None, False),
    "full + text": (None, True),
    "LoRA r4": (4, False),
    "LoRA r4 + text": (4, True),
    "LoRA r16": (16, False),
    "LoRA r16 + text": (16, True),
    "LoRA r64": (64, False),
    "LoRA r64 + text": (64, True),
}


def stage_latents(work: Path, args: argparse.Namespace) -> dict:
    """A prepared folder of random latents at the resolution, for the training comparison (the fixture the
    finetune tests use; a training step's memory does not depend on the latents' values)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fixtures_prepared import build_prepared

    from cxrdiff.models import vae_fingerprint

    size = args.resolution // 8
    build_prepared(
        work / "latents", n=4, latent_shape=(4, size, size), resolution=args.resolution,
        vae_fingerprint=vae_fingerprint(args.model),
    )  # fmt: skip
    return {"rows": 4}


def stage_training(work: Path, args: argparse.Namespace, rank: int | None, text: bool) -> dict:
    """One optimizer step of finetune's loop, full or LoRA, frozen or trained text encoder (as `finetune step`)."""
    from cxrdiff import finetune as ft

    config = ft.FinetuneConfig(
        data=work / "latents",
        base_model=args.model,
        out=work / f"train-{rank}-{text}",
        frozen_text=not text,
        steps=1,
        batch_size=1,
        gradient_checkpointing=True,
        fused_adamw=True,
        lora_rank=rank,
    )
    inputs = ft.check_inputs(config)
    accelerator, _ = ft.start_accelerator(inputs.config)
    run = ft.load_run(inputs.config, inputs.model_dir, accelerator, 1, 1)
    start = time.perf_counter()
    with ft.StopFlag() as stop:
        stats = ft.accumulate(run, 0, stop)
        ft.optimizer_step(run)
    counts = accelerator.unwrap_model(run.model).parameter_counts
    return {
        "loss": round(stats.loss, 4),
        "step_seconds": round(time.perf_counter() - start, 1),
        "trainable": counts["trainable"],
        "total": counts["total"],
    }


def training_counts(like: str = "sd2-base") -> list[dict]:
    """Every `TRAINING` variant's trainable and total parameters, from the architecture on the meta device."""
    from cxrdiff.finetune import FinetuneConfig
    from cxrdiff.finetune.lora import TrainingMode, parameter_counts, set_trainable
    from cxrdiff.model.published import published_modules

    rows = []
    for name, (rank, text) in TRAINING.items():
        modules = published_modules(like)
        unet, encoder = modules["unet"], modules["text_encoder"]
        mode = TrainingMode.of_config(FinetuneConfig(frozen_text=not text, lora_rank=rank))
        set_trainable(mode, unet, encoder, train_text=text, seed=0)
        counts = parameter_counts(unet, encoder)
        rows.append({"variant": name, "trainable": counts["trainable"], "total": counts["total"]})
    return rows


STAGES = {
    "model random": stage_model,
    "phantom": stage_phantom,
    "prepare": stage_prepare,
    "finetune step": stage_finetune_step,
    "ground": stage_ground,
    "sample": stage_sample,
    "latents": stage_latents,
    **{f"train {name}": functools.partial(stage_training, rank=r, text=t) for name, (r, t) in TRAINING.items()},
}
MODEL_STEPS = ("model random", "phantom", "prepare", "finetune step", "ground", "sample")


def run_stage(name: str, work: Path, argv: list[str]) -> dict:
    """Run one stage in a fresh process; its wall time, peak RSS (wait4's ru_maxrss) and result."""
    command = [sys.executable, __file__, "--stage", name, "--work", str(work), *argv]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    output = child.stdout.read() if child.stdout else ""
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"stage {name!r} failed with exit code {child.returncode}")
    result = json.loads(output.strip().splitlines()[-1])
    return {**result, "step": name, "seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="an SD2-base-shaped folder (default: made here)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--ground-steps", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=3)
    parser.add_argument("--text-encoder-like", choices=["bert-base"], default=None, help="a BERT-base encoder")
    parser.add_argument("--stages", default=",".join(MODEL_STEPS), help="comma-separated stages to run, in order")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--training", action="store_true", help="full fine-tuning against LoRA (see above)")
    parser.add_argument("--variants", nargs="+", choices=list(TRAINING), default=list(TRAINING))
    parser.add_argument("--counts", action="store_true", help="every variant's parameters, no training")
    parser.add_argument("--stage", choices=list(STAGES), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:  # a child: run the stage, print its result as the last line
        args.model = args.model or args.work / "sd2-base"
        print(json.dumps(STAGES[args.stage](args.work, args), default=str))
        return

    if args.counts:
        counts = training_counts()
        print(f"{'variant':<16} {'trainable':>13} {'total':>13}")
        for row in counts:
            print(f"{row['variant']:<16} {row['trainable']:>13,} {row['total']:>13,}")
        if args.json:
            args.json.write_text(json.dumps({"like": "sd2-base", "counts": counts}, indent=2))
        return

    passed = [f"--{k}={getattr(args, k)}" for k in ("resolution", "patients", "ground_steps", "sample_steps")]
    passed = [p.replace("_", "-", 1) for p in passed] + ([f"--model={args.model}"] if args.model else [])
    passed += [f"--text-encoder-like={args.text_encoder_like}"] if args.text_encoder_like else []
    if args.training:
        steps = ["model random", "latents", *(f"train {v}" for v in args.variants)]
    else:
        chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in MODEL_STEPS]
        if unknown:
            raise SystemExit(f"--stages: unknown {', '.join(unknown)} (known: {', '.join(MODEL_STEPS)})")
        steps = [name for name in MODEL_STEPS if name in chosen]
    with tempfile.TemporaryDirectory(prefix="cxrdiff-full-size-") as tmp:
        rows = [
            run_stage(name, Path(tmp), passed)
            for name in steps
            if not (name == "model random" and args.model is not None)
        ]
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    encoder = f", text encoder like {args.text_encoder_like}" if args.text_encoder_like else ""
    print(f"resolution {args.resolution}, OMP_NUM_THREADS={threads}, {os.cpu_count()} CPUs{encoder}")
    print(f"{'step':<22} {'seconds':>8} {'peak RSS GB':>12} {'trainable':>13}")
    for row in rows:
        trainable = f"{row['trainable']:,}" if "trainable" in row else ""
        print(f"{row['step']:<22} {row['seconds']:>8} {row['peak_rss_gb']:>12} {trainable:>13}")
    if args.json:
        summary = {"resolution": args.resolution, "threads": threads, "text_encoder_like": args.text_encoder_like}
        args.json.write_text(json.dumps({**summary, "steps": rows}, indent=2))


if __name__ == "__main__":
    main()
