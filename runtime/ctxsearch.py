"""The longest context that fits a memory budget, found by real runs: a line through measured peaks, then a bracket."""

from __future__ import annotations

import math
from collections.abc import Callable

Runs = list[tuple[int, float | None]]


def bracket_max_ctx(peak_at: Callable[[int], float | None], known: list[tuple[int, float]], budget: float,
                    per_token: float, limit: int | None, checks: int = 10) -> tuple[int, Runs]:
    """The longest context whose real peak stays in BUDGET, and the runs that found it.

    KNOWN holds (tokens, peak) from at least one timed run. They set the first guess, and a timed run under budget
    proves its length fits (it did more than a check does); their peaks also hold warm-up and decode, so later
    guesses use the checks alone. A guess extends the line through the two measured peaks nearest the budget (at
    least PER_TOKEN, the KV cache's own slope, > 0) and is then run: peak_at(n) is its peak, or None where the run
    failed (taken as over budget). Guesses that leave the bracket [largest fit, smallest miss] become bisections, so
    the search ends within 1% of the true length (or after CHECKS runs); it climbs as well as it descends, so a
    first guess that fits with room to spare is not the answer.
    """
    ceiling = limit + 1 if limit else None  # the smallest length known not to fit (or not to exist)
    lo = min(max((t for t, p in known if p <= budget), default=0), limit or math.inf)
    runs: Runs = []
    missed = False

    def guess(pts: list[tuple[int, float]]) -> int:
        under = [pt for pt in pts if pt[1] <= budget]
        anchor = max(under) if under else min(pts)
        near = [pt for pt in sorted(pts, key=lambda pt: abs(pt[0] - anchor[0])) if pt[0] != anchor[0]][:1]
        slope = max(per_token, (near[0][1] - anchor[1]) / (near[0][0] - anchor[0])) if near else per_token
        return anchor[0] + math.floor((budget - anchor[1]) / slope * 0.97)

    for _ in range(checks):
        if ceiling is not None and ceiling - lo <= (max(1, lo // 100) if missed else 1):
            break
        measured = sorted((n, p) for n, p in runs if p is not None)
        n = guess(measured or sorted(known))
        if n < 2 and lo == 0:
            break  # the line through the peaks says no context fits: no run is wasted on it
        if limit and n >= limit and not missed:
            n = limit  # nothing has missed yet: try the model's whole context before bisecting towards it
        elif ceiling is not None and not lo < n < ceiling:
            n = (lo + ceiling) // 2
        elif n <= lo:  # the line says lo is about the answer: probe just above it to close the bracket
            n = lo + max(1, lo // 100)
        peak = peak_at(n)
        runs.append((n, peak))
        if peak is not None and peak <= budget:
            lo = n
        else:
            ceiling, missed = n, True
    return lo, runs
