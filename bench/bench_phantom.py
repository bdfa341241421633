"""How long `cxrdiff phantom` takes for 1,000 patients at 512 px (target: under 2 minutes on 2 cores).

Prints the wall time with all cores and with one, side by side, and the images per second.
Usage: .venv/bin/python bench/bench_phantom.py [--patients 1000] [--size 512]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from cxrdiff.console import set_verbosity
from cxrdiff.phantom import PhantomConfig, make_phantom


def _cpu_seconds() -> float:
    """CPU time of this process and its finished workers: the cost that does not depend on other load."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--single", action="store_true", help="also time one worker (slow)")
    args = parser.parse_args()
    set_verbosity(-1)
    runs = [("all cores", None)] + ([("1 worker", 1)] if args.single else [])
    for name, workers in runs:
        out = Path(tempfile.mkdtemp()) / "phantom"
        cpu0 = _cpu_seconds()
        start = time.perf_counter()
        result = make_phantom(PhantomConfig(out, patients=args.patients, size=args.size, seed=0, workers=workers))
        seconds = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu0
        print(
            f"{name} ({os.cpu_count()} cpus): {args.patients} patients, {result['images']} images at {args.size} px: "
            f"{seconds:.1f} s ({result['images'] / seconds:.1f} images/s; target < 120 s: "
            f"{'ok' if seconds < 120 else 'MISSED'}); CPU {cpu:.1f} s = {cpu / 2:.1f} s on 2 idle cores, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        shutil.rmtree(out.parent)


if __name__ == "__main__":
    main()
