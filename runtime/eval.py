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


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL of ids[1:] given logits[:-1] for one window (float64 sum for stable averages)."""
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum").double()


def perplexity(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    windows: torch.Tensor,
    progress: Callable[[], None] | None = None,
) -> Perplexity:
    """LOGITS_FN maps one window of ids (ctx,) to logits (ctx, vocab); any backend fits behind it."""
    total, count = 0.0, 0
    for w in windows:
        total += float(window_nll(logits_fn(w), w))
        count += len(w) - 1
        if progress:
            progress()
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, len(windows), windows.shape[1])
