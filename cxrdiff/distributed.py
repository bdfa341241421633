"""The process group of a step under `accelerate launch`: formed once, with a timeout (`--dist-timeout`).

A rank that dies or hangs leaves the others waiting in their next collective; torch's default is 30 minutes
for gloo (10 for NCCL), after which they fail. A job with a tight time limit wants less, one whose ranks
wait long on disk (a barrier while the main process writes a table of 5,000 images) more. `cxrdiff doctor
--distributed` checks the group, a barrier and that `--out`'s locks hold across the processes.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT_S = 1800


def on_cpu() -> bool:
    """Without CUDA, accelerate forms a (gloo) process group only when told the run is on the CPU."""
    import torch

    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or (
        int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    )


def process_state(timeout_s: float | None = None) -> Any:
    """accelerate's `PartialState` (this process's rank, the device), its group formed with `timeout_s`."""
    from accelerate import PartialState

    kwargs = {"timeout": _dt.timedelta(seconds=timeout_s)} if timeout_s else {}
    return PartialState(cpu=on_cpu(), **kwargs)


def accelerator(timeout_s: float | None = None, **options: Any) -> Any:
    """An `Accelerator` whose process group is formed with `timeout_s`."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = [InitProcessGroupKwargs(timeout=_dt.timedelta(seconds=timeout_s))] if timeout_s else []
    return Accelerator(kwargs_handlers=handlers, **options)


def check_group(out: Path | None, timeout_s: float | None) -> dict[str, tuple[bool, str]] | None:
    """Under `accelerate launch`: an all-reduce (the sum of 1..P), a timed barrier, and whether a folder the
    main process claimed in `out` is refused to every other rank (`InUse`). The main process gets the
    checks (ok, detail); the others None."""
    import torch
    from accelerate.utils import reduce

    from cxrdiff.artifacts import InUse, StepFolder

    state = process_state(timeout_s)
    world, rank = state.num_processes, state.process_index
    if world == 1:
        note = "1 process: run it as `accelerate launch -m cxrdiff doctor --distributed`"
        return {"processes": (True, note)}
    total = reduce(torch.tensor([float(rank + 1)], device=state.device), "sum").item()
    start = time.perf_counter()
    state.wait_for_everyone()
    barrier_s = time.perf_counter() - start
    base = Path(out) if out is not None else Path(tempfile.gettempdir())
    folder = base / f".cxrdiff-doctor-{os.environ.get('MASTER_PORT', 'group')}"
    if state.is_main_process:
        claimed = StepFolder.claim(folder, "doctor", {"world": world})
    state.wait_for_everyone()
    refused = 1.0
    if not state.is_main_process:
        try:
            StepFolder.claim(folder, "doctor", {"world": world})
            refused = 0.0
        except InUse:
            refused = 1.0
    refusals = reduce(torch.tensor([refused], device=state.device), "sum").item()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    claimed.finish(config={})
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    expected = world * (world + 1) / 2
    group = f"{world} processes, backend {state.backend}, device {state.device}"
    return {
        "processes": (True, group),
        "all_reduce": (total == expected, f"sum of ranks 1..{world} = {total:g} (expected {expected:g})"),
        "barrier": (True, f"{barrier_s:.3f} s; timeout {timeout_s or DEFAULT_TIMEOUT_S:g} s"),
        "locks": (refusals == world, f"{base}: {refusals - 1:g} of {world - 1} other ranks refused the main's claim"),
    }
