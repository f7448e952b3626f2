"""Each compress stage on one decoder block, timed on its own beside its arithmetic floor.

    python tools/bench_stages.py [--shapes qwen2.5-coder-1.5b,llama-2-7b] [--tokens 4096] [--threads 2]
                                 [--runs 1] [--json OUT.json] [--write]

One random-weight decoder block per shape (N(0, 0.02), as a fresh init: the stages' cost depends on the shapes, not
on the values): Qwen2.5-Coder-1.5B's (hidden 1536, ffn 8960, 12 heads, 2 KV heads, q/k/v biases) and
Llama-2-7B's (hidden 4096, ffn 11008, 32 heads, no GQA). Calibration inputs are random hidden states of the
block's width, TOKENS of them in sequences of 512. Every stage calls the compressor's own functions:

- forward: the block over every calibration sequence (what the teacher and student passes each cost);
- H collection: `staged_h` over the block, all four Grams (q/k/v, o, gate/up, down inputs);
- H factors: `hessian_factor` of the hidden-wide and the ffn-wide H;
- LDLQ q2_k / iq2_xs: `ldlq` of gate_proj (ffn × hidden) and down_proj (hidden × ffn); the error feedback must
  do out·in² FLOPs, and an i-quant's bounded codeword search 4·NEIGHBOURS more per weight;
- LPLR: rank 32, q4_0, 2 iterations (the default) on the same two linears;
- sensitivity: `mix.sensitivity`'s work for one block (its Grams, one forward, RTN on q2_k/q3_k/q4_k and one
  forward per linear) on its 2 sequences;
- distill step: one AdamW step of `train_block` on a batch of 4 sequences with L, R (rank 32) trainable.

The floor of a stage is the FLOPs it must do (counted below, per stage) over the machine's measured rate for a
plain torch matmul of that stage's dominant size, timed in the same run. time / floor near 1 means the stage runs
at the speed of the hardware; the 7B/1.5B columns say how time and FLOPs grow from one block to the other.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import update_section

from lrdeploy.compressor import decompose as dec
from lrdeploy.compressor import grids, lattice, mix
from lrdeploy.compressor.arch import get as arch_of
from lrdeploy.compressor.distill import train_block, trainable_block
from lrdeploy.compressor.hcollect import run_block, staged_h
from lrdeploy.compressor.model import BlockContext, rotary

SEQ = 512
RANK = 32


@dataclass(frozen=True)
class Shape:
    name: str
    model_type: str
    hidden: int
    ffn: int
    heads: int
    kv_heads: int


SHAPES = {
    "qwen2.5-coder-1.5b": Shape("Qwen2.5-Coder-1.5B", "qwen2", 1536, 8960, 12, 2),
    "llama-2-7b": Shape("Llama-2-7B", "llama", 4096, 11008, 32, 32),
}


def make_block(s: Shape) -> tuple[torch.nn.Module, BlockContext]:
    """One decoder block of shape S with N(0, 0.02) weights and unit norms, and the context a block needs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(s.model_type, hidden_size=s.hidden, intermediate_size=s.ffn,
                                  num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, num_hidden_layers=1,
                                  vocab_size=256, max_position_embeddings=SEQ)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.zeros(1, SEQ, s.hidden)
    return model, BlockContext(model, x, rotary(model, "cpu"))


