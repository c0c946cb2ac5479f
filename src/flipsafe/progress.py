"""Progress bars for slow work, drawn with rich on stderr and silent when disabled."""

from __future__ import annotations

import contextlib
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress | None, task, unit: str):
        self._progress = progress
        self._task = task
        self.unit = unit
        self.done = 0
        self.started = time.perf_counter()

    def advance(self, n: int = 1, info: str = "") -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, advance=n, info=info)

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.started, 1e-9)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, unit: str = "it", enabled: bool = True):
    """Yield an object with `advance(n, info)`; draws a bar with rate and ETA when enabled."""
    if not enabled:
        yield _Bar(None, None, unit)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    progress = Progress(*columns, console=_console, transient=False)
    with progress:
        task = progress.add_task(description, total=total, info="")
        yield _Bar(progress, task, unit)
