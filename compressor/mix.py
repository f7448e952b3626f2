"""Q formats allocated from measured sensitivity (--mix-bpw): which linears move a grid up so the whole file fits.

llama-quantize's presets give more bits to attn_v and ffn_down by hand-written rules. Here the mix is measured:

1. **Sensitivity**, from one streaming pass of the teacher over a few calibration sequences. For each linear:
   - its own output error for every format of its ladder, e_f = tr(ΔW_f H ΔW_fᵀ), with ΔW_f the importance-weighted
     round-to-nearest error of format f and H the mean xxᵀ of its inputs (cheap: no forward);
   - its *gain*: how much of that error reaches the block's output. The block is run once with the linear rounded to
     its base format, and gain = mean ‖Δy‖² / e_base. A down_proj writes to the residual stream directly (gain ≈ 1);
     a q_proj's error passes through softmax, a gate_proj's through SwiGLU and down_proj.
   The predicted harm of format f is gain · e_f / mean ‖y‖²: the error it puts into the residual stream, relative to
   the stream at that depth (a pre-norm decoder reads the stream through RMSNorm, so relative error is what the
   layers above see).
2. **Allocation**, greedy across every linear of every block: start each at its planned format and repeatedly
   take the one step up its ladder with the most harm removed per byte, while the whole file stays within
   8 · bytes / weights ≤ --mix-bpw (bits per weight as llama-quantize counts a file: embedding, head, norms and L·R
   included).

The ladder is the K-quants: q2_k → q3_k → q4_k. A linear planned outside it (a fallback, or the preset's q4_k
k/v_proj at the top) keeps its format. The harms are first-order (errors of different linears add) and the
sensitivities come from round-to-nearest, while the run itself fills Q by LDLQ (+ L·R), which lowers every format's
error by a similar factor, so the order of the steps holds.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from lrdeploy.compressor import decompose as dec
from lrdeploy.compressor import grids
from lrdeploy.compressor.arch import Arch
from lrdeploy.compressor.hcollect import collect_h, run_block
from lrdeploy.compressor.model import BlockContext, layer_prefix, materialize
from lrdeploy.errors import LrdError

LADDER = ("q2_k", "q3_k", "q4_k")
SEQUENCES = 2  # calibration sequences the sensitivity pass runs on (1,024 tokens at the default length)


def bits(fmt: str) -> float:
    """Bits per weight of a grid format, scales included."""
    g = grids.get_grid(fmt)
    return 8 * g.type_size / g.super_block


def steps(fmt: str) -> tuple[str, ...]:
    """FMT and the formats above it on the ladder; just FMT when it is not on the ladder."""
    return LADDER[LADDER.index(fmt):] if fmt in LADDER else (fmt,)


def check(q_format: str | None) -> None:
    if q_format not in LADDER[:-1]:
        raise LrdError(f"--mix-bpw moves linears up the K-quant ladder {' -> '.join(LADDER)}, so --q-format must be "
                       f"{' or '.join(LADDER[:-1])}, not {q_format}")


def _swap_weight(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    old = module.weight.data
    module.weight.data = values.to(old.dtype)
    return old


def sensitivity(model: nn.Module, arch: Arch, formats: dict[str, str], x: torch.Tensor, ctxs: BlockContext, get,
                device: torch.device, batch: int, progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Per linear (full name): {"gain": ..., "harm": {format: predicted relative residual error}} for each format
    on its ladder from FORMATS[name] up (see the module docstring). X: the teacher's embedded calibration rows."""
    out: dict[str, dict] = {}
    firsts = tuple(g[0] for g in arch.groups)
    with torch.no_grad():
        for i in range(len(model.model.layers)):
            prefix = layer_prefix(i)
            block = materialize(model.model.layers[i], prefix, get, device)
            hs = collect_h(block, firsts, x, ctxs[i], batch)
            y = run_block(block, x, ctxs[i], batch)
            stream = float(y.double().pow(2).sum(-1).mean())
            for group in arch.groups:
                H = hs[group[0]]
                for name in group:
                    full = prefix + name
                    ladder = steps(formats[full])
                    if progress:  # one step per linear, as the main pass takes
                        progress(f"sensitivity: layer {i} {name}")
                    if len(ladder) == 1:
                        continue  # nothing to choose: its format is fixed
                    module = block.get_submodule(name)
                    W = module.weight.detach().float()
                    errors, base = {}, None
                    for fmt in ladder:
                        values, _ = grids.get_grid(fmt).quantize_rtn(W, torch.diagonal(H))
                        errors[fmt] = dec.h_error(values - W, H)
                        if base is None:
                            base = values
                    old = _swap_weight(module, base)
                    y_q = run_block(block, x, ctxs[i], batch)
                    module.weight.data = old
                    reach = float((y_q - y).double().pow(2).sum(-1).mean())
                    gain = reach / max(errors[ladder[0]], 1e-300)
                    out[full] = {"gain": gain, "harm": {f: gain * e / max(stream, 1e-300) for f, e in errors.items()}}
                    del base, y_q
            x = y
            block.to_empty(device="meta")  # free it: the main pass materializes it again
    return out