def timed(fn, runs: int) -> float:
    """The fastest of RUNS calls of FN, in seconds (after one untimed call where RUNS > 1)."""
    if runs > 1:
        fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def matmul_rate(m: int, k: int, n: int) -> float:
    """FLOP/s of a plain (m×k)·(k×n) float32 matmul on this machine (best of 3), measured once per size."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    t = timed(lambda: a @ b, 3)
    return 2 * m * k * n / t


def linears(block: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


def forward_flops(block: torch.nn.Module, s: Shape, tokens: int) -> float:
    """2·tokens·(linear weights) plus causal attention: QKᵀ and PV over half the window on average."""
    weights = sum(m.weight.numel() for m in linears(block).values())
    head_dim = s.hidden // s.heads
    return 2 * tokens * weights + 2 * tokens * SEQ * s.heads * head_dim


def measure(key: str, tokens: int, runs: int) -> dict:
    s = SHAPES[key]
    model, ctxs = make_block(s)
    block = model.model.layers[0]
    ctx = ctxs[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens // SEQ, SEQ, s.hidden, generator=g)
    h, f = s.hidden, s.ffn
    gate, down = block.mlp.gate_proj.weight.detach().float(), block.mlp.down_proj.weight.detach().float()
    fwd = forward_flops(block, s, tokens)
    rate_fwd = matmul_rate(tokens, h, f)
    rows: list[dict] = []

    def row(stage: str, seconds: float, flops: float, rate: float, dominant: str) -> None:
        rows.append({"stage": stage, "seconds": seconds, "flops": flops, "rate": rate,
                     "floor": flops / rate, "ratio": seconds / (flops / rate), "dominant": dominant})

    t = timed(lambda: run_block(block, x, ctx, 8), runs)
    row("forward (teacher or student pass)", t, fwd, rate_fwd, f"{tokens}×{h} · {h}×{f}")

    hs: list[torch.Tensor] = []

    def collect() -> None:
        hs.clear()
        hs.extend(staged_h(block, x, ctx, 8))

    t = timed(collect, runs)
    grams = tokens * (3 * h * h + f * f)  # the symmetric half of XᵀX for each group's input (q/k/v, o, gate/up, down)
    down_flops = 2 * tokens * h * f  # staged_h stops at down_proj's input
    row("H collection (4 Grams + the forward up to down's input)", t, fwd - down_flops + grams, rate_fwd,
        f"{tokens}×{h} · {h}×{f}")

    H_h, H_f = hs[0], hs[3]
    for which, d, H in (("hidden", h, H_h), ("ffn", f, H_f)):
        t = timed(lambda H=H: dec.hessian_factor(H), runs)
        row(f"H factors, {which}-wide H", t, 4 * d**3 / 3, matmul_rate(d, d, d), f"{d}×{d} · {d}×{d}")
    fac_h, fac_f = dec.hessian_factor(H_h), dec.hessian_factor(H_f)
    for fmt in ("q2_k", "iq2_xs"):
        grid = grids.get_grid(fmt)
        search = 4 * lattice.NEIGHBOURS if grid.block_ldlq else 0  # scored codewords per weight
        for name, W, fac in (("gate_proj", gate, fac_h), ("down_proj", down, fac_f)):
            out, n = W.shape
            t = timed(lambda W=W, fac=fac, grid=grid: dec.ldlq(W, fac, grid), runs)
            row(f"LDLQ {fmt}, {name}", t, out * n * n + search * out * n, matmul_rate(out, n, n),
                f"{out}×{n} · {n}×{n}")
    for name, W, fac in (("gate_proj", gate, fac_h), ("down_proj", down, fac_f)):
        out, n = W.shape
        k = RANK + 32
        flops = 2 * out * n * n + 2 * (1 + 2 * 6) * 2 * out * n * k  # A·S, then the randomized SVD's passes
        t = timed(lambda W=W, fac=fac: dec.lplr(W, fac, RANK, "q4_0", 2), runs)
        row(f"LPLR rank {RANK} q4_0, {name}", t, flops, matmul_rate(out, n, n), f"{out}×{n} · {n}×{n}")

    sx = x[: mix.SEQUENCES]
    n_sens = sx.shape[0] * SEQ
    t = timed(lambda: _sensitivity_block(model, sx, ctx), runs)
    fwd_s = forward_flops(block, s, n_sens)
    sens_flops = fwd_s * (1 + len(linears(block))) + n_sens * (3 * h * h + f * f)
    row(f"sensitivity pass ({mix.SEQUENCES} sequences)", t, sens_flops, matmul_rate(n_sens, h, f),
        f"{n_sens}×{h} · {h}×{f}")

    factors = {}
    for name, m in linears(block).items():
        W = m.weight.detach().float()
        factors[name] = (W, torch.zeros(W.shape[0], RANK), torch.randn(RANK, W.shape[1], generator=g) * 0.01,
                         None if m.bias is None else m.bias.detach())
    student = trainable_block(block, factors)
    y = x[:4] + 0.01
    t = timed(lambda: train_block(student, [x[:4]], y, ctx, 1, 1e-4, 4, seed=0), runs)
    dist = 3 * forward_flops(block, s, 4 * SEQ)  # forward and backward (inputs' and weights' gradients)
    row("distill step (batch 4, rank 32)", t, dist, matmul_rate(4 * SEQ, h, f), f"{4 * SEQ}×{h} · {h}×{f}")
    return {"shape": key, "title": s.name, "tokens": tokens, "rows": rows}


def _sensitivity_block(model: torch.nn.Module, x: torch.Tensor, ctx: dict) -> None:
    """`mix.sensitivity` on a one-block model: it materializes a meta copy of the block from its parameters, as the
    real pass materializes each block from the source, and frees it after."""
    block = model.model.layers[0]
    params = {"model.layers.0." + n: p.detach() for n, p in block.named_parameters()}
    arch = arch_of(model.config)
    formats = {"model.layers.0." + n: "q2_k" for n in arch.linears}
    one = copy.deepcopy(model).to("meta")
    mix.sensitivity(one, arch, formats, x, [ctx], params.__getitem__, torch.device("cpu"), 8)


def report(results: list[dict], threads: int) -> str:
    import platform

    first, *rest = results
    lines = [
        "## Compress stages against their arithmetic floor (one decoder block)",
        "",
        f"`python tools/bench_stages.py --tokens {first['tokens']} --threads {threads}` on this machine "
        f"({platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}): one "
        "random-weight block of each shape, each stage through the compressor's own functions. Floor: the stage's "
        "FLOPs over this run's rate for a plain float32 torch matmul of its dominant size; × floor near 1 is the "
        "speed of the hardware.",
        "",
        "| stage | " + " | ".join(f"{r['title']} s | × floor" for r in results)
        + (" | 7B / 1.5B time | 7B / 1.5B FLOPs |" if rest else " |"),
        "|---|" + "---:|---:|" * len(results) + ("---:|---:|" if rest else ""),
    ]
    for i, r0 in enumerate(first["rows"]):
        cells = []
        for r in results:
            x = r["rows"][i]
            cells += [f"{x['seconds']:.2f}", f"{x['ratio']:.1f}"]
        stage = r0["stage"]
        grow = ""
        if rest:
            b = rest[-1]["rows"][i]
            grow = f" | {b['seconds'] / r0['seconds']:.2f} | {b['flops'] / r0['flops']:.2f}"
        lines.append(f"| {stage} | " + " | ".join(cells) + grow + " |")
    over = [f"{r['title']} {x['stage']} ({x['ratio']:.1f}×)" for r in results for x in r["rows"] if x["ratio"] > 3]
    faster = [f"{x['stage']} ({b['seconds'] / x['seconds']:.2f}× the time for {b['flops'] / x['flops']:.2f}× the FLOPs)"
              for x, b in zip(first["rows"], rest[-1]["rows"], strict=True)
              if b["seconds"] / x["seconds"] > 1.1 * b["flops"] / x["flops"]] if rest else []
    dims = "; ".join(f"{r['title']}: " + ", ".join(f"{x['stage']} {x['dominant']}" for x in r["rows"])
                     for r in results)
    lines += ["", "Stages above 3× their floor: " + ("; ".join(over) if over else "none") + ".", ""]
    if rest:
        lines += [f"Stages whose time grows more than 1.1× faster than their FLOPs from {first['title']} to "
                  f"{rest[-1]['title']}: " + ("; ".join(faster) if faster else "none") + ".", ""]
    lines += [f"Each floor's matmul (tokens = {first['tokens']:,}): {dims}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens (sequences of 512)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=1, help="best of RUNS timings per stage (after a warm-up if > 1)")
    p.add_argument("--json", default=None, help="also write the measurements here")
    p.add_argument("--write", action="store_true", help="rewrite docs/results.md's 'stages' section")
    a = p.parse_args()
    keys = [k for k in a.shapes.split(",") if k]
    bad = [k for k in keys if k not in SHAPES]
    if bad or a.tokens < SEQ or a.tokens % SEQ:
        p.error(f"unknown shape {bad[0]}" if bad else f"--tokens must be a positive multiple of {SEQ}")
    torch.set_num_threads(a.threads)
    results = []
    for k in keys:
        print(f"measuring {k} ...", file=sys.stderr, flush=True)
        results.append(measure(k, a.tokens, a.runs))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    text = report(results, a.threads)
    print(text)
    if a.write:
        update_section("stages", text)


if __name__ == "__main__":
    main()
