"""Perplexity by the DESIGN.md protocol: non-overlapping ctx windows, mean NLL over every predicted token."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Perplexity:
    ppl: float
    nll: float
    tokens: int  # predicted tokens scored
    windows: int
    ctx: int
    protocol: str = "non-overlapping windows, all ctx-1 predicted tokens scored"
    window_nll: tuple[float, ...] = ()  # mean NLL per window, in order: for paired comparisons between models


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL of ids[1:] given logits[:-1] for one window (float64 sum for stable averages)."""
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum").double()


def perplexity(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    windows: torch.Tensor,
    progress: Callable[[], None] | None = None,
) -> Perplexity:
    """LOGITS_FN maps one window of ids (ctx,) to logits (ctx, vocab); any backend fits behind it."""
    total, count, per = 0.0, 0, []
    for w in windows:
        nll = float(window_nll(logits_fn(w), w))
        total += nll
        count += len(w) - 1
        per.append(nll / (len(w) - 1))
        if progress:
            progress()
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, len(windows), windows.shape[1], window_nll=tuple(per))


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-window NLL differences a − b of two models scored on the same windows."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired difference needs two equal lists of at least 2 windows, not {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, math.sqrt(var / len(d))