def allocate(formats: dict[str, str], shapes: dict[str, tuple[int, int]], sens: dict[str, dict],
             budget: float) -> dict[str, str]:
    """Formats for every linear whose Q bytes total at most BUDGET: greedy on harm removed per byte, from FORMATS.

    Each step is one move up a linear's ladder; a step that no longer fits is skipped, so a cheaper one elsewhere
    still may be taken.
    """
    chosen = dict(formats)
    cost = sum(q_bytes(shapes[k], f) for k, f in chosen.items())
    if cost > budget:  # the driver checks the whole file's size before any file is written; this is the bare math
        raise LrdError(f"the linears need {cost / 1e6:.1f} MB at their starting formats, over the budget of "
                       f"{budget / 1e6:.1f} MB")
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        ladder = steps(chosen[name])
        if len(ladder) > 1:
            here, up = ladder[0], ladder[1]
            harm = sens[name]["harm"]
            extra = q_bytes(shapes[name], up) - q_bytes(shapes[name], here)
            heapq.heappush(heap, (-(harm[here] - harm[up]) / extra, name))

    for name in chosen:
        if name in sens:
            push(name)
    while heap:
        _, name = heapq.heappop(heap)
        up = steps(chosen[name])[1]
        extra = q_bytes(shapes[name], up) - q_bytes(shapes[name], chosen[name])
        if cost + extra > budget:
            continue
        chosen[name] = up
        cost += extra
        push(name)
    return chosen


def q_bytes(shape: tuple[int, int], fmt: str) -> float:
    return shape[0] * shape[1] * bits(fmt) / 8


def record(mix_bpw: float, weights: int, fixed: float, chosen: dict[str, str], shapes: dict[str, tuple[int, int]],
           sens: dict[str, dict], start: dict[str, str], tokens: int) -> dict:
    """The manifest's `mix` section: the target, the predicted file, each moved linear and what it was measured at."""
    q = sum(q_bytes(shapes[k], f) for k, f in chosen.items())
    return {
        "mix_bpw": mix_bpw,
        "model_weights": weights,
        "sensitivity_tokens": tokens,
        "fixed_bytes": round(fixed),  # embedding, head, norms, biases and L·R: what the mix does not choose
        "predicted_bytes": round(fixed + q),
        "predicted_bpw": 8 * (fixed + q) / weights,
        "predicted_harm": sum(sens[k]["harm"][f] for k, f in chosen.items() if k in sens),
        "counts": dict(Counter(chosen.values())),
        "formats": chosen,
        "moved": sorted(k for k in chosen if chosen[k] != start[k]),
        "sensitivity": {k: {"gain": v["gain"], "harm": v["harm"]} for k, v in sens.items()},
    }
