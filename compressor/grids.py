"""Quantizer grids that are exactly ggml's block formats.

Every value this module produces is bit-identical to what llama.cpp (and gguf-py) computes when it dequantizes the
packed bytes, so a compressor that optimises against these values optimises what the runtime actually sees.

Conventions shared by all stages:

* A weight is ``value = scale * (code - zero) - offset`` with integer ``code`` in ``0..qmax``; ``scale``/``offset`` are
  float32 and equal the numbers ggml's dequantizer computes (e.g. q2_k ``scale = d * sc``, ``offset = dmin * m``).
* ``BlockFit.codes`` holds the integers that get packed for each block: for K-quants column 0 is the stored sub-scale
  (q3_k: the raw unsigned 6-bit value, i.e. signed scale + 32) and column 1 the stored sub-min (0 for q3_k); for
  q4_0/q8_0, which have no super level, column 0 is the IEEE fp16 bit pattern of the block's ``d`` (0..65535) and
  column 1 is 0.  ``sup`` (from :func:`fit_super`) holds the fp16-exact super-level ``d``/``dmin`` (zeros for
  q4_0/q8_0).
* Per-weight codes are ``torch.uint8`` (every ``qmax`` fits); convert before doing signed arithmetic on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import gguf
import torch
from torch import Tensor

from lrdeploy.compressor import lattice
from lrdeploy.compressor.format import Format
from lrdeploy.compressor.fp16 import bytes_half as _bytes_half
from lrdeploy.compressor.fp16 import fp16_bits as _fp16_bits
from lrdeploy.compressor.fp16 import fp16_neighbours as _fp16_neighbours
from lrdeploy.compressor.fp16 import half_bytes as _half_bytes
from lrdeploy.compressor.fp16 import round_fp16 as _fp16

__all__ = [
    "GRIDS",
    "BlockFit",
    "Rounder",
    "Grid",
    "block_index",
    "dequant",
    "fit_and_round",
    "fit_block",
    "fit_super",
    "get_grid",
    "pack",
    "parse_blocks",
    "round_codes",
    "super_index",
]


@dataclass(frozen=True)
class Grid(Format):
    """One K-quant or legacy ggml format (integer codes under a block scale and offset); fields mirror ggml's own
    constants. The family's per-format parts are its rows in GRIDS, _SEARCH and _LAYOUT (packer and parser)."""

    name: str
    block: int
    super_block: int
    type_size: int
    qmax: int
    zero: int
    ggml_type: gguf.GGMLQuantizationType
    scale_fields: tuple[int, ...]  # see Format
    nbits: tuple[int, int, bool] | None  # see Format

    @property
    def affine(self) -> bool:
        """Whether blocks carry a non-zero offset (a stored minimum)."""
        return self.zero == 0

    def fits(self, shape: tuple[int, ...] | torch.Size, per_row: bool = True) -> str | None:
        """Without PER_ROW a block may span rows (the flattened layout the artifact stores); the weight count must
        still fill whole super-blocks."""
        if len(shape) != 2:
            return f"expected a 2-D weight, got shape {tuple(shape)}"
        out, in_ = int(shape[0]), int(shape[1])
        if in_ % self.block:
            return f"row length {in_} is not a multiple of {self.block}"
        if per_row and in_ % self.super_block:
            return f"row length {in_} is not a multiple of {self.super_block}"
        if (out * in_) % self.super_block:
            return f"{out}x{in_} = {out * in_} weights is not a multiple of {self.super_block}"
        return None

    def quantize_rtn(self, W: Tensor, importance: Tensor | None = None, chunk: int = 1 << 18) -> tuple[Tensor, Tensor]:
        """In the flattened layout; `chunk` (weights per step) trades memory for speed."""
        return _quantize_rtn(self, W, importance, chunk)

    def unpack(self, raw: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """Our own dequantizer of ggml bytes (flattened layout)."""
        codes, scale, offset = parse_blocks(self, raw)
        return dequant(self, codes, scale, offset).reshape(shape)


_T = gguf.GGMLQuantizationType
GRIDS: dict[str, Format] = {
    # name: block, super-block, bytes, qmax, zero, type, fp16 scales' offsets, MatMulNBits (bits, shift, affine)
    "q2_k": Grid("q2_k", 16, 256, 84, 3, 0, _T.Q2_K, (80, 82), (4, 8, True)),
    "q3_k": Grid("q3_k", 16, 256, 110, 7, 4, _T.Q3_K, (108,), (4, 4, False)),
    "q4_k": Grid("q4_k", 32, 256, 144, 15, 0, _T.Q4_K, (0, 2), (4, 0, True)),
    "q4_0": Grid("q4_0", 32, 32, 18, 15, 8, _T.Q4_0, (0,), (4, 0, False)),
    "q8_0": Grid("q8_0", 32, 32, 34, 254, 127, _T.Q8_0, (0,), (8, 1, False)),
}
# llama.cpp's i-quants (codebooks and non-uniform levels) are the other family, in lattice.py
GRIDS.update(lattice.LATTICES)


@dataclass(frozen=True)
class _Search:
    """Per-format search settings (integer ranges of the sub-level and the candidates tried)."""

    sub_lo: int  # smallest stored-minus-bias sub-scale (q3_k scales are signed)
    sub_hi: int
    sub_bias: int  # stored sub-scale = integer scale + sub_bias
    min_hi: int  # largest stored sub-min (0: no offset)
    steps: tuple[float, ...]  # real-fit candidates (see _real_affine / _real_symmetric)
    ref: Callable[[Tensor], Tensor] | None = None  # ggml's reference d from the largest-magnitude weight, always tried


def _span(lo: float, hi: float, n: int) -> tuple[float, ...]:
    return tuple(lo + (hi - lo) * i / (n - 1) for i in range(n))


_SEARCH = MappingProxyType(
    {
        # affine: iscale = (qmax + step) / (max - min)
        "q2_k": _Search(0, 15, 0, 15, _span(-0.3, 0.3, 4)),
        "q4_k": _Search(0, 63, 0, 63, _span(-1.0, 1.0, 9)),
        # symmetric: the largest-magnitude weight is put at level `step` (negative: the wide side)
        "q3_k": _Search(-32, 31, 32, 0, _span(-4.6, -3.4, 4) + _span(2.6, 3.4, 3)),
        "q4_0": _Search(0, 0, 0, 0, _span(-8.8, -7.2, 9) + _span(6.6, 7.4, 5), lambda wmax: wmax / -8.0),
        # many nearby scales: with 255 levels the best is a lucky alignment, not a clipping trade-off
        "q8_0": _Search(0, 0, 0, 0, _span(-132.0, -122.0, 11), lambda wmax: wmax.abs() / 127.0),
    }
)

@dataclass(frozen=True)
class BlockFit:
    """Chosen quantizer of m blocks: float32 scale/offset exactly as ggml computes them, and what to pack."""

    scale: Tensor  # [m] float32
    offset: Tensor  # [m] float32
    codes: Tensor  # [m, 2] int32, see module docstring


@dataclass(frozen=True)
class _Real:
    """Unconstrained (float) per-block fit, the starting point of both the super and the block stage."""

    a: Tensor  # [m] scale per unit level
    o: Tensor  # [m] offset (>= 0), zeros for symmetric formats
    h_a: Tensor  # [m] curvature of the error w.r.t. a (sum x*q^2)
    h_o: Tensor  # [m] curvature w.r.t. o (sum x)
    s_q: Tensor  # [m] sum x*q of the chosen codes (affine), so the best offset for any scale s is (s*s_q - s_w)/h_o
    s_w: Tensor  # [m] sum x*w
    ref: Tensor  # [m] q4_0/q8_0: the reference quantizer's d (always tried), else unused


def get_grid(name: str) -> Format:
    """Look a format up by name, failing with the list of valid names."""
    grid = GRIDS.get(name.lower())
    if grid is None:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(GRIDS)}")
    return grid


