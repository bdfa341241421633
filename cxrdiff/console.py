"""Where output goes: results to stdout, progress and logs to stderr (rich), verbosity as in uv."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.logging import RichHandler

T = TypeVar("T")

err = Console(stderr=True, highlight=False)
log = logging.getLogger("cxrdiff")
_verbosity = 0


def set_verbosity(level: int) -> None:
    """-q → -1, default 0, -v → 1, -vv → 2."""
    global _verbosity
    _verbosity = level
    err.quiet = level < 0
    log.handlers[:] = [RichHandler(console=err, show_path=False, show_time=level > 1)]
    log.setLevel(logging.WARNING if level < 0 else logging.INFO if level < 2 else logging.DEBUG)
    log.propagate = False


def quiet_libraries(level: int) -> None:
    """Below -v, other libraries keep their progress bars ("Loading weights", "Writing model shards") and
    notices ("should be kept in float32") to themselves: the CLI shows cxrdiff's own progress only.

    Set through the environment, read when those libraries are imported (after this, in the CLI), so it
    costs no import here and reaches the processes that `accelerate launch` starts too."""
    if level >= 1:
        return
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "diffusers" in sys.modules or "transformers" in sys.modules:
        _silence_imported()


def _silence_imported() -> None:
    """The same, for libraries already imported (their env settings were read then)."""
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        if module.split(".")[0] in sys.modules:
            import importlib

            logging_module = importlib.import_module(module)
            logging_module.set_verbosity_error()
            logging_module.disable_progress_bar()


def verbosity() -> int:
    return _verbosity


_label = ""  # names this process in every plain progress line: several processes write to one log


def set_label(label: str) -> None:
    """Prefix this process's plain progress lines with `[label]` (a side-by-side worker: `worker 2`)."""
    global _label
    _label = label


def interactive() -> bool:
    """A live progress bar only on a terminal; batch jobs (SLURM logs) get plain lines."""
    return err.is_terminal and not os.environ.get("CI") and _verbosity >= 0


def progress(items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate with a rich progress bar (with ETA) on a terminal, and a line every 10% (with ETA) otherwise."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if interactive():
        from rich.progress import track

        yield from track(items, total=total, description=description, console=err, transient=True)
        return
    step = max(1, (total or 0) // 10)
    start = time.monotonic()
    for i, item in enumerate(items):
        if _verbosity >= 0 and total and (i % step == 0):
            elapsed = time.monotonic() - start
            eta = f", about {elapsed / i * (total - i):.0f} s left" if i else ""
            who = f"[{_label}] " if _label else ""
            print(f"{who}{description} {i}/{total}{eta}", file=sys.stderr, flush=True)
        yield item


set_verbosity(0)
