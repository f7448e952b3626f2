"""Feature distillation of one decoder block (Lillama): train its low-rank factors against the teacher block.

The student is a copy of the teacher block in which every compressed linear computes Q·x + L·(R·x) with Q frozen
(or absent) and L, R float32 parameters; norms and everything else stay frozen. The loss compares the teacher
block's output y with the student's ŷ per token. Inputs and targets are detached, so no gradient leaves the block.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INPUT_MODES = ("teacher", "student", "teacher+student")


def distill_loss(y: Tensor, y_hat: Tensor) -> Tensor:
    """Per token mean|y − ŷ| − log σ(cos(y, ŷ)), averaged over tokens (last dim = features).

    L1 keeps the scale of the hidden state right; the cosine term its direction, which the next block's norm sees.
    """
    y, y_hat = y.float(), y_hat.float()
    l1 = (y - y_hat).abs().mean(dim=-1)
    cos = F.cosine_similarity(y, y_hat, dim=-1)
    return (l1 - F.logsigmoid(cos)).mean()


class TrainableLR(nn.Module):
    """y = Q·x + L·(R·x) + b with L and R trainable; Q and b are frozen buffers."""

    def __init__(self, q: Tensor | None, L: Tensor, R: Tensor, bias: Tensor | None):
        super().__init__()
        self.register_buffer("q", None if q is None else q.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.L = nn.Parameter(L.detach().float().clone())
        self.R = nn.Parameter(R.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(F.linear(x, self.R), self.L, self.bias)
        return y if self.q is None else y + F.linear(x, self.q)


def trainable_block(teacher: nn.Module, factors: dict[str, tuple[Tensor | None, Tensor, Tensor, Tensor | None]]
                    ) -> nn.Module:
    """A copy of TEACHER whose linears NAME -> (Q, L, R, bias) are TrainableLR; every other tensor is frozen."""
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(False)
    for name, (q, L, R, bias) in factors.items():
        parent, _, child = name.rpartition(".")
        setattr(student.get_submodule(parent), child, TrainableLR(q, L, R, bias))
    return student


def block_loss(block: nn.Module, x: Tensor, y: Tensor, ctx: dict, batch: int) -> float:
    """The distillation loss of BLOCK on inputs X against targets Y, over all sequences (token-weighted)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            total += float(distill_loss(y[i : i + batch], block(xb, **ctx))) * xb.shape[0]
            n += xb.shape[0]
    return total / max(n, 1)


def train_block(
    student: nn.Module,
    inputs: list[Tensor],
    y: Tensor,
    ctx: dict,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
) -> list[float]:
    """AdamW on the block's L and R: per step one batch, one backward pass per input, then one optimizer step.

    Each entry of INPUTS (teacher's and/or student's hidden states, n×T×d) is fed for the same sequences; all are
    trained against the teacher's output Y on the teacher's input, so the student input teaches the block to undo
    the error of the blocks below it. The batch order is seeded, so a resumed run computes the same bytes.
    Returns the mean loss per step (summed over inputs).
    """
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        return []
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    n = y.shape[0]
    batch = min(batch, n)
    order: list[int] = []
    history: list[float] = []
    student.train()
    for _ in range(steps):
        if len(order) < batch:
            order = torch.randperm(n, generator=g).tolist()
        idx = torch.tensor(order[:batch], device=y.device)
        order = order[batch:]
        opt.zero_grad(set_to_none=True)
        target = y[idx].detach()
        step_loss = 0.0
        for x in inputs:
            loss = distill_loss(target, student(x[idx].detach(), **ctx))
            loss.backward()
            step_loss += float(loss.detach())
        opt.step()
        history.append(step_loss)
    student.eval()
    return history


def steps_for(epochs: float, sequences: int, batch: int) -> int:
    """Optimizer steps that visit every calibration sequence EPOCHS times."""
    return max(1, math.ceil(epochs * sequences / max(1, min(batch, sequences))))
