"""How much does `cxrdiff finetune`'s loop cost over a bare PyTorch loop? Training images/s side by side.

    .venv/bin/python bench/bench_finetune.py [--model DIR] [--data PREPARED] [--steps 30] [--batch-size 8]
                                             [--repeats 3] [--learnable-text] [--mixed-precision bf16]

Both sides train the same model (UNet, text encoder frozen or learnable) with AdamW at the same batch,
precision and device. The bare loop gets its latents and token ids as tensors already on the device and
does nothing else; cxrdiff's loop reads Parquet shards, samples latents from the stored posterior,
tokenises prompts, applies the UCG rule, clips gradients, logs and all-reduces its statistics. Both skip
`--warmup` steps. Without --model a tiny random SD2-shaped model is built; without --data a synthetic
prepared folder (tests/fixtures_prepared.py). On a GPU give a real SD2 folder for the paper's setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxrdiff.finetune import FinetuneConfig, finetune
from cxrdiff.model.tiny import write_tiny_model
from cxrdiff.models import load_components


def bare_loop(model: Path, data: Path, steps: int, warmup: int, batch: int, learnable: bool, precision: str) -> float:
    """Images/s of the plainest loop over the same model and in-memory tensors."""
    import pyarrow.parquet as pq
    from diffusers import DDPMScheduler

    from cxrdiff.data import latent_from_bytes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    comps = load_components(model, device=device)
    rows = pq.read_table(sorted(data.glob("train-*.parquet"))[0]).to_pylist()[:batch]
    rows = (rows * (batch // len(rows) + 1))[:batch]
    latents = torch.from_numpy(np.stack([latent_from_bytes(r["latent_mean"], r["latent_shape"]) for r in rows]))
    latents = latents.to(device) * comps.scaling_factor  # (batch, C, H, W)
    ids = comps.tokenizer(
        [r["impression"] for r in rows],
        padding="max_length",
        max_length=comps.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)  # (batch, tokens)
    scheduler = DDPMScheduler.from_config(comps.scheduler.config)
    unet, text = comps.unet.train().requires_grad_(True), comps.text_encoder.requires_grad_(learnable)
    params = list(unet.parameters()) + (list(text.parameters()) if learnable else [])
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            hidden = text(ids)[0]  # (batch, tokens, width)
            pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def cxrdiff_loop(
    model: Path, data: Path, out: Path, steps: int, warmup: int, batch: int, learnable: bool, precision: str
) -> tuple[float, float]:
    """Images/s of `finetune` from its own log (after warm-up), and end to end including load and export."""
    config = FinetuneConfig(
        data=data,
        base_model=model,
        out=out,
        frozen_text=not learnable,
        steps=warmup + steps,
        batch_size=batch,
        per_device_batch_size=batch,
        mixed_precision=precision,
        checkpoint_every=10**9,  # only the final checkpoint, as the bare loop saves nothing in between
        log_every=1,
    )
    start = time.perf_counter()
    finetune(config)
    total = time.perf_counter() - start
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()][warmup:]
    seconds = sum(batch / r["images_per_s"] for r in log)
    return len(log) * batch / seconds, (warmup + steps) * batch / total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="diffusers SD folder (default: a tiny random one)")
    parser.add_argument("--data", type=Path, help="prepared folder (default: synthetic, tiny-model shaped)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--learnable-text", action="store_true")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or write_tiny_model(tmp / "tiny")
        data = args.data
        if data is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from fixtures_prepared import build_prepared

            comps = load_components(model)
            data = build_prepared(
                tmp / "prepared",
                n=max(64, args.batch_size * 4),
                shard_size=32,
                latent_shape=comps.latent_shape,
                resolution=comps.resolution,
                scaling_factor=comps.scaling_factor,
            )
        common = (args.steps, args.warmup, args.batch_size, args.learnable_text, args.mixed_precision)
        bares, ours_all = [], []
        for r in range(args.repeats):  # interleaved, best of each: a shared machine only ever slows a run down
            bares.append(bare_loop(model, data, *common))
            ours_all.append(cxrdiff_loop(model, data, tmp / f"run{r}", *common))
        bare = max(bares)
        ours, end_to_end = max(o[0] for o in ours_all), max(o[1] for o in ours_all)
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    text = "learnable" if args.learnable_text else "frozen"
    print(f"device {device}, batch {args.batch_size}, {args.steps} timed steps, text {text}, best of {args.repeats}")
    print(f"bare PyTorch loop, in-memory tensors : {bare:8.2f} images/s")
    print(f"cxrdiff finetune loop               : {ours:8.2f} images/s  (ratio {ours / bare:.2f})")
    print(f"cxrdiff finetune end to end          : {end_to_end:8.2f} images/s  (load, checkpoint and export included)")


if __name__ == "__main__":
    main()
