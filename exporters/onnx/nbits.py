"""ggml blocks → MatMulNBits inputs, losslessly (pure functions, no graph).

* q4_0 → bits 4, block 32; q8_0 → bits 8, block 32 (int8 x stored as x + 128); q3_k → bits 4, block 16 (its 3-bit
  codes stored as code + 4): all three are symmetric, so the op's default zero point 2^(bits-1) is the exact one
  and no zero-point input is written (the fastest CPU path, with prepacked weights).
* q2_k → bits 4 (codes + 8), block 16; q4_k → bits 4, block 32 with uint8 zero point 0: both are affine
  (value = scale·code − offset), so by default the offset is split off: y = MatMulNBits(x) − BlockSum(x)·offsetsᵀ,
  where BlockSum sums x over each block. Both parts are exact (the identity input returns ggml's fl(scale·code) −
  offset bit for bit) and the MatMulNBits part keeps the prepacked integer-zero-point kernels.
* zero_points="float" gives the compact mapping instead: q2_k → bits 2, float zero points zp = offset/scale.
  onnxruntime's CPU kernel computes code·scale − fl(zp·scale), so zp is chosen with fl(zp·scale) == offset where
  a float32 zp can hit it (about 9 blocks in 10; the rest are off by one ulp of the offset). It is the most compact
  form, but float zero points make onnxruntime dequantize the whole weight on every call.
* The i-quants become exact 8-bit codes (no MatMulNBits kernel reads a codebook); a source's q4_1 and q6_k
  embedding or head map exactly too (`nbits_from_blocks`).

Weights that share an input stack row-wise (`stack`, `block_diagonal`) into one wider MatMulNBits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lrdeploy.compressor import grids, lattice
from lrdeploy.errors import LrdError

ZERO_POINTS = ("auto", "uint8", "float")
# ggml format -> (MatMulNBits bits, code shift added to ggml's code, affine), as each format declares it; with float
# zero points an affine format's codes go unshifted in the fewest bits that hold them (q2_k: 2)
NBITS_FORMATS: dict[str, tuple[int, int, bool]] = {
    name: grid.nbits for name, grid in grids.GRIDS.items() if grid.nbits is not None
}


@dataclass(frozen=True)
class NBitsWeight:
    """MatMulNBits inputs for one weight W[N, K] (zero_points None: the default 2^(bits-1)), plus optional offsets.

    offsets[N, k_blocks] (affine formats split in two) are subtracted as BlockSum(x)·offsetsᵀ, where BlockSum(x)
    sums x over each block: W = (code − zp)·scale − offset with integer zp and both parts exact.
    """

    bits: int
    block_size: int
    n: int
    k: int
    B: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # None, uint8 packed [N, ceil(k_blocks * bits / 8)], or float32 [N, k_blocks]
    offsets: np.ndarray | None = None  # float32 [N, k_blocks]


def pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """[..., n] integers below 2^bits -> [..., n·bits/8] uint8, element i at bit bits·(i mod 8/bits): the op's order."""
    per = 8 // bits
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = np.zeros(c.shape[:-1], np.uint8)
    for i in range(per):
        out |= c[..., i] << np.uint8(bits * i)
    return out


