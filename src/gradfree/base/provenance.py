"""What every output records about how it was made: versions, seeds, timings and memory.

``versions()`` lists the library versions that shape numerical results. ``Stopwatch`` measures
named stages: wall time and the peak resident memory of this process during the stage (sampled
by a background thread, since ``ru_maxrss`` only gives the lifetime peak).
"""

from __future__ import annotations

import platform
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any


def versions() -> dict[str, str]:
    """Versions of Python, gradfree and the numerical libraries (absent ones are omitted)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("gradfree", "torch", "transformers", "safetensors", "numpy", "scipy"):
        with suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def machine() -> dict[str, Any]:
    import os

    import psutil

    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def lifetime_peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class Stopwatch:
    """Collects (stage, seconds, peak RSS during the stage) rows."""

    interval: float = 0.1
    rows: list[dict[str, Any]] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        peak = [rss_bytes()]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(self.interval):
                peak[0] = max(peak[0], rss_bytes())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            stop.set()
            thread.join()
            peak[0] = max(peak[0], rss_bytes())
            self.rows.append(
                {"stage": name, "seconds": round(seconds, 2), "peak_rss_gib": peak[0] / 2**30}
            )

    def table(self) -> str:
        lines = ["| stage | wall time (s) | peak RSS (GiB) |", "|---|---:|---:|"]
        for r in self.rows:
            lines.append(f"| {r['stage']} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} |")
        return "\n".join(lines)
