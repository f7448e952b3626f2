"""Size targets (--target-params, --target-bpw): one rank per linear, and the error curves that allocate them."""

from __future__ import annotations

import torch
from torch import nn

from lrdeploy.compressor import allocate as alloc
from lrdeploy.compressor import decompose as dec
from lrdeploy.compressor import grids, mix
from lrdeploy.compressor.arch import Arch
from lrdeploy.compressor.hcollect import collect_h, run_block
from lrdeploy.compressor.model import BlockContext, layer_prefix, materialize
from lrdeploy.compressor.options import CompressOptions, LinearPlan


def rank_step(o: CompressOptions) -> int:
    """Allocated ranks are multiples of this: quantized L has rows of length r that must hold whole 32-blocks."""
    return 8 if o.lr_format == "f16" else 32


def bytes_per_weight(fmt: str) -> float:
    return 2.0 if fmt == "f16" else mix.bits(fmt) / 8


def allocation_record(o: CompressOptions, plans: dict[str, LinearPlan], shapes: dict[str, tuple[int, int]],
                      model_params: int, curves: dict[str, torch.Tensor] | None) -> dict:
    """Ranks per linear for the size target, and what the target and the result are (for the manifest)."""
    step = rank_step(o)
    linear_params = sum(a * b for a, b in shapes.values())
    slots = []
    for name, (out, in_) in shapes.items():
        layer = int(name.split(".")[2])
        if o.target_params is not None:
            slots.append(alloc.Slot(name, layer, (out, in_), 0.0, float(out + in_), step))
        else:
            q = plans[name].q_format
            fixed = 0.0 if q is None else out * in_ * bytes_per_weight(q)
            slots.append(alloc.Slot(name, layer, (out, in_), fixed, (out + in_) * bytes_per_weight(o.lr_format),
                                    step))
    if o.target_params is not None:
        budget = model_params * (1 - o.target_params / 100) - (model_params - linear_params)
    else:
        budget = o.target_bpw * linear_params / 8
    ranks = alloc.allocate(slots, budget, o.allocation, curves)
    cost = alloc.total_cost(slots, ranks)
    rec: dict = {"mode": o.allocation, "model_params": model_params, "linear_params": linear_params,
                 "budget": budget, "cost": cost, "ranks": ranks}
    if o.target_params is not None:
        rec["target_params"] = o.target_params
        rec["param_reduction"] = 100 * (1 - (model_params - linear_params + cost) / model_params)
    else:
        rec["target_bpw"] = o.target_bpw
        rec["bpw"] = 8 * cost / linear_params
    if curves is not None:
        rec["predicted_error"] = sum(float(curves[k][r]) for k, r in ranks.items())
    return rec


def error_curves(model: nn.Module, arch: Arch, plans: dict[str, LinearPlan], o: CompressOptions,
                  x: torch.Tensor, ctxs: BlockContext, get, device: torch.device) -> dict[str, torch.Tensor]:
    """Relative H-error against rank for every linear, from one streaming pass of the teacher.

    The curve is the whitened spectrum of what L·R must fit: W for lowrank, W − LDLQ(W) for caldera (its first
    iteration). H comes from the teacher's hidden states whatever --inputs says: the student's don't exist yet.
    """
    curves: dict[str, torch.Tensor] = {}
    firsts = tuple(g[0] for g in arch.groups)
    for i in range(len(model.model.layers)):
        prefix = layer_prefix(i)
        block = materialize(model.model.layers[i], prefix, get, device)
        hs = collect_h(block, firsts, x, ctxs[i], o.batch_size)
        for group in arch.groups:
            fac = dec.hessian_factor(hs[group[0]], o.damp)
            for name in group:
                W = block.get_submodule(name).weight.detach().float()
                plan = plans[prefix + name]
                A = W if plan.q_format is None else W - dec.ldlq(W, fac, grids.get_grid(plan.q_format)).values
                sigma = torch.linalg.svdvals(A @ fac.S)
                curves[prefix + name] = alloc.error_curve(sigma, dec.h_error(W, fac.H)).cpu()
        x = run_block(block, x, ctxs[i], o.batch_size)
        block.to_empty(device="meta")  # free it: the main pass materializes it again
    return curves
