"""Progress for slow work on stderr: a rich bar on a terminal, plain lines otherwise.

On a terminal the bar keeps its numbers whole at 80 columns (a narrow terminal
gets the description on a line of its own). When stderr is a file or a pipe, a plain line is printed (and
flushed) at the start, then at most every PLAIN_EVERY_S seconds and at the end, so
the log of a run that is killed still says how far it got. Nothing is printed when
disabled (--quiet).
"""

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
from rich.table import Column

# Seconds between two plain progress lines when stderr is not a terminal.
PLAIN_EVERY_S = 30.0
# Room the bar keeps for the rate ("123,456 inj/s") and the caller's info ("SDC 12.34%").
_RATE_WIDTH, _INFO_WIDTH = 16, 14

_console = Console(stderr=True)


def format_rate(rate: float | None, unit: str) -> str:
    """'1,234 inj/s', '0.52 epoch/s', or '-- inj/s' before there is anything to measure."""
    if rate is None:
        return f"-- {unit}/s"
    return f"{rate:,.0f} {unit}/s" if rate >= 10 else f"{rate:.2g} {unit}/s"


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


class _Bar:
    """What progress_bar yields: advance(n, info) after each piece of work."""

    def __init__(self, description: str, total: int | None, unit: str,
                 progress: Progress | None = None, task=None, plain: Console | None = None,
                 every_s: float = PLAIN_EVERY_S):
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        self.info = ""
        self.started = time.perf_counter()
        self._progress = progress
        self._task = task
        self._plain = plain
        self._every_s = every_s
        self._printed_at = self.started
        self._printed_done = 0
        if plain is not None:
            self._line()

    @property
    def rate(self) -> float | None:
        """Units per second so far; None until some work is done."""
        if self.done == 0:
            return None
        return self.done / max(time.perf_counter() - self.started, 1e-9)

    def advance(self, n: int = 1, info: str = "") -> None:
        self.done += n
        self.info = info
        if self._progress is not None:
            self._progress.update(self._task, advance=n, info=info,
                                  rate=format_rate(self.rate, self.unit))
        elif self._plain is not None and time.perf_counter() - self._printed_at >= self._every_s:
            self._line()

    def finish(self) -> None:
        if self._plain is not None and self.done != self._printed_done:
            self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        elapsed = now - self.started
        if self.total:
            share = f"{self.done:,}/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
            rate = self.rate
            left = (self.total - self.done) / rate if rate else None
            timing = f"{_clock(elapsed)} elapsed, eta {_clock(left)}"
        else:
            share, timing = f"{self.done:,} {self.unit}", f"{_clock(elapsed)} elapsed"
        parts = [f"{self.description}: {share}", timing, format_rate(self.rate, self.unit)]
        if self.info:
            parts.append(self.info)
        # Within the console's width (80 for a log file), dropping the timing, then the
        # rate, before anything the reader needs: what, how far, and the caller's info.
        for drop in (None, timing, parts[2]):
            if drop is not None:
                parts.remove(drop)
            if len(", ".join(parts)) <= self._plain.width:
                break
        stream = self._plain.file
        print(", ".join(parts), file=stream, flush=True)
        self._printed_at, self._printed_done = now, self.done


def _columns(wide: bool) -> list:
    """The bar's columns; a narrow terminal gets no description (it is printed above the
    bar instead) and no elapsed time, so the numbers stay whole at 80 columns."""
    whole = {"table_column": Column(no_wrap=True)}  # numbers are never cut or wrapped
    columns = [TextColumn("[bold]{task.description}", **whole)] if wide else []
    columns += [BarColumn(bar_width=30 if wide else 20), MofNCompleteColumn(**whole)]
    if wide:
        columns.append(TimeElapsedColumn(**whole))
    columns += [
        TextColumn("eta", **whole),
        TimeRemainingColumn(**whole),
        TextColumn("{task.fields[rate]}", **whole),
        TextColumn("{task.fields[info]}", **whole),
    ]
    return columns


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, unit: str = "it", enabled: bool = True,
                 console: Console | None = None, every_s: float = PLAIN_EVERY_S):
    """Yield an object with `advance(n, info)` that shows progress, rate and ETA on stderr.

    A bar on a terminal, plain lines (see PLAIN_EVERY_S) otherwise, nothing when not
    enabled; with total == 0 it prints one line saying that nothing is left to run.
    """
    console = console or _console
    if not enabled:
        yield _Bar(description, total, unit)
        return
    if total == 0:
        console.print(f"{description}: nothing left to run", markup=False, highlight=False)
        yield _Bar(description, total, unit)
        return
    if not console.is_terminal:
        bar = _Bar(description, total, unit, plain=console, every_s=every_s)
        try:
            yield bar
        finally:  # also when interrupted: the log then says how far the run got
            bar.finish()
        return
    # Description, bar, done/total, elapsed, "eta", remaining, rate, info and 8 gaps.
    need = len(description) + 30 + 2 * len(str(total)) + 1 + 7 + 3 + 7 + _RATE_WIDTH + _INFO_WIDTH + 8
    wide = console.width >= need
    if not wide:
        console.print(description, style="bold", markup=False, highlight=False)
    progress = Progress(*_columns(wide), console=console, transient=False)
    with progress:
        task = progress.add_task(description, total=total, info="", rate=format_rate(None, unit))
        yield _Bar(description, total, unit, progress, task)
