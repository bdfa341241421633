"""Is `cxrdiff sample` as fast as diffusers used well? Images/s against diffusers' pipeline called with a
batch of prompts and a list of generators (what a competent user writes), and, for reference, one prompt
per call.

    .venv/bin/python bench/bench_sample.py [--model DIR] [--prompts 16] [--steps 10] [--batch-size 8] [--repeats 3]

Every side runs the same model, scheduler (PLMS), steps, guidance 4, batch size and per-image seeds, loads
the model and writes 8-bit grey PNGs, and is timed end to end (load + generate + write). The headline is
the ratio cxrdiff / batched diffusers (target ≥ 1.0: the step's bookkeeping costs nothing measurable).
Without --model a tiny random SD2-shaped model is built (64 px); `cxrdiff model random --like sd2-base`
gives the full architecture.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from cxrdiff.images import grey_from_pipeline
from cxrdiff.model.tiny import write_tiny_model
from cxrdiff.sample import SampleConfig, image_file, image_seed, make_scheduler, sample, write_png

PROMPTS = [
    "small left pleural effusion",
    "cardiomegaly without edema",
    "no acute cardiopulmonary process",
    "right lower lobe consolidation concerning for pneumonia",
    "mild pulmonary edema",
    "small right apical pneumothorax",
    "bibasilar atelectasis",
    "stable support devices",
]


def diffusers_one_by_one(model: Path, prompts: list[str], out: Path, steps: int, guidance: float, device) -> None:
    """The baseline: plain diffusers, one prompt per call, one PNG per image."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, safety_checker=None)
    pipe.scheduler = make_scheduler(model, "pndm")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for index, prompt in enumerate(prompts):
        images = pipe(
            prompt,
            negative_prompt="",
            generator=torch.Generator().manual_seed(image_seed(0, index, 0)),
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="pt",
        ).images  # (1, 3, height, width)
        write_png(out / image_file(index), grey_from_pipeline(images)[0])


def diffusers_batched(
    model: Path, prompts: list[str], out: Path, steps: int, guidance: float, device, batch_size: int
) -> None:
    """The fair baseline: plain diffusers on batches of prompts, one generator per image."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, safety_checker=None)
    pipe.scheduler = make_scheduler(model, "pndm")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for first in range(0, len(prompts), batch_size):
        batch = list(range(first, min(first + batch_size, len(prompts))))
        images = pipe(
            [prompts[i] for i in batch],
            negative_prompt=[""] * len(batch),
            generator=[torch.Generator().manual_seed(image_seed(0, i, 0)) for i in batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="pt",
        ).images  # (batch, 3, height, width)
        for index, grey in zip(batch, grey_from_pipeline(images), strict=True):
            write_png(out / image_file(index), grey)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each batched side (median)")
    args = parser.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or write_tiny_model(tmp / "tiny")
        prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(args.prompts)]
        (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
        # fp32 on both sides so that the comparison is about batching, not precision
        config = SampleConfig(
            model=model,
            out=tmp / "ours-0",
            prompts_file=tmp / "prompts.txt",
            steps=args.steps,
            guidance=args.guidance,
            batch_size=args.batch_size,
            mixed_precision="no",
        )
        diffusers_one_by_one(model, prompts[:1], tmp / "warm", 1, args.guidance, device)  # imports, CUDA init

        ours_s, batched_s = [], []
        for repeat in range(args.repeats):  # interleaved, median: a shared machine's load hits both sides
            start = time.perf_counter()
            sample(dataclasses.replace(config, out=tmp / f"ours-{repeat}"))
            ours_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            diffusers_batched(
                model, prompts, tmp / f"batched-{repeat}", args.steps, args.guidance, device, args.batch_size
            )
            batched_s.append(time.perf_counter() - start)
        ours, batched = args.prompts / statistics.median(ours_s), args.prompts / statistics.median(batched_s)
        start = time.perf_counter()
        diffusers_one_by_one(model, prompts, tmp / "theirs", args.steps, args.guidance, device)
        theirs = args.prompts / (time.perf_counter() - start)
        for index in range(args.prompts):  # the same images: the comparison is of speed only
            a, b = (tmp / side / image_file(index) for side in ("ours-0", "batched-0"))
            assert a.read_bytes() == b.read_bytes(), f"image {index} differs between cxrdiff and batched diffusers"

    print(
        f"device {device}, model {args.model or 'tiny'}, {args.prompts} prompts, "
        f"{args.steps} steps, batch {args.batch_size}, median of {args.repeats} interleaved runs"
    )
    print(f"cxrdiff sample (batched):        {ours:8.3f} images/s")
    print(f"diffusers, batched + generators: {batched:8.3f} images/s")
    print(f"diffusers, one prompt per call:  {theirs:8.3f} images/s")
    print(f"ratio cxrdiff / batched:         {ours / batched:8.2f}  (the fair comparison)")
    print(f"ratio cxrdiff / one per call:    {ours / theirs:8.2f}")


if __name__ == "__main__":
    main()
