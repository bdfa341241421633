"""Worker processes that die with the process that started them, so a killed step leaves none behind.

A DataLoader or process-pool worker whose parent is killed (SIGKILL, or SIGTERM without cleanup) does not
always notice: one blocked writing a full result pipe, whose read end its sibling workers also hold, waits
forever and keeps its memory. On Linux the kernel can send a child a signal when its parent dies
(`prctl(PR_SET_PDEATHSIG)`); the standard library has no call for it, hence ctypes. Elsewhere nothing is set.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent() -> bool:
    """Called first thing in a worker: the kernel SIGKILLs it when its parent dies. A parent that died before
    this took effect is noticed at once (the worker was re-parented) and the worker exits. The signal is sent
    when the thread that started the worker ends, so start workers from a thread that outlives them (the
    main thread does). Returns whether the kernel will send it."""
    parent = os.getppid()
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:
        os._exit(1)
    return armed


def loader_worker_init(worker_id: int) -> None:
    """A torch DataLoader `worker_init_fn`: the worker dies with its parent and ignores Ctrl-C. A terminal
    sends SIGINT to the whole process group: a worker that died of it would make the parent fail with
    "DataLoader worker exited unexpectedly" instead of stopping as interrupted (exit 130, the work kept);
    the parent alone handles it and ends its workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
