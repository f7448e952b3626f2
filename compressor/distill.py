"""Feature distillation of one decoder block (Lillama): train its low-rank factors against the teacher block.

The student is a copy of the teacher block in which every compressed linear computes Q·x + L·(R·x) with Q frozen
(or absent) and L, R float32 parameters; norms and everything else stay frozen. The loss compares the teacher
block's output y with the student's ŷ per token. Inputs and targets are detached, so no gradient leaves the block.
"""

from __future__ import annotations

import copy
import math
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrdeploy.compressor import decompose as dec
from lrdeploy.compressor import rotate

if TYPE_CHECKING:
    from lrdeploy.compressor.options import CompressOptions

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
        x = rotate.input_of(self, x)
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
        module = student.get_submodule(parent)
        setattr(module, child, rotate.carry(getattr(module, child), TrainableLR(q, L, R, bias)))
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


def distill_block(teacher: nn.Module, prefix: str, parts: dict[str, tuple[dec.Decomposition, torch.Tensor]],
                   tensors: dict[str, torch.Tensor], records: dict[str, dict], o: CompressOptions,
                   teacher_x: torch.Tensor, student_x: torch.Tensor | None, y: torch.Tensor, ctx: dict, dctx: dict,
                   steps: int, layer: int) -> dict:
    """Train the block's L and R against the teacher block, put them back on their grid, update TENSORS/RECORDS.

    The targets Y are the teacher block's outputs on the teacher's inputs. After training, L and R go back to
    lr_format the plain way (f16 cast, or RTN weighted by the diagonal of the H each one's error sees). The
    re-quantized block is kept only if its calibration loss (summed over the input modes) is lower than before
    training, so a short or too-hot run never makes a block worse than its initialization ("kept" says which).
    """
    t0 = time.perf_counter()
    modes = o.distill_modes()
    factors = {}
    for name, (d, _) in parts.items():
        bias = teacher.get_submodule(name).bias
        bias = None if bias is None else bias.detach()
        factors[name] = (None if d.Q is None else d.Q.values, d.LR.L.values, d.LR.R.values, bias)
    student = trainable_block(teacher, factors)
    inputs = {"teacher": teacher_x, "student": student_x}
    before = {m: block_loss(student, inputs[m], y, ctx, o.batch_size) for m in modes}
    history = train_block(student, [inputs[m] for m in modes], y, dctx, steps, o.distill_lr, o.distill_batch,
                              seed=o.seed * 1_000_003 + layer)
    trained_tensors: dict[str, torch.Tensor] = {}
    trained_records: dict[str, dict] = {}
    for name, (d, H) in parts.items():
        full = prefix + name
        m = student.get_submodule(name)
        m_teacher = teacher.get_submodule(name)
        W, bias = m_teacher.weight.detach(), None if m_teacher.bias is None else m_teacher.bias.detach()
        R = dec.quantize_factor(m.R.detach(), o.lr_format, torch.diagonal(H))
        L = dec.quantize_factor(m.L.detach(), o.lr_format, torch.diagonal(R.values @ H @ R.values.T))
        new = dec.Decomposition(d.Q, dec.LowRank(L, R), 0.0)
        new.error = dec.rel_error(new.values(tuple(W.shape), W.device), W, H)
        with torch.no_grad():
            m.L.copy_(L.values)
            m.R.copy_(R.values)
        part = dec.linear_tensors(full, new, bias)
        trained_tensors.update(part)
        trained_records[full] = {"error": new.error, "bytes": dec.linear_bytes(part, full)}
        records[full]["error_init"] = d.error
    after = {m: block_loss(student, inputs[m], y, ctx, o.batch_size) for m in modes}
    kept = sum(after.values()) < sum(before.values())
    if kept:
        tensors.update(trained_tensors)
        for full, rec in trained_records.items():
            records[full].update(rec)
    return {"layer": layer, "steps": steps, "kept": kept, "loss_before": before, "loss_after": after,
            "train_loss_first": history[0] if history else None, "train_loss_last": history[-1] if history else None,
            "seconds": round(time.perf_counter() - t0, 2)}
