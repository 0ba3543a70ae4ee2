"""Progress display shared by commands that stream many bytes."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["byte_progress"]


@contextlib.contextmanager
def byte_progress(
    label: str, total: int, *, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(nbytes)`` callback that drives a progress bar on stderr.

    Disabled (a no-op callback) for JSON output and when stderr is not a
    terminal, so logs and machine-readable output stay clean.
    """
    if not enabled or not sys.stderr.isatty():
        yield lambda _count: None
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    with progress:
        task = progress.add_task(label, total=total)
        yield lambda count: progress.advance(task, count)
