"""Side-by-side timing: two or more callables run interleaved (A B A B ...), the median reported, so a noisy
neighbour on a shared machine slows every side alike. Used by the perf figures and the grid's int8 metrics.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median wall seconds of each callable, run interleaved (A B A B ...) after `warmup` untimed rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            if r >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
