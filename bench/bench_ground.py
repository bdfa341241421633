"""What does watching the cross-attention cost? Time per image of grounding against plain denoising, and
peak memory against steps.

    .venv/bin/python bench/bench_ground.py [--model DIR] [--steps 10] [--batch-size 4] [--repeats 3]

Side by side, same model, batch, DDIM steps and guidance 1, interleaved and repeated (median):
- `plain`: a DDIM denoising loop, UNet + scheduler step, no capture.
- `capture`: the same loop with the capture active at every step: the ratio capture/plain is the
  capture overhead (the issue's target: at most 1.15).
- `ground`: `cxrdiff.ground.capture_maps` in the paper's noise mode with the default window (4/5 of
  the steps): what `cxrdiff ground` spends per image (it skips the UNet before the window).
Peak memory: CUDA max_memory_allocated on a GPU; on a CPU the peak RSS of a fresh process per step count
(torch allocations are invisible to tracemalloc). Without --model a tiny random SD2-shaped model is built.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _setup(model: Path, batch: int):
    import torch

    from cxrdiff.models import load_components
    from cxrdiff.text_encoders import encode_text

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    comps = load_components(model, device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, *comps.latent_shape, generator=gen).to(device, comps.unet.dtype)  # (b, C, H, W)
    context = encode_text(comps, ["small left pleural effusion"] * batch, device)  # (b, tokens, dim)
    return comps, latents, context, device


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def plain(comps, latents, context, steps: int, capture: bool = False) -> None:
    """A DDIM denoising loop; with `capture`, every cross-attention layer is captured at every step."""
    import contextlib

    import torch
    from diffusers import DDIMScheduler

    from cxrdiff.attention import AttentionCapture

    scheduler = DDIMScheduler.from_config(comps.scheduler.config)
    scheduler.set_timesteps(steps, device=latents.device)
    x = latents
    watch = AttentionCapture(comps.unet, latents.shape[-2:]) if capture else contextlib.nullcontext()
    with torch.no_grad(), watch as cap:
        if cap is not None:
            cap.active = True
        for t in scheduler.timesteps:
            eps = comps.unet(x, t, encoder_hidden_states=context).sample  # (b, C, H, W)
            x = scheduler.step(eps, t, x).prev_sample
        if cap is not None:
            cap.maps()


def ground_noise(comps, latents, context, steps: int) -> None:
    from cxrdiff.ground import GroundConfig, capture_maps

    config = GroundConfig(steps=steps, window=max(1, round(steps * 0.8)))
    capture_maps(comps, latents, context, config, seeds=list(range(latents.shape[0])))


def timings(model: Path, steps: int, batch: int, repeats: int) -> dict[str, float]:
    comps, latents, context, device = _setup(model, batch)
    runs = {
        "plain": lambda: plain(comps, latents, context, steps),
        "capture": lambda: plain(comps, latents, context, steps, capture=True),
        "ground": lambda: ground_noise(comps, latents, context, steps),
    }
    for fn in runs.values():  # warm-up (kernels, allocator)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) / batch)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(model: Path, steps: int, batch: int) -> int:
    """Peak bytes of one grounding call: CUDA allocator peak, or this process's peak RSS on a CPU."""
    import torch

    comps, latents, context, device = _setup(model, batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        ground_noise(comps, latents, context, steps)
        return int(torch.cuda.max_memory_allocated())
    ground_noise(comps, latents, context, steps)
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-steps", default="5,20,50", help="Step counts for the memory table.")
    parser.add_argument("--probe", type=int, default=None, help=argparse.SUPPRESS)  # child: print peak memory
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from cxrdiff.model.tiny import write_tiny_model

            model = write_tiny_model(Path(tmp) / "tiny")
        if args.probe is not None:
            print(json.dumps({"peak": peak_memory(model, args.probe, args.batch_size)}))
            return
        t = timings(model, args.steps, args.batch_size, args.repeats)
        print(f"steps {args.steps}, batch {args.batch_size}, median of {args.repeats}; seconds per image:")
        for name, value in t.items():
            print(f"  {name:8s} {value:.4f}")
        print(f"capture overhead (capture / plain): {t['capture'] / t['plain']:.3f}  (target <= 1.15)")
        print(f"cxrdiff ground per image / plain denoising: {t['ground'] / t['plain']:.3f}")
        print("peak memory of one grounding call against steps (fresh process each):")
        for steps in (int(s) for s in args.memory_steps.split(",")):
            child = subprocess.run(
                [sys.executable, __file__, "--model", str(model), "--batch-size", str(args.batch_size),
                 "--probe", str(steps)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            peak = json.loads(child.stdout.strip().splitlines()[-1])["peak"]
            print(f"  steps {steps:4d}: {peak / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
