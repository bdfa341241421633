"""Does splitting `sample` into array tasks scale on one machine? 2 shards × 1 thread against 1 process × 2
threads, on the same cores, images per second side by side (the scaling ratio).

    .venv/bin/python bench/bench_shards.py [--model DIR] [--images 16] [--steps 10] [--repeats 2]

Both sides make the same images (`--shard 0/2` and `--shard 1/2` started together into one folder, each with
OMP_NUM_THREADS=1; then one `cxrdiff sample` with OMP_NUM_THREADS=2) as CLI processes, so start-up (imports,
loading the model) is counted on both sides as an array job pays it. The images are checked to be the same
files. Run it on a quiet machine: another process on the cores makes either side slower.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], out: Path, threads: int, shards: int) -> float:
    """Seconds for `shards` processes of `threads` threads each to make every image into `out`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "cxrdiff", "-q", "sample", *args, "--out", str(out)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen([*command, *(["--shard", f"{i}/{shards}"] if shards > 1 else [])], env=env)
        for i in range(shards)
    ]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a sample process failed")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: a tiny random SD2-shaped one)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = options.model
        if model is None:
            from cxrdiff.model.tiny import write_tiny_model

            model = write_tiny_model(work / "tiny", seed=0)
        args = ["--model", str(model), "--prompt", "small left pleural effusion", "--n-per-prompt",
                str(options.images), "--steps", str(options.steps), "--batch-size", "4"]  # fmt: skip
        times: dict[str, list[float]] = {"2 shards x 1 thread": [], "1 process x 2 threads": []}
        for r in range(options.repeats):
            times["2 shards x 1 thread"].append(run(args, work / f"shards-{r}", threads=1, shards=2))
            times["1 process x 2 threads"].append(run(args, work / f"one-{r}", threads=2, shards=1))
        names = sorted(p.name for p in (work / "shards-0").glob("*.png"))
        assert len(names) == options.images and names == sorted(p.name for p in (work / "one-0").glob("*.png"))
        rates = {name: options.images / min(seconds) for name, seconds in times.items()}
        for name, rate in rates.items():
            print(f"{name:>22}: {rate:.3f} images/s (best of {options.repeats}: {min(times[name]):.1f} s)")
        ratio = rates["2 shards x 1 thread"] / rates["1 process x 2 threads"]
        print(f"scaling ratio (2 shards / 1 process): {ratio:.2f}; cores: {os.cpu_count()}, "
              f"load average: {os.getloadavg()[0]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
