"""Progress of long work, one mechanism for every loop: a bar on a terminal, log lines elsewhere.

A loop reports ``progress(stage, done, total, unit)`` after each step. :class:`Progress` shows
that as a rich bar when its stream is a terminal; into a log file (or a pipe) it writes plain
lines such as ``[12:03:04] capture teacher: 120/400 windows (30%)``, at most one every
``every`` seconds (30) and one when a stage ends, so that a job in a log is never silent for long
and never floods it. Library functions take ``progress`` as a bool or such a callable
(:func:`reporting` turns either into a callable).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TextIO


class ProgressFn(Protocol):
    """What a loop calls after each step: ``done`` of ``total`` ``unit`` of ``stage``."""

    def __call__(self, stage: str, done: int, total: int, unit: str = "") -> None: ...


def silent(stage: str, done: int, total: int, unit: str = "") -> None:
    """A reporter that reports nothing."""


class Progress:
    """A reporter on ``stream`` (default: stderr at the time of each report).

    ``tty``: whether to draw a bar (default: whether the stream is a terminal). ``clock`` gives
    the time in seconds since the epoch (a test passes a fake one). Use it as a context manager,
    or call :meth:`close`, so that a bar is taken down.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        every: float = 30.0,
        clock: Callable[[], float] = time.time,
        tty: bool | None = None,
    ) -> None:
        self._stream, self.every, self.clock = stream, every, clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self._last = clock()  # the first line comes after `every` seconds or at a stage's end
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def __call__(self, stage: str, done: int, total: int, unit: str = "") -> None:
        if self.tty:
            self._draw(stage, done, total, unit)
            return
        now = self.clock()
        if done < total and now - self._last < self.every:
            return
        self._last = now
        self.stream.write(line(now, stage, done, total, unit) + "\n")
        self.stream.flush()

    def _draw(self, stage: str, done: int, total: int, unit: str) -> None:
        if self._bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            columns = (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            console = Console(file=self.stream)
            self._bar = Progress("{task.description}", *columns, console=console, transient=True)
            self._bar.start()
        if stage not in self._tasks:
            self._tasks[stage] = self._bar.add_task(f"{stage} ({unit})" if unit else stage)
        self._bar.update(self._tasks[stage], completed=done, total=total)

    def close(self) -> None:
        """Take down the bar, if one is drawn."""
        if self._bar is not None:
            self._bar.stop()
            self._bar, self._tasks = None, {}

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def line(now: float, stage: str, done: int, total: int, unit: str = "") -> str:
    """One log line: ``[HH:MM:SS] stage: done/total unit (pct%)`` in local time."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    pct = f" ({100 * done // total}%)" if total > 0 else ""
    return f"[{stamp}] {stage}: {done}/{total}{f' {unit}' if unit else ''}{pct}"


@contextlib.contextmanager
def reporting(progress: bool | ProgressFn | None) -> Iterator[ProgressFn]:
    """A reporter for a library function's ``progress`` argument: True = a :class:`Progress` on
    stderr (closed on exit), False/None = :func:`silent`, a callable = itself."""
    if progress is True:
        with Progress() as p:
            yield p
    elif progress is False or progress is None:
        yield silent
    else:
        yield progress


def counter(
    progress: ProgressFn, stage: str, total: int, unit: str = "", done: int = 0
) -> Callable[[int], None]:
    """``advance(n)`` for a loop over ``total`` steps from ``done``: reports after each call."""
    count = [done]

    def advance(n: int = 1) -> None:
        count[0] += n
        progress(stage, count[0], total, unit)

    return advance