def super_index(grid: Grid, out: int, in_: int, col: int, device: torch.device | str | None = None) -> Tensor:
    """Super-block (row of `sup`) of each output row for the block starting at column `col` (flattened layout)."""
    return torch.div(torch.arange(out, device=device) * in_ + col, grid.super_block, rounding_mode="floor")


def block_index(grid: Grid, out: int, in_: int, col: int, device: torch.device | str | None = None) -> Tensor:
    """Flat block number (row of pack's `block_codes`) of each output row for the block starting at column `col`."""
    return torch.div(torch.arange(out, device=device) * in_ + col, grid.block, rounding_mode="floor")


# ----------------------------------------------------------------------------------------------------------------------
# rounding and dequantization


def _levels(grid: Grid) -> tuple[int, int]:
    return -grid.zero, grid.qmax - grid.zero


class Rounder:
    """A grid's rounding under fixed scales and offsets that broadcast against the weights (per row [..., 1] for
    whole blocks, [m] for the LDLQ column loop's one column): what depends only on the scales is computed once, so
    each call costs a few elementwise ops. A zero scale maps to level 0 (division by inf)."""

    def __init__(self, grid: Grid, scale: Tensor, offset: Tensor):
        self.lo, self.hi = _levels(grid)
        self.scale, self.safe = scale, torch.where(scale == 0, math.inf, scale)
        self.offset = offset if grid.affine else None

    @classmethod
    def per_row(cls, grid: Grid, scale: Tensor, offset: Tensor) -> Rounder:
        """For blocks w [..., k] under one scale/offset [...] per row."""
        return cls(grid, scale.unsqueeze(-1), offset.unsqueeze(-1))

    def levels(self, w: Tensor) -> Tensor:
        """Float levels q = code - zero."""
        num = w if self.offset is None else w + self.offset
        return torch.round(num / self.safe).clamp_(self.lo, self.hi)

    def values(self, q: Tensor, out: Tensor | None = None) -> Tensor:
        """ggml's float32 operation order, (scale * q) - offset, for levels q (exact small integers in float32);
        written into OUT when given."""
        v = torch.mul(self.scale, q, out=out)
        return v if self.offset is None else v.sub_(self.offset)


