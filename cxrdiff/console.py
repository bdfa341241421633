"""Where output goes: results to stdout, progress and logs to stderr (rich), verbosity as in uv."""

from __future__ import annotations

import logging
import os
import sys
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


def verbosity() -> int:
    return _verbosity


def interactive() -> bool:
    """A live progress bar only on a terminal; batch jobs (SLURM logs) get plain lines."""
    return err.is_terminal and not os.environ.get("CI") and _verbosity >= 0


def progress(items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate with a rich progress bar on a terminal and a line every 10% otherwise."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if interactive():
        from rich.progress import track

        yield from track(items, total=total, description=description, console=err, transient=True)
        return
    step = max(1, (total or 0) // 10)
    for i, item in enumerate(items):
        if _verbosity >= 0 and total and (i % step == 0):
            print(f"{description} {i}/{total}", file=sys.stderr, flush=True)
        yield item


set_verbosity(0)
