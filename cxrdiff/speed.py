"""Speed levers that leave results alone (up to float and bf16 noise), and CPU threads per process.

`--compile` (torch.compile of the UNet), `--tf32` (TF32 matmuls and convolutions on NVIDIA GPUs) and
`--channels-last` (NHWC memory format for the UNet's convolutions) are options of `finetune`, `sample`
and `ground`; `finetune` also has `--fused-adamw`. Each is a config field, so the manifest records it;
none is part of a folder's settings, because none changes what is computed. docs/performance.md has
the measurements.

`limit_cpu_threads` keeps processes × threads ≤ cores when several processes share a CPU box (for
example `accelerate launch --num_processes 2` without a GPU): each PyTorch process otherwise starts one
thread per core, and the oversubscribed cores ran kernels 60× slower.
"""

from __future__ import annotations

import os
from typing import Any

from cxrdiff.console import log

# The backend `torch.compile` uses. Inductor generates kernels (on a CPU it needs a C++ compiler and
# minutes per graph); tests set "aot_eager", which traces the same graphs (Dynamo and AOTAutograd, where
# graph breaks and tracing errors happen) but runs them eagerly.
COMPILE_BACKEND = "inductor"


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions (NVIDIA Ampere and newer; no effect elsewhere)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def speed_up_unet(unet: Any, compile: bool = False, channels_last: bool = False) -> Any:
    """Apply the levers to a diffusers UNet in place (same module, same parameter names) and return it.

    `nn.Module.compile` compiles the module's forward in place, so accelerate, the attention capture
    (which swaps processors: Dynamo then recompiles once) and `save_pretrained` see the same object.
    """
    import torch

    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile:
        unet.compile(backend=COMPILE_BACKEND)
    return unet


def local_processes() -> int:
    """Processes of this job on this machine (accelerate/torchrun's LOCAL_WORLD_SIZE; 1 when alone)."""
    for name in ("LOCAL_WORLD_SIZE", "ACCELERATE_NUM_PROCESSES"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def limit_cpu_threads(device: Any, processes: int | None = None) -> int | None:
    """On a CPU with several local processes, give each cores // processes threads (at least 1).

    Returns the thread count set, or None when nothing was changed: on a GPU, alone on the machine, or
    when the user chose a count with OMP_NUM_THREADS (theirs wins).
    """
    import torch

    processes = processes or local_processes()
    if getattr(device, "type", str(device)) != "cpu" or processes <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = max(1, cpu_cores() // processes)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        log.info("%d processes on %d CPU cores: %d PyTorch threads each", processes, cpu_cores(), threads)
    return threads


def start_worker(threads: int) -> None:
    """A `side_by_side` worker: dies with its parent (a killed run leaves none), uses `threads` threads."""
    import multiprocessing

    import torch

    from cxrdiff.console import set_label
    from cxrdiff.processes import die_with_parent

    die_with_parent()
    torch.set_num_threads(threads)
    set_label(f"worker {multiprocessing.current_process().name.rsplit('-', 1)[-1]}")  # SpawnProcess-N


def side_by_side(fn: Any, jobs: list[tuple[Any, ...]], workers: int | None = None) -> list[Any]:
    """`fn(*job)` for every job, in order; on a multi-core CPU as many side by side as there are cores, in
    spawned processes with cores // workers PyTorch threads each, so the processes never oversubscribe.

    The demo's tiny models are too small for two threads to pay (a fine-tune: 32 images/s on one thread,
    46 on two), so two jobs side by side finish about 1.4× sooner than one after the other. With CUDA, one
    core, one job or `workers=1`, the jobs run here one after the other. `fn` and the jobs must pickle.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    workers = min(workers or cpu_cores(), cpu_cores(), len(jobs))
    if workers < 2 or torch.cuda.is_available():
        return [fn(*job) for job in jobs]
    threads = max(1, cpu_cores() // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=start_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [future.result() for future in futures]