def unpack_low_first(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_low_first, as int32 codes."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per).astype(np.int32)


def exact_zero_points(offset: np.ndarray, scale: np.ndarray, tries: int = 4) -> np.ndarray:
    """float32 zp with fl(zp·scale) == offset wherever a float32 zp can hit it (scale must be non-zero).

    onnxruntime dequantizes as code·scale − fl(zp·scale), and ggml as fl(scale·code) − offset: equal zp·scale and
    offset make the two bit-identical. Starting from offset/scale, step zp by one ulp towards the target.
    """
    offset = offset.astype(np.float32)
    scale = scale.astype(np.float32)
    zp = (offset.astype(np.float64) / scale.astype(np.float64)).astype(np.float32)
    for _ in range(tries):
        prod = zp * scale
        miss = prod != offset
        if not miss.any():
            break
        up = (prod < offset) == (scale > 0)
        zp = np.where(miss, np.nextafter(zp, np.where(up, np.inf, -np.inf).astype(np.float32)), zp)
    return zp.astype(np.float32)


def nbits_from_ggml(q_format: str, raw: torch.Tensor | np.ndarray, shape: tuple[int, int],
                    zero_points: str = "auto") -> NBitsWeight:
    """Map the artifact's raw ggml blocks of Q[N, K] (flattened row-major layout) onto MatMulNBits, losslessly.

    zero_points:
      "auto": none where the op's default 2^(bits-1) is ggml's own zero (q4_0, q8_0, q3_k: prepacked kernels), and
        the affine q2_k/q4_k split into MatMulNBits(codes, scale) with an integer zero point minus
        BlockSum(x)·offsetsᵀ (bit-exact, prepacked; q2_k's codes take 4 bits);
      "uint8": the same with the integer zero points written out explicitly;
      "float": float zero points (bits ≤ 4; q2_k as bits 2), zp = offset/scale for the affine formats: the most
        compact, but onnxruntime's CPU kernel then dequantizes the whole weight on every call.
    """
    grid = grids.GRIDS.get(q_format)
    if grid is None:
        raise LrdError(f"q_format {q_format} has no MatMulNBits mapping; choose one of {', '.join(NBITS_FORMATS)}")
    if grid.nbits is None:
        return _nbits_from_lattice(grid, raw, shape, zero_points)
    if zero_points not in ZERO_POINTS:
        raise LrdError(f"unknown zero_points '{zero_points}'; choose one of {', '.join(ZERO_POINTS)}")
    n, k = shape
    if k % grid.block:
        raise LrdError(f"{q_format}: row length {k} is not a multiple of its {grid.block}-weight blocks")
    bits, shift, affine = grid.nbits
    if affine and zero_points == "float":
        bits, shift = next(b for b in (2, 4, 8) if grid.qmax < 1 << b), 0
    raw_t = torch.as_tensor(np.asarray(raw)).to(torch.uint8).reshape(-1)
    # every sub-block lies inside one row (k % block == 0), so flat block i is row i // kb, column block i % kb
    codes_t, scale_t, offset_t = grids.parse_blocks(grid, raw_t)  # the one decoder of ggml blocks
    kb = k // grid.block
    codes = codes_t.numpy().astype(np.int32).reshape(n, kb, grid.block) + shift
    scale = scale_t.numpy().astype(np.float32).reshape(n, kb)
    offset = offset_t.numpy().astype(np.float32).reshape(n, kb)
    default_zp = 1 << (bits - 1)
    zp: np.ndarray | None
    offsets = None
    if affine and zero_points == "float":
        flat = scale == 0  # a constant block -offset: codes 0 and (0 - 1)·offset
        codes[flat] = 0
        safe = np.where(flat, np.float32(1), scale)
        zp = np.where(flat, np.float32(1), exact_zero_points(offset, safe))
        scale = np.where(flat, offset, scale)
    elif affine:
        offsets = offset
        zp_int = np.full((n, kb), shift, np.int32)  # (code + shift − shift)·scale = fl(scale·code)
        zp = pack_zero_points(zp_int, bits) if zero_points == "uint8" or shift != default_zp else None
    elif zero_points == "auto" or (zero_points == "float" and bits == 8):  # no float zp kernel for 8 bits
        zp = None
    elif zero_points == "uint8":
        zp = pack_zero_points(np.full((n, kb), default_zp, np.int32), bits)
    else:
        zp = np.full((n, kb), default_zp, np.float32)
    B = pack_low_first(codes, bits)
    return NBitsWeight(bits, grid.block, n, k, B, scale.astype(np.float32), zp, offsets)


def _nbits_from_lattice(grid, raw: torch.Tensor | np.ndarray, shape: tuple[int, int], zero_points: str) -> NBitsWeight:
    """An i-quant (compressor/lattice.py) as 8-bit MatMulNBits, exactly.

    Its values are scale · level with one float32 scale per 16- or 32-weight sub-block and integer levels that fit
    int8 (a codebook entry with its sign: ±8..43 for iq2, or iq4's -127..113). So code = level + 128 under the op's
    default 8-bit zero point 128 gives (code − 128)·scale, ggml's own product. Lossless and prepacked, but 8 bits
    per weight in the ONNX file: no MatMulNBits kernel reads a codebook.
    """
    n, k = shape
    raw_t = torch.as_tensor(np.asarray(raw)).to(torch.uint8).reshape(-1)
    q, scale = lattice.levels(grid, lattice.parse(grid, raw_t, shape))
    kb = k // grid.block
    codes = (q.to(torch.int32) + 128).numpy().reshape(n, kb, grid.block)
    zp = pack_zero_points(np.full((n, kb), 128, np.int32), 8) if zero_points == "uint8" else None
    return NBitsWeight(8, grid.block, n, k, pack_low_first(codes, 8), scale.numpy().astype(np.float32), zp, None)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 stored at byte AT of each block row, as float32."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16)[:, 0].astype(np.float32)


def _q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q4_1 (32 weights: f16 d, f16 m, 16 bytes of nibbles, low nibbles first): value = fl(d·q) + m."""
    qs = blocks[:, 4:20]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)
    return codes, _f16(blocks, 0)[:, None], -_f16(blocks, 2)[:, None]


def _q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q6_k (256 weights: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 sub-scales, f16 d):
    value = fl(fl(d·sc)·(q − 32)) with one sub-scale per 16 weights; returned as codes q − 32 (per 16-weight block)."""
    ql, qh = blocks[:, :128].astype(np.int32), blocks[:, 128:192].astype(np.int32)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    halves = []
    for h in range(2):
        lo, hi = ql[:, 64 * h : 64 * h + 64], qh[:, 32 * h : 32 * h + 32]
        halves += [(lo[:, :32] & 15) | ((hi & 3) << 4), (lo[:, 32:] & 15) | (((hi >> 2) & 3) << 4),
                   (lo[:, :32] >> 4) | (((hi >> 4) & 3) << 4), (lo[:, 32:] >> 4) | (((hi >> 6) & 3) << 4)]
    codes = np.concatenate(halves, axis=1) - 32  # [blocks, 256] in the weights' order
    scale = (_f16(blocks, 208)[:, None] * sc).astype(np.float32)  # fl(d·sc), as ggml multiplies
    return codes.reshape(-1, 16), scale.reshape(-1, 1), np.zeros_like(scale).reshape(-1, 1)


# ggml types a source may store its embedding or head in, beyond our grids: (bytes per block, weights per block,
# weights per scale, parser -> codes [n, weights per scale], scale [n, 1], offset [n, 1]; value = scale·code − offset)
SOURCE_BLOCKS = {"q4_1": (20, 32, 32, _q4_1), "q6_k": (210, 256, 16, _q6_k)}


def nbits_from_blocks(q_format: str, raw: torch.Tensor | np.ndarray, shape: tuple[int, int]) -> NBitsWeight | None:
    """Any stored ggml matrix (an embedding, a head) as exact MatMulNBits inputs, or None where no exact form exists.

    Our grids and i-quants map as in nbits_from_ggml. A source's q4_1 becomes 4-bit codes with a uint8 zero point 0,
    scale d and offset −m; q6_k becomes 8-bit codes q − 32 + 128 per 16-weight block with scale fl(d·sc), which is
    ggml's own product. Other types (q5_0, q5_k, ...) return None: the caller keeps the tensor in floats.
    """
    if q_format in grids.GRIDS:
        return nbits_from_ggml(q_format, raw, shape)
    if q_format not in SOURCE_BLOCKS:
        return None
    nbytes, per_block, block, parse = SOURCE_BLOCKS[q_format]
    n, k = shape
    if k % per_block:
        return None
    codes, scale, offset = parse(np.asarray(raw, np.uint8).reshape(-1, nbytes))
    kb = k // block
    scale, offset = scale.reshape(n, kb), offset.reshape(n, kb)
    if q_format == "q6_k":
        B = pack_low_first((codes + 128).reshape(n, kb, block), 8)
        return NBitsWeight(8, block, n, k, B, scale, None, None)
    zp = pack_zero_points(np.zeros((n, kb), np.int32), 4)
    return NBitsWeight(4, block, n, k, pack_low_first(codes.reshape(n, kb, block), 4), scale, zp, offset)


def pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    n, kb = zp.shape
    per = 8 // bits
    padded = np.zeros((n, -(-kb // per) * per), np.int32)
    padded[:, :kb] = zp
    return pack_low_first(padded, bits)


def nbits_dequant(w: NBitsWeight) -> np.ndarray:
    """W[N, K] as onnxruntime's CPU kernel computes it: the reference for the tests.

    Integer zero points: (code − zp)·scale, an exact small integer times the scale; float ones: code·scale −
    fl(zp·scale). Split-off offsets are subtracted last.
    """
    codes = unpack_low_first(w.B, w.bits)
    scales = w.scales.astype(np.float32)
    if w.zero_points is not None and w.zero_points.dtype != np.uint8:
        zp = w.zero_points.astype(np.float32)
        W = codes.astype(np.float32) * scales[..., None] - (zp * scales)[..., None]
    else:
        if w.zero_points is None:
            zp_int = np.full(scales.shape, 1 << (w.bits - 1), np.int32)
        else:
            zp_int = unpack_low_first(w.zero_points, w.bits)[:, : scales.shape[1]]
        W = (codes - zp_int[..., None]).astype(np.float32) * scales[..., None]
    if w.offsets is not None:
        W = W - w.offsets.astype(np.float32)[..., None]
    return W.reshape(w.n, w.k)


def stackable(qs: list[NBitsWeight], same_k: bool = True) -> bool:
    """Whether these MatMulNBits weights can be stacked row-wise into one (same bits, blocks, zero-point kind)."""
    kinds = {(q.bits, q.block_size, q.k if same_k else 0, None if q.zero_points is None else q.zero_points.dtype,
              q.offsets is None) for q in qs}
    return len(kinds) == 1


def block_diagonal(parts: list[np.ndarray]) -> np.ndarray:
    """PARTS on the diagonal of their first two axes, zeros elsewhere (any trailing axes are shared)."""
    out = np.zeros((sum(p.shape[0] for p in parts), sum(p.shape[1] for p in parts), *parts[0].shape[2:]),
                   parts[0].dtype)
    row = col = 0
    for p in parts:
        out[row : row + p.shape[0], col : col + p.shape[1]] = p
        row, col = row + p.shape[0], col + p.shape[1]
    return out


def stack(qs: list[NBitsWeight]) -> NBitsWeight:
    q0 = qs[0]
    zp = None if q0.zero_points is None else np.concatenate([q.zero_points for q in qs])
    offsets = None if q0.offsets is None else np.concatenate([q.offsets for q in qs])
    return NBitsWeight(q0.bits, q0.block_size, sum(q.n for q in qs), q0.k, np.concatenate([q.B for q in qs]),
                       np.concatenate([q.scales for q in qs]), zp, offsets)
