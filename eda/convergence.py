"""Convergence of a unit's reconstruction: a summary of its loss curve and the plateau rule.

The loss of one iteration is noisy (random batches, QDrop masks), so the curve is read through window means: the
iterations are cut into windows of `window_size(iters)` = max(10, iters // 20) iterations (5% of the budget) and
each window is averaged.

Plateau rule: a curve has plateaued when its second half brought less than `PLATEAU_FRACTION` (10%) of the total
decrease, i.e. with m_first, m_mid, m_last the means of the first window, of the window at the midpoint and of the
last window,

    (m_mid - m_last) <= PLATEAU_FRACTION * (m_first - m_last),

or when the curve did not decrease at all (m_last >= m_first: nothing left that these iterations could fix). A
cosine learning-rate schedule flattens the very end of any run, which is why the rule looks at the whole second half
rather than at the last windows. Curves of fewer than 4 windows (40 iterations) are too short to judge: not
plateaued.

`budget="converged"` (eda.registry) stops a unit at the first window boundary, after a tenth of the cap, where the
rule holds on the curve so far; the learning-rate schedule keeps the cap as its horizon, so a stopped unit ends
with part of its cosine decay unused. A stage with the AdaRound regulariser (Q-Diffusion, PTQ4DM with
reconstruction) never stops early: its temperature b anneals over the whole budget (BRECQ's LinearTempDecay), and
rounding variables hardened before the regulariser has pushed them to 0 or 1 would not be AdaRound's result. Its
curve is still summarised and judged by the rule.
"""

from __future__ import annotations

import math

PLATEAU_FRACTION = 0.10
MIN_WINDOWS = 4
CURVE_POINTS = 50  # window means kept per unit in a result row (for plots)


def window_size(iters: int) -> int:
    return max(10, iters // 20)


def window_means(losses: list[float], window: int) -> list[float]:
    """Means of consecutive full windows (a trailing partial window is dropped)."""
    k = len(losses) // window
    return [sum(losses[i * window:(i + 1) * window]) / window for i in range(k)]


def plateaued(losses: list[float], window: int) -> bool:
    """The plateau rule of the module docstring on `losses` (per-iteration values, in order)."""
    m = window_means(losses, window)
    if len(m) < MIN_WINDOWS or not all(math.isfinite(v) for v in m):
        return False
    first, mid, last = m[0], m[len(m) // 2], m[-1]
    if last >= first:
        return True
    return (mid - last) <= PLATEAU_FRACTION * (first - last)


def summarize(losses: list[float], budget: int) -> dict:
    """{iters, budget, first, last, best, plateaued, window, curve}: what a result row keeps of a unit's curve
    (`curve`: at most CURVE_POINTS window means)."""
    window = window_size(budget)
    out = {"iters": len(losses), "budget": budget, "window": window,
           "first": losses[0] if losses else None, "last": losses[-1] if losses else None,
           "best": min(losses) if losses else None, "plateaued": plateaued(losses, window)}
    m = window_means(losses, window)
    if m:
        out["first"], out["last"] = m[0], m[-1]  # window means: the per-iteration values are noisy
    step = max(1, math.ceil(len(m) / CURVE_POINTS))
    out["curve"] = [sum(m[i:i + step]) / len(m[i:i + step]) for i in range(0, len(m), step)]
    return out
