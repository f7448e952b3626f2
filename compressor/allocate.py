"""Rank allocation to a budget: which rank each linear gets so that the whole model meets a size target.

Pure functions over `Slot`s (one per linear). A slot's cost is `fixed + per_rank · rank`, in the budget's unit
(parameters for --target-params, bytes for --target-bpw). Candidate ranks are multiples of `step` up to the
break-even rank, the largest rank whose L and R hold fewer parameters than W itself.

- uniform: every linear gets the same fraction of its break-even rank (Lillama's uniform), the fraction chosen as
  large as the budget allows;
- bottom / top: start every linear at its break-even rank and lower the ranks one layer at a time from the first
  (bottom) or last (top) block, first down to a quarter of break-even, then, if still over budget, to the
  smallest rank (Lillama lowers whole layers in order; its untouched layers stay dense, which the artifact has no
  form for, so here they keep the break-even rank);
- error: greedy on the relative H-weighted error removed per unit of cost, across all linears. A linear's error at
  rank r is the whitened singular values it discards, Σ_{i>r} σ_i² / Σ σ_i², so the curves cost one SVD each and
  are convex: greedy is optimal up to the last step's rounding.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import Tensor

from lrdeploy.errors import LrdError

ALLOCATIONS = ("uniform", "bottom", "top", "error")


@dataclass(frozen=True)
class Slot:
    name: str
    layer: int
    shape: tuple[int, int]
    fixed: float  # cost that does not depend on the rank (Q's bytes; 0 for parameters)
    per_rank: float  # cost of one unit of rank: (out + in) parameters, or their bytes
    step: int  # ranks are multiples of this (32 for quantized L/R, whose rows of length r hold 32-blocks)

    @property
    def max_rank(self) -> int:
        """The largest multiple of step below both min(out, in) and the break-even rank out·in / (out + in)."""
        out, in_ = self.shape
        r = min(min(out, in_) - 1, (out * in_ - 1) // (out + in_))
        return max(self.step, r - r % self.step)

    def cost(self, rank: int) -> float:
        return self.fixed + self.per_rank * rank


def total_cost(slots: list[Slot], ranks: dict[str, int]) -> float:
    return sum(s.cost(ranks[s.name]) for s in slots)


def error_curve(sigma: Tensor, norm: float | None = None) -> Tensor:
    """H-error at every rank 0..len(sigma) from the singular values of A·S (whitened): the σ² a rank discards.

    Divided by NORM (‖W‖²_H, so that it is the relative error the manifest records), or by Σσ² if not given.
    """
    s2 = sigma.double().pow(2)
    tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
    return tail / max(float(s2.sum()) if norm is None else norm, 1e-300)


def allocate(slots: list[Slot], budget: float, mode: str, curves: dict[str, Tensor] | None = None) -> dict[str, int]:
    """Ranks for SLOTS whose total cost is at most BUDGET, by the strategy MODE (see the module docstring)."""
    if mode not in ALLOCATIONS:
        raise LrdError(f"unknown --allocation '{mode}'; choose one of {', '.join(ALLOCATIONS)}")
    lowest = {s.name: s.step for s in slots}
    if total_cost(slots, lowest) > budget:
        raise LrdError("the size target is below what the smallest ranks need; ask for a smaller reduction")
    if mode == "uniform":
        return _uniform(slots, budget)
    if mode == "error":
        if curves is None:
            raise ValueError("error allocation needs the error curves")
        return _greedy(slots, budget, curves)
    return _ordered(slots, budget, top=mode == "top")


def _at_fraction(slots: list[Slot], f: float) -> dict[str, int]:
    return {s.name: max(s.step, int(f * s.max_rank) // s.step * s.step) for s in slots}


def _uniform(slots: list[Slot], budget: float) -> dict[str, int]:
    lo, hi = 0.0, 1.0
    if total_cost(slots, _at_fraction(slots, hi)) <= budget:
        return _at_fraction(slots, hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        if total_cost(slots, _at_fraction(slots, mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return _at_fraction(slots, lo)


def _ordered(slots: list[Slot], budget: float, top: bool) -> dict[str, int]:
    ranks = {s.name: s.max_rank for s in slots}
    cost = total_cost(slots, ranks)
    layers = sorted({s.layer for s in slots}, reverse=top)
    for floor in ("quarter", "lowest"):
        for layer in layers:
            group = [s for s in slots if s.layer == layer]
            moved = True
            while moved:
                moved = False
                for s in group:
                    low = s.step if floor == "lowest" else max(s.step, s.max_rank // 4 // s.step * s.step)
                    if cost <= budget:
                        return ranks
                    if ranks[s.name] > low:
                        ranks[s.name] -= s.step
                        cost -= s.per_rank * s.step
                        moved = True
    return ranks


def _greedy(slots: list[Slot], budget: float, curves: dict[str, Tensor]) -> dict[str, int]:
    ranks = {s.name: s.step for s in slots}
    cost = total_cost(slots, ranks)
    heap: list[tuple[float, int, str]] = []
    by_name = {s.name: s for s in slots}

    def push(s: Slot) -> None:
        r = ranks[s.name]
        if r + s.step <= s.max_rank:
            curve = curves[s.name]
            gain = float(curve[r] - curve[r + s.step]) / (s.per_rank * s.step)
            heapq.heappush(heap, (-gain, len(heap), s.name))

    for s in slots:
        push(s)
    while heap:
        _, _, name = heapq.heappop(heap)
        s = by_name[name]
        extra = s.per_rank * s.step
        if cost + extra > budget:
            continue  # this one no longer fits; a cheaper step elsewhere still may
        ranks[name] += s.step
        cost += extra
        push(s)
    return ranks
