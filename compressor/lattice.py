"""llama.cpp's i-quants as grids lrdeploy can fill: iq2_xxs, iq2_xs, iq2_s, iq3_xxs, iq3_s (codebooks), iq4_nl, iq4_xs.

A 256-weight super-block stores one fp16 ``d``; each sub-block of ``block`` weights stores a small integer ``s`` and
scales by ``a = d * (c0 + c1 * s)``, exactly the float32 product ggml computes. Within a sub-block:

* codebook grids: every ``vec`` consecutive weights are one codeword: ``value = a * sign * C[k]``, ``C`` a table of
  non-negative ``vec``-vectors (256 to 1024 rows) that gguf-py carries, plus one sign bit per weight. iq2_xxs,
  iq2_xs and iq3_xxs store 7 of every 8 sign bits; the eighth makes the count of minus signs even;
* iq4_nl / iq4_xs: one of 16 fixed non-uniform levels per weight, ``value = a * kvalues[code]``.

Every product is exact in float32 (at most 24 significant bits), so ``a * level`` here, gguf-py's dequantizer and
ggml's kernels all give the same bits.

Rounding to a codebook is a nearest-codeword search, weighted per weight. It is bounded by the grid's structure:
the target is first rounded coordinate by coordinate to the grid's few levels (3 for iq2, 8 for iq3), and only
the ``NEIGHBOURS`` codewords nearest that lattice point are scored; `search_all` scores every codeword and is the
reference the tests hold the bounded search to.

The i-quants are filled by QuIP#'s block LDLQ (decompose.block_ldlq, from the parts here): a group of ``group``
columns is rounded at once (one or two codewords per row), and its error goes forward through the block of
chol(H⁻¹), E = Δ·U_GG⁻¹, W_rest -= E·U_G,rest. iq4_nl and iq4_xs have scalar levels and take group 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import gguf
import gguf.quants as gq
import torch
from torch import Tensor

from lrdeploy.compressor import fp16
from lrdeploy.compressor.format import Format

NEIGHBOURS = 32  # codewords scored per target: the nearest to its per-coordinate rounding
_CHUNK = 1 << 15  # codewords searched per step of the whole-matrix passes (bounds memory at ~32 MB)
_SCORE_ROWS = 2048  # targets scored per step of a codebook search: 2 MB per [rows, 32, 8] temporary
_FIT_STEPS = (0.8, 0.9, 1.0, 1.1, 1.25)  # the largest weight of a sub-block is tried at these fractions of the top


@dataclass(frozen=True)
class Lattice(Format):
    """One i-quant format: sizes as ggml declares them, and how a sub-block's scale and values are formed. The
    family's per-format parts are its rows in LATTICES and _LAYOUT (packer and parser) and its gguf-py table."""

    name: str
    block: int  # weights sharing one sub-scale
    super_block: int  # weights sharing one fp16 d (iq4_nl: 32, its d is per block)
    type_size: int
    ggml_type: gguf.GGMLQuantizationType
    vec: int  # weights per codeword (1: scalar levels)
    signs: str  # "parity": 7 stored bits per 8 weights, even count of minus; "free": 8 bits; "none": signed levels
    s_lo: int  # stored sub-scale range
    s_hi: int
    c0: float  # sub-scale a = d * (c0 + c1 * s)
    c1: float
    table: str  # the gguf.quants class whose grid (or kvalues) this uses

    block_ldlq: ClassVar[bool] = True

    @property
    def scale_fields(self) -> tuple[int, ...]:
        return (0,)  # every i-quant block opens with its fp16 d

    @property
    def nbits(self) -> None:
        return None

    def fits(self, shape: tuple[int, ...] | torch.Size, per_row: bool = True) -> str | None:
        """i-quant blocks never span rows (ggml's row layout only), whatever PER_ROW asks."""
        if len(shape) != 2:
            return f"expected a 2-D weight, got shape {tuple(shape)}"
        if int(shape[1]) % self.super_block:
            return f"row length {int(shape[1])} is not a multiple of {self.super_block}"
        return None

    def quantize_rtn(self, W: Tensor, importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """No error feedback; IMPORTANCE is per input column ([in])."""
        return _quantize_rtn(self, W, importance)

    def unpack(self, raw: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
        return values(self, parse(self, raw, shape))

    @property
    def group(self) -> int:
        """Columns block LDLQ rounds at once: a sign-parity unit of 8 weights, or one column for scalar levels."""
        return 1 if self.signs == "none" else 8



_T = gguf.GGMLQuantizationType
LATTICES: dict[str, Lattice] = {
    "iq2_xxs": Lattice("iq2_xxs", 32, 256, 66, _T.IQ2_XXS, 8, "parity", 0, 15, 0.125, 0.25, "IQ2_XXS"),
    "iq2_xs": Lattice("iq2_xs", 16, 256, 74, _T.IQ2_XS, 8, "parity", 0, 15, 0.125, 0.25, "IQ2_XS"),
    "iq2_s": Lattice("iq2_s", 16, 256, 82, _T.IQ2_S, 8, "free", 0, 15, 0.125, 0.25, "IQ2_S"),
    "iq3_xxs": Lattice("iq3_xxs", 32, 256, 98, _T.IQ3_XXS, 4, "parity", 0, 15, 0.25, 0.5, "IQ3_XXS"),
    "iq3_s": Lattice("iq3_s", 32, 256, 110, _T.IQ3_S, 4, "free", 0, 15, 1.0, 2.0, "IQ3_S"),
    "iq4_nl": Lattice("iq4_nl", 32, 32, 18, _T.IQ4_NL, 1, "none", 0, 0, 0.0, 0.0, "IQ4_NL"),
    "iq4_xs": Lattice("iq4_xs", 32, 256, 136, _T.IQ4_XS, 1, "none", 0, 63, -32.0, 1.0, "IQ4_NL"),
}


@dataclass(frozen=True)
class _Book:
    """A grid's table: codewords C [K, vec] (or the 16 signed levels as [16, 1]), its per-coordinate levels, and
    for each lattice point (levels^vec of them) the NEIGHBOURS nearest codewords."""

    C: Tensor
    levels: Tensor
    near: Tensor | None


@functools.cache
def _book(name: str) -> _Book:
    grid = LATTICES[name]
    cls = getattr(gq, grid.table)
    if grid.signs == "none":
        kv = torch.tensor(cls.kvalues, dtype=torch.float32)
        return _Book(kv.view(-1, 1), kv, None)
    cls.init_grid()
    C = torch.from_numpy(cls.grid.reshape(-1, grid.vec).copy()).to(torch.float32)
    levels = torch.unique(C)
    n = levels.numel()
    # every lattice point as its level values, then its nearest codewords by Euclidean distance
    digits = torch.arange(n ** grid.vec).unsqueeze(-1) // (n ** torch.arange(grid.vec)) % n
    pts = levels[digits]
    dist = torch.cdist(pts, C)
    near = dist.topk(min(NEIGHBOURS, C.shape[0]), largest=False).indices
    return _Book(C, levels, near)


# ----------------------------------------------------------------------------------------------------------------------
# rounding: the nearest signed level vector of a group of weights under per-row scales


@dataclass(frozen=True)
class Rounded:
    """Weights [N, G] on the grid: codeword (or level) indices, minus-sign bits, and the signed levels q, so that the
    values are exactly ``a[:, None] * q``."""

    idx: Tensor  # [N, G // vec] int64
    neg: Tensor  # [N, G] bool (all False for signed-level grids)
    q: Tensor  # [N, G] float32


def _scores(t: Tensor, x: Tensor, Cc: Tensor, parity: Tensor | None) -> Tensor:
    """Weighted squared distance of targets t [R, vec] to candidate codewords Cc [R, M, vec], less the constant
    sum x·t²; where `parity` [R, 1] is set, plus the cheapest single sign flip, (t + c)² - (t - c)² = 4tc ([R, M])."""
    xtc = Cc * (x * t).unsqueeze(1)
    err = torch.einsum("rmv,rv->rm", Cc.square(), x) - 2 * xtc.sum(-1)
    if parity is not None:
        err += torch.where(parity, 4 * xtc.amin(-1), 0.0)
    return err


def _round_codebook(grid: Lattice, w: Tensor, a: Tensor, x: Tensor, everything: bool) -> Rounded:
    book = _book(grid.name)
    N, G = w.shape
    v = grid.vec
    safe = torch.where(a == 0, math.inf, a).unsqueeze(-1)
    t = (w.abs() / safe).reshape(-1, v)
    xv = x.reshape(-1, v)
    neg = w < 0
    if everything:
        cand = torch.arange(book.C.shape[0]).expand(t.shape[0], -1)
    else:
        mids = (book.levels[1:] + book.levels[:-1]) / 2
        digit = torch.bucketize(t, mids)
        point = (digit * (book.levels.numel() ** torch.arange(v))).sum(-1)
        cand = book.near[point]
    odd = (neg.reshape(-1, v).sum(-1) % 2 == 1).unsqueeze(-1) if grid.signs == "parity" and v == 8 else None
    pick = torch.empty(t.shape[0], dtype=torch.int64, device=t.device)
    for i in range(0, t.shape[0], _SCORE_ROWS):  # slices: the [rows, 32, vec] temporaries stay in cache
        s = slice(i, i + _SCORE_ROWS)
        err = _scores(t[s], xv[s], book.C[cand[s]], None if odd is None else odd[s])
        pick[s] = cand[s].gather(-1, err.argmin(-1, keepdim=True)).squeeze(-1)
    mag = book.C[pick].reshape(N, G)
    if grid.signs == "parity":
        # the unit of parity is 8 weights (one iq2 codeword, two iq3 codewords): flip the cheapest sign where odd
        units = neg.reshape(-1, 8)
        cost = (x * (w.abs() / safe) * mag).reshape(-1, 8)
        odd = units.sum(-1) % 2 == 1
        flip = torch.zeros_like(units).scatter_(-1, cost.argmin(-1, keepdim=True), True) & odd.unsqueeze(-1)
        neg = (units ^ flip).reshape(N, G)
    q = torch.where(neg, -mag, mag)
    return Rounded(pick.reshape(N, G // v), neg, q)


def _round_levels(w: Tensor, a: Tensor) -> Rounded:
    """iq4: the nearest of the 16 signed levels to w / a (a may be negative, putting -127 on the positive side)."""
    kv = _book("iq4_nl").levels
    mids = (kv[1:] + kv[:-1]) / 2
    safe = torch.where(a == 0, math.inf, a).unsqueeze(-1)
    idx = torch.bucketize(w / safe, mids)
    return Rounded(idx, torch.zeros_like(w, dtype=torch.bool), kv[idx])


def round_group(grid: Lattice, w: Tensor, a: Tensor, x: Tensor | None = None) -> Rounded:
    """Round w [N, G] (G a multiple of the parity unit) with per-row scales a [N], each squared error weighted by x."""
    w = w.to(torch.float32)
    if grid.signs == "none":
        return _round_levels(w, a)
    x = torch.ones_like(w) if x is None else x.to(torch.float32).expand_as(w)
    return _round_codebook(grid, w, a, x, everything=False)


def search_all(grid: Lattice, w: Tensor, a: Tensor, x: Tensor | None = None) -> Rounded:
    """`round_group` scoring every codeword: the exact nearest, the reference for the bounded search."""
    w = w.to(torch.float32)
    x = torch.ones_like(w) if x is None else x.to(torch.float32).expand_as(w)
    return _round_codebook(grid, w, a, x, everything=True)


def _sq_error(w: Tensor, a: Tensor, r: Rounded, x: Tensor | None) -> Tensor:
    d = (a.unsqueeze(-1) * r.q - w).square()
    return (d if x is None else d * x).sum(-1)


# ----------------------------------------------------------------------------------------------------------------------
# scales: a float fit per sub-block, the fp16 super-level d, then the stored integers


def first_best(e: Tensor, valid: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
    """The first least error of candidates e [C, ...] along dim 0, counting only where VALID and e is finite (NaN
    and inf never win, as a strict-improvement scan `e < best` would not take them), and VALUES at it: (e, *values),
    each [...]. A position with no valid candidate gets e = inf."""
    e = torch.where(valid & (e < math.inf), e, math.inf)
    pick = e.argmin(0, keepdim=True)
    return tuple(t.gather(0, pick)[0] for t in (e, *values))


@dataclass
class BestScale:
    """The best least-squares scale so far of m blocks w [m, B] over candidate roundings q [m, B] (value = a·q):
    its scale a, its error e less the constant sum x·w², and its curvature h = sum x·q²."""

    a: Tensor
    e: Tensor
    h: Tensor

    @classmethod
    def start(cls, like: Tensor) -> BestScale:
        """a = 0, whose error is sum x·w², i.e. 0 relative to it."""
        return cls(torch.zeros_like(like), torch.zeros_like(like), torch.zeros_like(like))

    def offer(self, w: Tensor, q: Tensor, x: Tensor | None) -> None:
        """Take the best of candidate roundings q ([m, B], or [C, m, B] for C at once) where it beats the best so
        far; of equal errors the first offered stays, as one offer per candidate in turn would keep."""
        xq = q if x is None else x * q
        sqq = (xq * q).sum(-1)
        sqw = (xq * w).sum(-1)
        has = sqq > 0
        a = torch.where(has, sqw / torch.where(has, sqq, 1.0), 0.0)
        e = -a * sqw
        if e.dim() > self.e.dim():
            e, a, sqq, has = first_best(e, has, a, sqq, has)
        take = has & (e < self.e)
        self.e = torch.where(take, e, self.e)
        self.a = torch.where(take, a, self.a)
        self.h = torch.where(take, sqq, self.h)


def _proxy_levels(grid: Lattice) -> Tensor:
    """Signed levels each weight could take alone; the scale fit rounds to these, not to whole codewords."""
    lv = _book(grid.name).levels
    return lv if grid.signs == "none" else torch.cat([-lv.flip(0), lv])


def _float_scales(grid: Lattice, w: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares sub-scale a [m] of blocks w [m, B] (weighted by x) and its curvature sum x·q², trying the largest
    weight at several fractions of the top level. Weights are rounded coordinate by coordinate."""
    lv = _proxy_levels(grid)
    mids = (lv[1:] + lv[:-1]) / 2
    wmax = w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1)
    tops = [float(lv[-1])] if grid.signs != "none" else [float(lv[0]), float(lv[-1])]
    best = BestScale.start(wmax)
    for top in tops:
        for f in _FIT_STEPS:
            a = wmax.abs() / (top * f) if grid.signs != "none" else wmax / (top * f)
            safe = torch.where(a == 0, math.inf, a).unsqueeze(-1)
            best.offer(w, lv[torch.bucketize(w / safe, mids)], x)
    return best.a, best.h


def _stored(grid: Lattice, a: Tensor, d: Tensor) -> Tensor:
    """Nearest stored sub-scale integer for float scales a under super-level d (broadcast)."""
    safe = torch.where(d == 0, math.inf, d)
    return torch.round((a / safe - grid.c0) / grid.c1).clamp_(grid.s_lo, grid.s_hi)


def _scale(grid: Lattice, d: Tensor, s: Tensor) -> Tensor:
    """a = d * (c0 + c1 * s): ggml's float32 product (exact: d has 11 significant bits, the factor at most 6)."""
    return d * (grid.c0 + grid.c1 * s.to(torch.float32))


def pick_step(a: Tensor, h: Tensor, lo: float, hi: float, factors: Tensor,
              values: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """The fp16 super-block step d of each row of a [n, m] (the m sub-block scales or mins of one super-block) that
    minimises sum h·(a − values(a, d))²: the candidates are FACTORS times the least d that reaches a's extremes
    with stored levels in [lo, hi], and values(a [n, 1, m], d [n, F, 1]) gives what the sub-blocks store at each
    candidate, as [n, F, m]. The K-quants (integer levels) and the i-quants (c0 + c1·s) share it."""
    top = a.clamp(min=0).amax(-1) / hi
    if lo < 0:
        top = torch.maximum(top, (-a).clamp(min=0).amax(-1) / -lo)
    cand = fp16.round_fp16(top.unsqueeze(-1) * factors.to(a.device))  # [n, F]
    err = (h.unsqueeze(-2) * (a.unsqueeze(-2) - values(a.unsqueeze(-2), cand.unsqueeze(-1))) ** 2).sum(-1)
    return cand.gather(-1, err.argmin(-1, keepdim=True)).squeeze(-1)


_D_FACTORS = torch.linspace(0.8, 1.04, 13)


def _pick_d(grid: Lattice, a: Tensor, h: Tensor) -> Tensor:
    """fp16 d per super-block (rows of a [n, n_sub]) minimising sum h·(a - scale(d, s(a)))²."""
    return pick_step(a, h, grid.c0 + grid.c1 * grid.s_lo, grid.c0 + grid.c1 * grid.s_hi, _D_FACTORS,
                     lambda a, d: _scale(grid, d, _stored(grid, a, d)))


@dataclass(frozen=True)
class Scales:
    """The fitted scale structure of a matrix [out, in]: fp16 d per super-block and a reference sub-scale."""

    d: Tensor  # [out, in // super_block] float32, fp16-exact (iq4_nl: the block's own d)
    s: Tensor  # [out, in // block] float32 integers (iq4_nl: zeros)


def fit_scales(grid: Lattice, W: Tensor, importance: Tensor | None = None) -> Scales:
    """Float sub-scales from the weights, then each super-block's d and the nearest stored sub-scales."""
    out, n = W.shape
    w = W.to(torch.float32).reshape(-1, grid.block)
    x = torch.ones_like(w) if importance is None else importance.to(torch.float32).expand(out, n).reshape(w.shape)
    a, h = [], []
    for i in range(0, w.shape[0], _CHUNK):
        ai, hi = _float_scales(grid, w[i : i + _CHUNK], x[i : i + _CHUNK])
        a.append(ai)
        h.append(hi)
    a_all, h_all = torch.cat(a), torch.cat(h)
    if not grid.has_super:
        return Scales(fp16.round_fp16(a_all).reshape(out, -1), torch.zeros(out, n // grid.block))
    n_sub = grid.super_block // grid.block
    d = _pick_d(grid, a_all.view(-1, n_sub), h_all.view(-1, n_sub))
    s = _stored(grid, a_all.view(-1, n_sub), d.unsqueeze(-1))
    return Scales(d.reshape(out, -1), s.reshape(out, -1))


def _candidates(grid: Lattice, d: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Scales to try for sub-blocks with super-level d [N] and reference s [N]: s-1, s, s+1 (iq4_nl: its fp16 d and
    the two fp16 neighbours). Returns (scales [3, N], stored integers [3, N])."""
    if not grid.has_super:
        ds = torch.stack([d, *fp16.fp16_neighbours(d)])
        return ds, torch.zeros_like(ds)
    ss = torch.stack([(s + k).clamp(grid.s_lo, grid.s_hi) for k in (-1, 0, 1)])
    return _scale(grid, d.expand_as(ss), ss), ss


def choose_scale(grid: Lattice, w: Tensor, d: Tensor, s: Tensor, x: Tensor | None) -> tuple[Tensor, Tensor]:
    """The best of the candidate scales for sub-blocks w [N, B], by their weighted error after rounding: (a, s)."""
    scales, ints = _candidates(grid, d, s)
    C = scales.shape[0]
    wc = w.repeat(C, 1)
    xc = None if x is None else x.expand_as(w).repeat(C, 1)
    r = round_group(grid, wc, scales.reshape(-1), xc)
    err = _sq_error(wc, scales.reshape(-1), r, xc)
    pick = err.view(C, -1).argmin(0, keepdim=True)
    return scales.gather(0, pick)[0], ints.gather(0, pick)[0]


# ----------------------------------------------------------------------------------------------------------------------
# whole matrices: the state that packs and block LDLQ fills, round to nearest


@dataclass
class Codes:
    """Everything the bytes hold for a matrix [out, in] (row layout)."""

    d: Tensor  # [out, in // super_block] float32
    s: Tensor  # [out, in // block] int32 stored sub-scales (iq4_nl: zeros)
    idx: Tensor  # [out, in // vec] int64 codeword or level indices
    neg: Tensor  # [out, in] bool minus-sign bits

    @classmethod
    def empty(cls, grid: Lattice, out: int, n: int, d: Tensor) -> Codes:
        return cls(d.clone(), torch.zeros(out, n // grid.block, dtype=torch.int32),
                   torch.zeros(out, n // grid.vec, dtype=torch.int64), torch.zeros(out, n, dtype=torch.bool))

    def put_scale(self, grid: Lattice, j: int, a: Tensor, s: Tensor) -> None:
        """Sub-block j // block's chosen scale: its stored integer, or for iq4_nl its own fp16 d."""
        if grid.has_super:
            self.s[:, j // grid.block] = s.to(torch.int32)
        else:
            self.d[:, j // grid.block] = a

    def put(self, grid: Lattice, j: int, r: Rounded) -> None:
        g = r.neg.shape[1]
        self.idx[:, j // grid.vec : (j + g) // grid.vec] = r.idx
        self.neg[:, j : j + g] = r.neg


def check(grid: Lattice, W: Tensor) -> None:
    reason = grid.fits(W.shape)
    if reason is not None:
        raise ValueError(f"{grid.name}: {reason}")


def _quantize_rtn(grid: Lattice, W: Tensor, importance: Tensor | None) -> tuple[Tensor, Tensor]:
    """Lattice.quantize_rtn: round to nearest, importance[in] weighting each squared error: (values, ggml bytes)."""
    check(grid, W)
    W = W.detach().to(torch.float32)
    out, n = W.shape
    imp = None if importance is None else importance.detach().to(torch.float32)
    sc = fit_scales(grid, W, imp)
    codes = Codes.empty(grid, out, n, sc.d)
    values = torch.empty_like(W)
    B = grid.block
    step = max(1, _CHUNK * grid.vec // n)
    for r0 in range(0, out, step):
        r1 = min(r0 + step, out)
        w = W[r0:r1].reshape(-1, B)
        x = None if imp is None else imp.expand(r1 - r0, n).reshape(-1, B)
        d = sc.d[r0:r1].repeat_interleave(grid.super_block // B, -1).reshape(-1)
        a, s = choose_scale(grid, w, d, sc.s[r0:r1].reshape(-1), x)
        r = round_group(grid, w, a, x)
        if grid.has_super:
            codes.s[r0:r1] = s.view(r1 - r0, -1).to(torch.int32)
        else:
            codes.d[r0:r1] = a.view(r1 - r0, -1)
        codes.idx[r0:r1] = r.idx.reshape(r1 - r0, -1)
        codes.neg[r0:r1] = r.neg.reshape(r1 - r0, -1)
        values[r0:r1] = (a.unsqueeze(-1) * r.q).reshape(r1 - r0, n)
    return values, pack(grid, codes)


# ----------------------------------------------------------------------------------------------------------------------
# bytes: ggml's block layouts (little-endian), one packer and one parser per format


def _le(t: Tensor, nbytes: int) -> Tensor:
    """Integers [..., k] -> their little-endian bytes [..., k * nbytes]."""
    t = t.to(torch.int64)
    return torch.stack([(t >> (8 * i)) & 0xFF for i in range(nbytes)], -1).flatten(-2)


def _from_le(b: Tensor, nbytes: int) -> Tensor:
    """Little-endian bytes [..., k * nbytes] -> integers [..., k] (int64)."""
    b = b.to(torch.int64).unflatten(-1, (-1, nbytes))
    return sum(b[..., i] << (8 * i) for i in range(nbytes))


def _bits_to_bytes(neg: Tensor) -> Tensor:
    """[..., 8k] bools -> [..., k] bytes, element j of each 8 at bit j."""
    return (neg.unflatten(-1, (-1, 8)).to(torch.int64) << torch.arange(8)).sum(-1)


def _bytes_to_bits(b: Tensor) -> Tensor:
    return ((b.to(torch.int64).unsqueeze(-1) >> torch.arange(8)) & 1).bool().flatten(-2)


def _parity_bits(sign7: Tensor) -> Tensor:
    """ggml's ksigns: the 8-bit sign mask whose low 7 bits are stored; bit 7 makes the count of ones even."""
    ones = sum((sign7 >> i) & 1 for i in range(7))
    return sign7 | ((ones & 1) << 7)


def _nibbles(lo: Tensor, hi: Tensor) -> Tensor:
    return lo.to(torch.int64) | (hi.to(torch.int64) << 4)


def _split_nibbles(b: Tensor) -> tuple[Tensor, Tensor]:
    b = b.to(torch.int64)
    return b & 15, b >> 4


def _pack_iq2_xxs(d: Tensor, s: Tensor, idx: Tensor, signs: Tensor) -> list[Tensor]:
    aux = (signs & 0x7F).view(-1, 8, 4) << (7 * torch.arange(4))
    aux = aux.sum(-1) | (s << 28)
    return [_le(d, 2), torch.cat([idx.view(-1, 8, 4), _le(aux.unsqueeze(-1), 4).view(-1, 8, 4)], -1).flatten(1)]


def _parse_iq2_xxs(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    body = b[:, 2:].view(-1, 8, 8)
    idx = body[..., :4].reshape(-1, 32)
    aux = _from_le(body[..., 4:], 4)[..., 0]  # [n, 8]
    signs = _parity_bits((aux.unsqueeze(-1) >> (7 * torch.arange(4))) & 0x7F).reshape(-1, 32)
    return idx, aux >> 28, signs


def _pack_iq2_xs(d: Tensor, s: Tensor, idx: Tensor, signs: Tensor) -> list[Tensor]:
    qs = idx | ((signs & 0x7F) << 9)
    return [_le(d, 2), _le(qs, 2), _nibbles(s[:, 0::2], s[:, 1::2])]


def _parse_iq2_xs(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    qs = _from_le(b[:, 2:66], 2)
    lo, hi = _split_nibbles(b[:, 66:74])
    return qs & 511, torch.stack([lo, hi], -1).flatten(1), _parity_bits(qs >> 9)


def _pack_iq2_s(d: Tensor, s: Tensor, idx: Tensor, signs: Tensor) -> list[Tensor]:
    qh = ((idx >> 8).view(-1, 8, 4) << (2 * torch.arange(4))).sum(-1)
    return [_le(d, 2), idx & 255, signs, qh, _nibbles(s[:, 0::2], s[:, 1::2])]


def _parse_iq2_s(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    bi = b.to(torch.int64)
    qh = (bi[:, 66:74].unsqueeze(-1) >> (2 * torch.arange(4))) & 3
    lo, hi = _split_nibbles(b[:, 74:82])
    return bi[:, 2:34] | (qh.flatten(1) << 8), torch.stack([lo, hi], -1).flatten(1), bi[:, 34:66]


def _pack_iq3_xxs(d: Tensor, s: Tensor, idx: Tensor, signs: Tensor) -> list[Tensor]:
    aux = ((signs & 0x7F).view(-1, 8, 4) << (7 * torch.arange(4))).sum(-1) | (s << 28)
    return [_le(d, 2), idx, _le(aux, 4)]


def _parse_iq3_xxs(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    aux = _from_le(b[:, 66:98], 4)
    signs = _parity_bits((aux.unsqueeze(-1) >> (7 * torch.arange(4))) & 0x7F).flatten(1)
    return b[:, 2:66].to(torch.int64), aux >> 28, signs


def _pack_iq3_s(d: Tensor, s: Tensor, idx: Tensor, signs: Tensor) -> list[Tensor]:
    qh = (((idx >> 8) & 1).view(-1, 8, 8) << torch.arange(8)).sum(-1)
    return [_le(d, 2), idx & 255, qh, signs, _nibbles(s[:, 0::2], s[:, 1::2])]


def _parse_iq3_s(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    bi = b.to(torch.int64)
    qh = (bi[:, 66:74].unsqueeze(-1) >> torch.arange(8)) & 1
    lo, hi = _split_nibbles(b[:, 106:110])
    return bi[:, 2:66] | (qh.flatten(1) << 8), torch.stack([lo, hi], -1).flatten(1), bi[:, 74:106]


def _pack_iq4_nl(d: Tensor, s: Tensor, idx: Tensor, signs: Tensor) -> list[Tensor]:
    return [_le(d, 2), _nibbles(idx[:, :16], idx[:, 16:])]


def _parse_iq4_nl(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    lo, hi = _split_nibbles(b[:, 2:18])
    return torch.cat([lo, hi], -1), torch.zeros(b.shape[0], 1, dtype=torch.int64), torch.zeros(b.shape[0], 4)


def _pack_iq4_xs(d: Tensor, s: Tensor, idx: Tensor, signs: Tensor) -> list[Tensor]:
    high = (((s >> 4) & 3) << (2 * torch.arange(8))).sum(-1, keepdim=True)
    low = _nibbles(s[:, 0::2] & 15, s[:, 1::2] & 15)
    q = idx.view(-1, 8, 32)
    return [_le(d, 2), _le(high, 2), low, _nibbles(q[..., :16], q[..., 16:]).flatten(1)]


def _parse_iq4_xs(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    high = (_from_le(b[:, 2:4], 2) >> (2 * torch.arange(8))) & 3
    lo, hi = _split_nibbles(b[:, 4:8])
    s = torch.stack([lo, hi], -1).flatten(1) | (high << 4)
    qlo, qhi = _split_nibbles(b[:, 8:136].view(-1, 8, 16))
    return torch.cat([qlo, qhi], -1).flatten(1), s, torch.zeros(b.shape[0], 32)


_LAYOUT = {
    "iq2_xxs": (_pack_iq2_xxs, _parse_iq2_xxs),
    "iq2_xs": (_pack_iq2_xs, _parse_iq2_xs),
    "iq2_s": (_pack_iq2_s, _parse_iq2_s),
    "iq3_xxs": (_pack_iq3_xxs, _parse_iq3_xxs),
    "iq3_s": (_pack_iq3_s, _parse_iq3_s),
    "iq4_nl": (_pack_iq4_nl, _parse_iq4_nl),
    "iq4_xs": (_pack_iq4_xs, _parse_iq4_xs),
}


def pack(grid: Lattice, codes: Codes) -> Tensor:
    """ggml's bytes (1-D uint8) of a matrix in row layout: one block of type_size bytes per super-block."""
    SB = grid.super_block
    d = fp16.fp16_bits(codes.d.reshape(-1)).to(torch.int64).unsqueeze(-1)
    s = codes.s.reshape(-1, SB // grid.block).to(torch.int64)
    idx = codes.idx.reshape(-1, SB // grid.vec)
    signs = _bits_to_bytes(codes.neg.reshape(-1, SB))
    parts = _LAYOUT[grid.name][0](d, s, idx, signs)
    return torch.cat([p.to(torch.uint8) for p in parts], -1).reshape(-1)


def levels(grid: Lattice, codes: Codes) -> tuple[Tensor, Tensor]:
    """(signed integer levels [out, in] as float32, sub-scales [out, in // block]): value = scale · level. Every
    level fits int8 (codebook entries with their signs, or iq4's -127..113), which the ONNX export uses."""
    out, n = codes.neg.shape
    if grid.has_super:
        a = _scale(grid, codes.d.repeat_interleave(grid.super_block // grid.block, -1), codes.s)
    else:
        a = codes.d
    mag = _book(grid.name).C[codes.idx].reshape(out, n)
    return torch.where(codes.neg, -mag, mag), a


def values(grid: Lattice, codes: Codes) -> Tensor:
    """The matrix the codes stand for, bit-identical to gguf-py's and ggml's dequantization."""
    q, a = levels(grid, codes)
    out, n = q.shape
    return (a.unsqueeze(-1) * q.view(out, -1, grid.block)).reshape(out, n)


def parse(grid: Lattice, raw: Tensor, shape: tuple[int, ...] | torch.Size) -> Codes:
    """Bytes -> the codes they hold (the inverse of `pack`)."""
    out, n = int(shape[0]), int(shape[1])
    b = raw.to(torch.uint8).reshape(-1, grid.type_size)
    idx, s, signs = _LAYOUT[grid.name][1](b)
    d = fp16.bytes_half(b[:, :2])
    neg = _bytes_to_bits(signs.to(torch.int64)) if grid.signs != "none" else torch.zeros(out, n, dtype=torch.bool)
    return Codes(d.reshape(out, -1), s.to(torch.int32).reshape(out, -1), idx.to(torch.int64).reshape(out, -1),
                 neg.reshape(out, n))
