"""The progress reporter: plain timestamped lines into a log, at most one per interval."""

from __future__ import annotations

import io
import itertools
import re
import time

from gradfree.base.progress import Progress, counter, line, reporting, silent


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_log_lines_at_most_every_interval_and_at_each_stage_end() -> None:
    clock, stream = FakeClock(), io.StringIO()
    p = Progress(stream, every=30.0, clock=clock)
    assert not p.tty  # a StringIO is no terminal: plain lines, no bar
    start = clock.t
    for i in range(1, 401):  # one window every second
        clock.t = start + i
        p("capture teacher", i, 400, "windows")
    clock.t += 5
    p("ridge heads", 1, 1, "candidates")  # a short stage: only its end is written
    lines = stream.getvalue().splitlines()
    # every 30 s (at 30, 60, ..., 390) and the end (400), then the second stage's end
    assert len(lines) == 13 + 1 + 1
    stamp = time.strftime("%H:%M:%S", time.localtime(start + 120))
    assert f"[{stamp}] capture teacher: 120/400 windows (30%)" in lines
    assert lines[-2].endswith("] capture teacher: 400/400 windows (100%)")
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] ridge heads: 1/1 candidates \(100%\)", lines[-1])
    times = [int(m.group(1)) for m in (re.search(r": (\d+)/400", x) for x in lines) if m]
    assert all(b - a >= 30 for a, b in itertools.pairwise(times[:-1]))
    p.close()


def test_counter_and_reporting() -> None:
    clock, stream = FakeClock(), io.StringIO()
    with reporting(Progress(stream, clock=clock)) as report:
        advance = counter(report, "capture model", 3, "batches", done=1)
        advance(1)
        clock.t += 31
        advance(1)
    assert stream.getvalue().splitlines()[-1].endswith("capture model: 3/3 batches (100%)")
    assert len(stream.getvalue().splitlines()) == 1
    with reporting(False) as report:
        assert report is silent
    assert line(0.0, "eval", 0, 0).endswith("eval: 0/0")  # no share of an empty total


def test_a_terminal_gets_a_bar_that_is_taken_down() -> None:
    stream = io.StringIO()
    with Progress(stream, tty=True) as p:
        p("capture model", 1, 2, "batches")
        p("capture model", 2, 2, "batches")
        assert p._bar is not None
    assert p._bar is None  # and no log lines: the bar is the terminal's display
    assert not re.search(r"^\[\d\d:\d\d:\d\d\]", stream.getvalue(), re.M)
