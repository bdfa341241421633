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
Results: a table on stdout, and with --json the same as JSON. docs/performance.md keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def stage_model(work: Path, args: argparse.Namespace) -> dict:
    from cxrdiff.models import write_random_model

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


STAGES = {
    "model random": stage_model,
    "phantom": stage_phantom,
    "prepare": stage_prepare,
    "finetune step": stage_finetune_step,
    "ground": stage_ground,
    "sample": stage_sample,
}


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
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run, in order")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--stage", choices=list(STAGES), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:  # a child: run the stage, print its result as the last line
        args.model = args.model or args.work / "sd2-base"
        print(json.dumps(STAGES[args.stage](args.work, args), default=str))
        return

    passed = [f"--{k}={getattr(args, k)}" for k in ("resolution", "patients", "ground_steps", "sample_steps")]
    passed = [p.replace("_", "-", 1) for p in passed] + ([f"--model={args.model}"] if args.model else [])
    passed += [f"--text-encoder-like={args.text_encoder_like}"] if args.text_encoder_like else []
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise SystemExit(f"--stages: unknown {', '.join(unknown)} (known: {', '.join(STAGES)})")
    with tempfile.TemporaryDirectory(prefix="cxrdiff-full-size-") as tmp:
        rows = [
            run_stage(name, Path(tmp), passed)
            for name in STAGES
            if name in chosen and not (name == "model random" and args.model is not None)
        ]
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    encoder = f", text encoder like {args.text_encoder_like}" if args.text_encoder_like else ""
    print(f"resolution {args.resolution}, OMP_NUM_THREADS={threads}, {os.cpu_count()} CPUs{encoder}")
    print(f"{'step':<15} {'seconds':>8} {'peak RSS GB':>12}")
    for row in rows:
        print(f"{row['step']:<15} {row['seconds']:>8} {row['peak_rss_gb']:>12}")
    if args.json:
        summary = {"resolution": args.resolution, "threads": threads, "text_encoder_like": args.text_encoder_like}
        args.json.write_text(json.dumps({**summary, "steps": rows}, indent=2))


if __name__ == "__main__":
    main()