def round_codes(grid: Grid, w: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """Nearest codes clamp(round((w + offset) / scale) + zero, 0, qmax) as uint8; scale == 0 gives code `zero`."""
    q = Rounder.per_row(grid, scale, offset).levels(w.to(torch.float32))
    return (q + grid.zero).to(torch.uint8)


def dequant(grid: Grid, codes: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """Values of codes[..., k] under per-row scale/offset[...], bit-identical to ggml/gguf-py."""
    q = codes.to(torch.int32)
    if grid.zero:
        q = q - grid.zero
    return Rounder.per_row(grid, scale, offset).values(q.to(torch.float32))


# ----------------------------------------------------------------------------------------------------------------------
# fitting


def _weights(importance: Tensor | None, w: Tensor) -> Tensor | None:
    if importance is None:
        return None
    return importance.to(device=w.device, dtype=torch.float32).expand_as(w)


def _real_affine(grid: Grid, w: Tensor, x: Tensor | None) -> _Real:
    """Weighted least-squares (a, o) for value = a*q - o, over a range of rounding scales (like make_qkx2_quants)."""
    qmax = float(grid.qmax)
    mn = w.amin(-1).clamp(max=0.0)
    rng = w.amax(-1) - mn
    ok = rng > 0
    inv_rng = torch.where(ok, 1.0 / torch.where(ok, rng, 1.0), 0.0).unsqueeze(-1)
    shifted = w - mn.unsqueeze(-1)
    xw = w if x is None else x * w
    sx = torch.full_like(mn, w.shape[-1]) if x is None else x.sum(-1)
    sw = xw.sum(-1)
    # fallback: min/max mapping, which is exact for constant blocks
    best_a = rng / qmax
    best_b = mn
    best_h = sx * qmax * qmax
    best_sq = sx * qmax
    # every rounding scale at once ([S, m, B]), then the first of the best as a strict-improvement scan keeps
    mult = torch.tensor([qmax + step for step in _SEARCH[grid.name].steps], dtype=torch.float32, device=w.device)
    q = torch.round(shifted * (inv_rng * mult.view(-1, 1, 1))).clamp_(0.0, qmax)
    xq = q if x is None else x * q
    sq = xq.sum(-1)
    sqq = (xq * q).sum(-1)
    sqw = (xq * w).sum(-1)
    det = sx * sqq - sq * sq
    good = det > 1e-6 * sx * sqq
    det = torch.where(good, det, 1.0)
    a = (sx * sqw - sq * sw) / det
    b = (sqq * sw - sq * sqw) / det
    pos = b > 0
    a = torch.where(pos, sqw / torch.where(sqq > 0, sqq, 1.0), a)
    b = torch.where(pos, 0.0, b)
    e = a * a * sqq + 2 * a * b * sq + b * b * sx - 2 * a * sqw - 2 * b * sw
    e, a, b, sqq, sq = lattice.first_best(e, good, a, b, sqq, sq)
    take = e < math.inf
    best_a = torch.where(take, a, best_a)
    best_b = torch.where(take, b, best_b)
    best_h = torch.where(take, sqq, best_h)
    best_sq = torch.where(take, sq, best_sq)
    zeros = torch.zeros_like(mn)
    return _Real(best_a.clamp(min=0.0), -best_b, best_h, sx, best_sq, sw, zeros)


def _real_symmetric(grid: Grid, w: Tensor, x: Tensor | None) -> _Real:
    """Weighted least-squares a for value = a*q, trying the largest weight at several (signed) levels."""
    lo, hi = _levels(grid)
    idx = w.abs().argmax(-1, keepdim=True)
    wmax = w.gather(-1, idx).squeeze(-1)
    zeros = torch.zeros_like(wmax)
    best = lattice.BestScale.start(wmax)
    spec = _SEARCH[grid.name]
    steps = torch.tensor(spec.steps, dtype=torch.float32, device=w.device)
    a = (wmax / steps.unsqueeze(-1)).unsqueeze(-1)  # every step at once: [S, m, 1]
    safe = torch.where(a == 0, math.inf, a)
    best.offer(w, torch.round(w / safe).clamp_(lo, hi), x)
    ref = zeros if spec.ref is None else spec.ref(wmax)  # ggml's quantize_row_q4_0_ref / quantize_row_q8_0_ref
    sx = torch.full_like(wmax, w.shape[-1]) if x is None else x.sum(-1)
    return _Real(best.a, zeros, best.h, sx, zeros, zeros, ref)


def _real_fit(grid: Grid, w: Tensor, x: Tensor | None) -> _Real:
    return _real_affine(grid, w, x) if grid.affine else _real_symmetric(grid, w, x)


_STEP_FACTORS = torch.tensor(_span(0.80, 1.04, 13), dtype=torch.float32)  # an ulp off lattice's linspace in places


def _pick_step(vals: Tensor, h: Tensor, lo: int, hi: int) -> Tensor:
    """fp16 super-level step d minimising sum h*(v - d*clamp(round(v/d)))^2 over the blocks of each super-block."""

    def values(v: Tensor, d: Tensor) -> Tensor:
        return d * torch.round(v / torch.where(d == 0, math.inf, d)).clamp_(lo, hi)

    return lattice.pick_step(vals, h, lo, hi, _STEP_FACTORS, values)


def _super_from_real(grid: Grid, real: _Real, n_super: int) -> Tensor:
    if not grid.has_super:
        return torch.zeros(n_super, 2, device=real.a.device, dtype=torch.float32)
    spec = _SEARCH[grid.name]
    n_sub = grid.super_block // grid.block
    d = _pick_step(real.a.view(n_super, n_sub), real.h_a.view(n_super, n_sub), spec.sub_lo, spec.sub_hi)
    if spec.min_hi:
        dmin = _pick_step(real.o.view(n_super, n_sub), real.h_o.view(n_super, n_sub), 0, spec.min_hi)
    else:
        dmin = torch.zeros_like(d)
    return torch.stack([d, dmin], -1)


def fit_super(grid: Grid, w: Tensor, importance: Tensor | None = None, chunk: int = 1 << 18) -> Tensor:
    """Per super-block fp16-exact [d, dmin] (float32) chosen so the 4/6-bit sub-scales can express each block's fit.

    Super-blocks are independent, so they are fitted CHUNK weights at a time: the fit's dozen same-size temporaries
    then stay small instead of each costing the whole matrix.
    """
    w = w.to(torch.float32)
    n_super = w.shape[0]
    if not grid.has_super:
        return torch.zeros(n_super, 2, device=w.device, dtype=torch.float32)
    step = max(1, chunk // w.shape[1])
    if n_super > step:
        per_row = importance is not None and importance.dim() == 2 and importance.shape[0] == n_super
        return torch.cat([fit_super(grid, w[i : i + step], importance[i : i + step] if per_row else importance, chunk)
                          for i in range(0, n_super, step)])
    wb = w.reshape(-1, grid.block)
    x = _weights(importance, w)
    real = _real_fit(grid, wb, None if x is None else x.reshape(-1, grid.block))
    return _super_from_real(grid, real, n_super)


def _error(grid: Grid, w: Tensor, x: Tensor | None, scale: Tensor, offset: Tensor,
           chunk: int = 1 << 23) -> Tensor:
    """Weighted squared error of rounding w [m, B] with (scale, offset) [..., m]; fused in-place, ranking-accurate.

    Leading dimensions of scale/offset evaluate several candidates at once ([C, m] -> [C, m] errors), a slice of
    blocks at a time so that the C·m·B temporary stays near CHUNK floats: 16 q2_k candidates over a whole
    8960×1536 matrix would otherwise hold 0.9 GB at once.
    """
    per = max(1, chunk // (w.shape[-1] * max(1, scale[..., :1].numel())))
    if w.shape[0] > per:
        return torch.cat([_error(grid, w[i : i + per], None if x is None else x[i : i + per],
                                 scale[..., i : i + per], offset[..., i : i + per], chunk)
                          for i in range(0, w.shape[0], per)], -1)
    lo, hi = _levels(grid)
    s = scale.unsqueeze(-1)
    num = w + offset.unsqueeze(-1) if grid.affine else w
    r = torch.div(num, torch.where(s == 0, math.inf, s)).round_().clamp_(lo, hi).mul_(s).sub_(num).square_()
    return (r if x is None else r.mul_(x)).sum(-1)


def _block_from_real(grid: Grid, w: Tensor, sup: Tensor, x: Tensor | None, real: _Real) -> BlockFit:
    """Exact search over the few integer sub-scales/mins (or fp16 d's) around the float fit; keeps the best."""
    zeros_i = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    if not grid.has_super:
        first = _fp16(real.a)
        cands = torch.stack([first, _fp16(real.ref), *_fp16_neighbours(first)])
        zeros = torch.zeros_like(real.a)
        best_d = cands.gather(0, _error(grid, w, x, cands, zeros).argmin(0, keepdim=True))[0]
        return BlockFit(best_d, zeros, torch.stack([_fp16_bits(best_d), zeros_i], -1))

    spec = _SEARCH[grid.name]
    d = _fp16(sup[:, 0].to(torch.float32))
    dmin = _fp16(sup[:, 1].to(torch.float32))
    base_k = torch.floor(real.a / torch.where(d == 0, math.inf, d))
    safe_m = torch.where(dmin == 0, math.inf, dmin)
    has_x = real.h_o > 0
    sx = torch.where(has_x, real.h_o, 1.0)
    ks, ms = [], []
    for dk in (-1, 0, 1, 2):
        k = (base_k + dk).clamp_(spec.sub_lo, spec.sub_hi)
        if spec.min_hi:
            # the best offset for this scale with the float fit's codes; the true optimum is often a step or so below
            o = torch.where(has_x, (d * k * real.s_q - real.s_w) / sx, real.o)
            base_m = torch.floor(o / safe_m)
            m_cands = [(base_m + dm).clamp_(0, spec.min_hi) for dm in (-1, 0, 1, 2)]
        else:
            m_cands = [torch.zeros_like(d)]
        ks += [k] * len(m_cands)
        ms += m_cands
    # every candidate at once ([C, m]): one pass of a few large ops instead of C passes of small ones
    k_all, m_all = torch.stack(ks), torch.stack(ms)
    e = _error(grid, w, x, d * k_all, dmin * m_all)
    pick = e.argmin(0, keepdim=True)  # the first of equal minima, as a strict-improvement scan would keep
    k_int, m_int = k_all.gather(0, pick)[0].to(torch.int32), m_all.gather(0, pick)[0].to(torch.int32)
    # recomputed from the integers exactly as ggml does (also normalises any -0.0)
    scale = d * k_int.to(torch.float32)
    offset = dmin * m_int.to(torch.float32)
    return BlockFit(scale, offset, torch.stack([k_int + spec.sub_bias, m_int], -1))


def fit_block(grid: Grid, w: Tensor, sup: Tensor | None, importance: Tensor | None = None) -> BlockFit:
    """Best (importance-weighted, after rounding) integer sub-scale/min of m independent blocks w[m, block].

    `sup[m, 2]` is each block's super-level d/dmin (ignored, may be None, for q4_0/q8_0, which pick an fp16 d here).
    """
    w = w.to(torch.float32)
    if sup is None:
        if grid.has_super:
            raise ValueError(f"{grid.name} blocks need their super-block's d/dmin (sup)")
        sup = torch.zeros(w.shape[0], 2, device=w.device, dtype=torch.float32)
    x = _weights(importance, w)
    real = _real_fit(grid, w, x)
    return _block_from_real(grid, w, sup.to(device=w.device, dtype=torch.float32), x, real)


def fit_and_round(
    grid: Grid, w_cols: Tensor, sup_rows: Tensor | None, importance: Tensor | None = None
) -> tuple[BlockFit, Tensor, Tensor]:
    """One LDLQ step's quantizer: fit each row's block, then its uint8 codes and exact float32 values."""
    fit = fit_block(grid, w_cols, sup_rows, importance)
    codes = round_codes(grid, w_cols, fit.scale, fit.offset)
    return fit, codes, dequant(grid, codes, fit.scale, fit.offset)


# ----------------------------------------------------------------------------------------------------------------------
# packing


def _pack_2bit(c: Tensor) -> Tensor:
    """[n, 256] 2-bit values -> [n, 64]: byte 32*h + l holds elements 128*h + 32*s + l at bit 2*s."""
    c = c.view(-1, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], device=c.device, dtype=torch.int32).view(1, 1, 4, 1)
    return (c << shifts).sum(2).reshape(-1, 64)


def _unpack_2bit(b: Tensor) -> Tensor:
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.int32).view(1, 1, 4, 1)
    return ((b.view(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


def _d_bytes(bc: Tensor) -> Tensor:
    """q4_0/q8_0: the block's fp16 d, whose bit pattern BlockFit.codes carries, as two little-endian bytes."""
    bits = bc[:, 0, 0]
    return torch.stack([bits & 0xFF, bits >> 8], -1)


def _super_bytes(sup: Tensor, i: int) -> Tensor:
    return _half_bytes(sup[:, i].to(torch.float32))


# Each packer takes codes [n, super_block], block codes [n, sub-blocks, 2] (int32) and sup [n, 2] (None for q4_0 and
# q8_0) and returns the block's fields in byte order; each parser takes the blocks' bytes [n, type_size] and returns
# (codes [n, super_block], sub-scales and sub-mins [n, sub-blocks], d and dmin [n]) with scale = d·sc, offset = dmin·m.


def _pack_q4_0(c: Tensor, bc: Tensor, sup: Tensor | None) -> list[Tensor]:
    return [_d_bytes(bc), c[:, :16] | (c[:, 16:] << 4)]


def _pack_q8_0(c: Tensor, bc: Tensor, sup: Tensor | None) -> list[Tensor]:
    return [_d_bytes(bc), (c - 127) & 0xFF]


def _pack_q2_k(c: Tensor, bc: Tensor, sup: Tensor) -> list[Tensor]:
    sc, mn = bc[..., 0], bc[..., 1]
    return [sc | (mn << 4), _pack_2bit(c), _super_bytes(sup, 0), _super_bytes(sup, 1)]


def _pack_q3_k(c: Tensor, bc: Tensor, sup: Tensor) -> list[Tensor]:
    n, sc = c.shape[0], bc[..., 0]
    hmask = ((c >> 2).view(n, 8, 32) << torch.arange(8, device=c.device, dtype=torch.int32).view(1, 8, 1)).sum(1)
    low = (sc[:, :8] & 0xF) | ((sc[:, 8:] & 0xF) << 4)
    high_shift = torch.tensor([0, 2, 4, 6], device=c.device, dtype=torch.int32).view(1, 4, 1)
    high = (((sc >> 4) & 3).view(n, 4, 4) << high_shift).sum(1)
    return [hmask, _pack_2bit(c & 3), low, high, _super_bytes(sup, 0)]


def _pack_q4_k(c: Tensor, bc: Tensor, sup: Tensor) -> list[Tensor]:
    n, sc, mn = c.shape[0], bc[..., 0], bc[..., 1]
    s_lo = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    m_lo = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    both = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    nib = c.view(n, 4, 2, 32)
    qs = (nib[:, :, 0] | (nib[:, :, 1] << 4)).reshape(n, 128)
    return [_super_bytes(sup, 0), _super_bytes(sup, 1), s_lo, m_lo, both, qs]


_Parsed = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _no_sub(b: Tensor, bi: Tensor, codes: Tensor) -> _Parsed:
    """q4_0/q8_0: one scale per block, d itself (sub-scale 1, no minimum)."""
    one = torch.ones(b.shape[0], 1, dtype=torch.int32, device=b.device)
    return codes, one, torch.zeros_like(one), _bytes_half(b[:, :2]), torch.zeros(b.shape[0], device=b.device)


def _parse_q4_0(b: Tensor, bi: Tensor) -> _Parsed:
    return _no_sub(b, bi, torch.cat([bi[:, 2:] & 15, bi[:, 2:] >> 4], -1))


def _parse_q8_0(b: Tensor, bi: Tensor) -> _Parsed:
    return _no_sub(b, bi, ((bi[:, 2:] + 128) & 0xFF) - 1)  # int8 x -> x + 127; ggml's -128 becomes -1 (as int32)


def _parse_q2_k(b: Tensor, bi: Tensor) -> _Parsed:
    d, dmin = _bytes_half(b[:, 80:82]), _bytes_half(b[:, 82:84])
    return _unpack_2bit(bi[:, 16:80]), bi[:, :16] & 15, bi[:, :16] >> 4, d, dmin


def _parse_q3_k(b: Tensor, bi: Tensor) -> _Parsed:
    n = b.shape[0]
    hbits = (bi[:, :32].view(n, 1, 32) >> torch.arange(8, device=b.device, dtype=torch.int32).view(1, 8, 1)) & 1
    codes = _unpack_2bit(bi[:, 32:96]) | (hbits.reshape(n, 256) << 2)
    low = torch.cat([bi[:, 96:104] & 15, bi[:, 96:104] >> 4], -1)
    high_shift = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.int32).view(1, 4, 1)
    high = ((bi[:, 104:108].view(n, 1, 4) >> high_shift) & 3).reshape(n, 16)
    sc = (low | (high << 4)) - 32
    return codes, sc, torch.zeros_like(sc), _bytes_half(b[:, 108:110]), torch.zeros(n, device=b.device)


def _parse_q4_k(b: Tensor, bi: Tensor) -> _Parsed:
    n = b.shape[0]
    s, m, md = bi[:, 4:8], bi[:, 8:12], bi[:, 12:16]
    sc = torch.cat([s & 63, (md & 15) | ((s >> 2) & 48)], -1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], -1)
    nib_shift = torch.tensor([0, 4], device=b.device, dtype=torch.int32).view(1, 1, 2, 1)
    nib = bi[:, 16:144].view(n, 4, 1, 32) >> nib_shift
    return (nib & 15).reshape(n, 256), sc, mn, _bytes_half(b[:, 0:2]), _bytes_half(b[:, 2:4])


_LAYOUT = {
    "q2_k": (_pack_q2_k, _parse_q2_k),
    "q3_k": (_pack_q3_k, _parse_q3_k),
    "q4_k": (_pack_q4_k, _parse_q4_k),
    "q4_0": (_pack_q4_0, _parse_q4_0),
    "q8_0": (_pack_q8_0, _parse_q8_0),
}


def pack(grid: Grid, codes: Tensor, block_codes: Tensor, sup: Tensor | None, chunk: int = 1 << 20) -> Tensor:
    """ggml's exact bytes (1-D uint8, n_super*type_size) for codes[n_super, super_block] in flattened block order.

    Packed CHUNK weights at a time: the int32 working copies of a whole 8960×1536 matrix would cost 0.4 GB.
    """
    n = codes.shape[0]
    step = max(1, chunk // grid.super_block)
    if n > step:
        bcs = block_codes.reshape(n, -1, 2)
        return torch.cat([pack(grid, codes[i : i + step], bcs[i : i + step], None if sup is None else sup[i : i + step],
                               chunk) for i in range(0, n, step)])
    c = codes.to(torch.int32).reshape(n, grid.super_block)
    bc = block_codes.to(torch.int32).reshape(n, grid.super_block // grid.block, 2)
    assert sup is not None or not grid.has_super, "K-quants need the super-level d/dmin"
    parts = _LAYOUT[grid.name][0](c, bc, sup)
    return torch.cat([p.to(torch.uint8) for p in parts], -1).reshape(-1)


def parse_blocks(grid: Grid, raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Packed bytes -> (codes [n_blocks, block] int32, scale [n_blocks], offset [n_blocks]) as ggml computes them."""
    b = raw.to(torch.uint8).reshape(-1, grid.type_size)
    n = b.shape[0]
    codes, sc, mn, d, dmin = _LAYOUT[grid.name][1](b, b.to(torch.int32))
    n_sub = grid.super_block // grid.block
    scale = (d.unsqueeze(-1) * sc.to(torch.float32)).reshape(-1)
    offset = (dmin.unsqueeze(-1) * mn.to(torch.float32)).reshape(-1)
    return codes.reshape(n * n_sub, grid.block), scale, offset


# ----------------------------------------------------------------------------------------------------------------------
# round-to-nearest baseline


def _quantize_rtn(grid: Grid, W: Tensor, importance: Tensor | None, chunk: int) -> tuple[Tensor, Tensor]:
    """Grid.quantize_rtn: round-to-nearest quantization of W[out, in] (flattened layout)."""
    reason = grid.fits(W.shape, per_row=False)
    if reason is not None:
        raise ValueError(f"{grid.name}: {reason}")
    out, in_ = W.shape
    flat = W.detach().to(torch.float32).reshape(-1, grid.super_block)
    x_flat = None
    if importance is not None:
        imp = importance.detach().to(device=W.device, dtype=torch.float32)
        x_flat = imp.expand(out, in_).reshape(-1, grid.super_block)
    step = max(1, chunk // grid.super_block)
    values, raws = [], []
    for start in range(0, flat.shape[0], step):
        w = flat[start : start + step]
        n = w.shape[0]
        wb = w.reshape(-1, grid.block)
        xb = None if x_flat is None else x_flat[start : start + step].reshape(-1, grid.block)
        real = _real_fit(grid, wb, xb)
        sup = _super_from_real(grid, real, n)
        sup_b = sup.repeat_interleave(grid.super_block // grid.block, 0)
        fit = _block_from_real(grid, wb, sup_b, xb, real)
        codes = round_codes(grid, wb, fit.scale, fit.offset)
        values.append(dequant(grid, codes, fit.scale, fit.offset).reshape(-1))
        raws.append(pack(grid, codes.reshape(n, grid.super_block), fit.codes, sup))
    return torch.cat(values).reshape(out, in_), torch.cat(raws)
