"""ONNX export: a llama-family decoder with a KV cache whose compressed linears stay split as Q + L·R.

Each compressed linear becomes ``MatMulNBits(x, Q) + MatMul(MatMul(x, Rᵀ), Lᵀ)`` (com.microsoft contrib op plus
two plain MatMuls), so onnxruntime runs exactly the artifact's numbers without ever merging L·R into Q. The
ggml blocks of Q map onto MatMulNBits without loss:

* q4_0 → bits 4, block 32; q8_0 → bits 8, block 32 (int8 x stored as x + 128); q3_k → bits 4, block 16 (its 3-bit
  codes stored as code + 4): all three are symmetric, so the op's default zero point 2^(bits-1) is the exact one
  and no zero-point input is written (the fastest CPU path, with prepacked weights).
* q2_k → bits 4 (codes + 8), block 16; q4_k → bits 4, block 32 with uint8 zero point 0: both are affine
  (value = scale·code − offset), so by default the offset is split off: y = MatMulNBits(x) − BlockSum(x)·offsetsᵀ,
  where BlockSum sums x over each block. Both parts are exact (the identity input returns ggml's fl(scale·code) −
  offset bit for bit) and the MatMulNBits part keeps the prepacked integer-zero-point kernels.
* zero_points="float" gives the mapping of DESIGN.md instead: q2_k → bits 2, float zero points zp = offset/scale.
  onnxruntime's CPU kernel computes code·scale − fl(zp·scale), so zp is chosen with fl(zp·scale) == offset where
  a float32 zp can hit it (about 9 blocks in 10; the rest are off by one ulp of the offset). It is the most compact
  form, but float zero points make onnxruntime dequantize the whole weight on every call.

L and R stored in q4_0/q8_0 become MatMulNBits too (bits 4 or 8, block 32, exact). The embedding and the head keep
the blocks the artifact stores them in where an exact form exists (GatherBlockQuantized for the lookup, MatMulNBits
for the head, one copy when tied; `nbits_from_blocks`), else a float matrix.

Two graphs: the fused one (exporters/onnx_fused.py: GroupQueryAttention with a shared KV buffer, fused RMSNorms),
the default wherever the model fits it, and the plain one here (opset 17 standard ops around the contrib
MatMulNBits/GatherBlockQuantized, a KV cache that grows by Concat). The directory also holds model.onnx.data (the
weights), the tokenizer, config.json, genai_config.json (onnxruntime-genai) and lrdeploy_onnx.json.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lrdeploy.compressor import arch as archs
from lrdeploy.errors import LrdError
from lrdeploy.files import ONNX_DATA as DATA_FILE
from lrdeploy.files import ONNX_KEEP as KEEP
from lrdeploy.files import ONNX_META as META_FILE
from lrdeploy.files import ONNX_MODEL as MODEL_FILE
from lrdeploy.io import output_lock, staged_output

OPSET = 17
IR_VERSION = 8  # onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads at most 13
MS_DOMAIN = "com.microsoft"
META_FORMAT = "lrdeploy-onnx"
META_VERSION = 4  # 2: the fused graph, quantized embedding/head and L·R, weights in model.onnx.data; 3: logits_to_keep;
# 4: built for an execution provider (ep, exact, built_for; the CPU default has int8 activations)
DTYPES = {"fp32": np.float32, "fp16": np.float16}
ZERO_POINTS = ("auto", "uint8", "float")
GRAPHS = ("auto", "fused", "plain")
EPS = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class EpSettings:
    """What an export is built for: the execution provider, the float type of what stays uncompressed, and
    MatMulNBits' accuracy_level (0: float activations, the artifact's logits exactly; 4: int8 activations)."""

    ep: str
    dtype: str
    accuracy_level: int
    exact: bool

    def note(self) -> str:
        """The sentence the export's notes and `lrdeploy inspect` give."""
        if self.ep == "cuda":
            how = (f"{self.dtype} graph (onnxruntime's CUDA GroupQueryAttention runs fp16 only)" if self.dtype == "fp16"
                   else f"{self.dtype} graph: the CUDA EP has no {self.dtype} GroupQueryAttention, so a fused graph "
                        "runs its attention on the CPU EP")
            return f"built for the CUDA EP (--ep cuda): {how}, float activations (accuracy_level 0)"
        if self.exact:
            return (f"built exact (--exact): {self.dtype} graph with float activations (accuracy_level 0), so it "
                    "reproduces the artifact's logits; the default CPU export (int8 activations) decodes faster")
        return (f"built for the CPU EP (--ep cpu): {self.dtype} graph, MatMulNBits quantizes its activations to int8 "
                "(accuracy_level 4, onnxruntime-genai's builder's CPU setting): faster decode, no longer bit-exact "
                "(--exact keeps float activations)")


def ep_settings(ep: str = "auto", exact: bool = False, dtype: str | None = None) -> EpSettings:
    """The settings of an export for EP. cpu: fp32 with int8 activations, the fastest CPU setting (it cost +0.05% to
    +0.16% perplexity against the exact export, docs/results.md, "ONNX Runtime"); cuda: fp16, which the CUDA EP's
    GroupQueryAttention needs, with float activations; auto: cuda where torch sees a CUDA GPU, else cpu. EXACT: fp32
    with float activations (the tests' setting: the export reproduces the artifact's logits). DTYPE overrides the
    float type."""
    if ep not in EPS:
        raise LrdError(f"unknown execution provider '{ep}'; choose one of {', '.join(EPS)}")
    if dtype is not None and dtype not in DTYPES:
        raise LrdError(f"unknown ONNX dtype '{dtype}'; choose fp32 or fp16")
    if ep == "auto":
        ep = "cpu" if exact or not torch.cuda.is_available() else "cuda"
    if ep == "cuda":
        if exact:
            raise LrdError("--exact builds the float32 CPU graph; drop --ep cuda (the CUDA EP's GroupQueryAttention "
                           "runs fp16 only), or drop --exact")
        return EpSettings("cuda", dtype or "fp16", 0, False)
    return EpSettings("cpu", dtype or "fp32", 0 if exact else 4, exact)


# ggml format -> (MatMulNBits bits, code shift added to ggml's code, affine); q2_k is 2 bits only with float zps
NBITS_FORMATS: dict[str, tuple[int, int, bool]] = {
    "q2_k": (4, 8, True),
    "q3_k": (4, 4, False),
    "q4_k": (4, 0, True),
    "q4_0": (4, 0, False),
    "q8_0": (8, 1, False),
}
# transformers' activation names -> the registry's
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


# ----------------------------------------------------------------------------------------------------------------------
# ggml blocks -> MatMulNBits (pure functions)


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
    from lrdeploy.compressor import grids, lattice

    if q_format in lattice.LATTICES:
        return _nbits_from_lattice(grids.get_grid(q_format), raw, shape, zero_points)
    if q_format not in NBITS_FORMATS:
        raise LrdError(f"q_format {q_format} has no MatMulNBits mapping; choose one of {', '.join(NBITS_FORMATS)}")
    if zero_points not in ZERO_POINTS:
        raise LrdError(f"unknown zero_points '{zero_points}'; choose one of {', '.join(ZERO_POINTS)}")
    grid = grids.get_grid(q_format)
    n, k = shape
    if k % grid.block:
        raise LrdError(f"{q_format}: row length {k} is not a multiple of its {grid.block}-weight blocks")
    bits, shift, affine = NBITS_FORMATS[q_format]
    if q_format == "q2_k" and zero_points == "float":
        bits, shift = 2, 0
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
        zp = _pack_zero_points(zp_int, bits) if zero_points == "uint8" or shift != default_zp else None
    elif zero_points == "auto" or (zero_points == "float" and bits == 8):  # no float zp kernel for 8 bits
        zp = None
    elif zero_points == "uint8":
        zp = _pack_zero_points(np.full((n, kb), default_zp, np.int32), bits)
    else:
        zp = np.full((n, kb), default_zp, np.float32)
    B = pack_low_first(codes, bits)
    return NBitsWeight(bits, grid.block, n, k, B, scale.astype(np.float32), zp, offsets)


def _lattice_formats() -> dict:
    from lrdeploy.compressor import lattice

    return lattice.LATTICES


def _nbits_from_lattice(grid, raw: torch.Tensor | np.ndarray, shape: tuple[int, int], zero_points: str) -> NBitsWeight:
    """An i-quant (compressor/lattice.py) as 8-bit MatMulNBits, exactly.

    Its values are scale · level with one float32 scale per 16- or 32-weight sub-block and integer levels that fit
    int8 (a codebook entry with its sign: ±8..43 for iq2, or iq4's -127..113). So code = level + 128 under the op's
    default 8-bit zero point 128 gives (code − 128)·scale, ggml's own product. Lossless and prepacked, but 8 bits
    per weight in the ONNX file: no MatMulNBits kernel reads a codebook.
    """
    from lrdeploy.compressor import lattice

    n, k = shape
    raw_t = torch.as_tensor(np.asarray(raw)).to(torch.uint8).reshape(-1)
    q, scale = lattice.levels(grid, lattice.parse(grid, raw_t, shape))
    kb = k // grid.block
    codes = (q.to(torch.int32) + 128).numpy().reshape(n, kb, grid.block)
    zp = _pack_zero_points(np.full((n, kb), 128, np.int32), 8) if zero_points == "uint8" else None
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
    from lrdeploy.compressor import grids, lattice

    if q_format in grids.GRIDS or q_format in lattice.LATTICES:
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
    zp = _pack_zero_points(np.zeros((n, kb), np.int32), 4)
    return NBitsWeight(4, block, n, k, pack_low_first(codes.reshape(n, kb, block), 4), scale, zp, offset)


def _pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
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


# ----------------------------------------------------------------------------------------------------------------------
# what the exporter reads: one decoder's shapes and its weights


@dataclass(frozen=True)
class DecoderShape:
    """The few numbers the graph needs, read from a transformers config; `family` says how a block is built."""

    arch: str  # the model_type
    family: archs.Arch
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    tie: bool
    rope: dict  # layer kind -> (inv_freq float32 [rotary_dim / 2], exactly the torch rotary module's; its scaling)
    layer_types: tuple[str, ...]  # full_attention | sliding_attention, per layer
    sliding_window: int | None
    context_length: int
    attn_scale: float
    rotary_dim: int
    embed_scale: float | None


def decoder_shape(config) -> DecoderShape:
    """Check CONFIG is a decoder this exporter covers, and read its shapes; rotary frequencies come from torch."""
    from lrdeploy.compressor.model import embed_scale, rotary, skeleton

    arch = getattr(config, "model_type", None)
    if arch not in archs.ARCHS:
        raise LrdError(f"ONNX export supports {', '.join(archs.SUPPORTED)}; this model is '{arch}'")
    family = archs.ARCHS[arch]
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if ACTIVATIONS.get(act) != family.activation:
        raise LrdError(f"ONNX export of {arch} supports the {family.activation} MLP only; this model uses '{act}'")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    rot = rotary(skeleton(config), "cpu")
    types = tuple(archs.layer_types(config))
    rope = {}
    for kind in set(types):
        per_kind = hasattr(rot, f"{kind}_inv_freq")  # gemma3: one RoPE per layer kind
        rope_type = rot.rope_type.get(kind) if per_kind else getattr(rot, "rope_type", "default")
        if "dynamic" in str(rope_type):
            raise LrdError(f"rope type '{rope_type}' depends on the sequence length; ONNX export supports static RoPE")
        inv = getattr(rot, f"{kind}_inv_freq") if per_kind else rot.inv_freq
        scaling = getattr(rot, f"{kind}_attention_scaling") if per_kind else getattr(rot, "attention_scaling", 1.0)
        rope[kind] = (inv.detach().float().numpy().copy(), float(scaling))
    window = getattr(config, "sliding_window", None) if "sliding_attention" in types else None
    ctx = int(getattr(config, "max_position_embeddings", 0) or 4096)
    if window is not None and window >= ctx:
        window = None
    return DecoderShape(
        arch=arch, family=family, hidden=config.hidden_size, layers=config.num_hidden_layers, heads=heads,
        kv_heads=kv_heads, head_dim=archs.head_dim(config), vocab=config.vocab_size, eps=float(config.rms_norm_eps),
        tie=bool(getattr(config, "tie_word_embeddings", False)), rope=rope, layer_types=types,
        sliding_window=window, context_length=ctx, attn_scale=archs.attention_scale(config),
        rotary_dim=archs.rotary_dim(config), embed_scale=embed_scale(config),
    )


@dataclass
class LinearWeights:
    """One linear as the graph will compute it: Q (MatMulNBits) or a dense W, plus optional L, R and bias."""

    q: NBitsWeight | None = None
    dense: np.ndarray | None = None  # W [out, in], float32
    lora_l: np.ndarray | None = None  # [out, r]
    lora_r: np.ndarray | None = None  # [r, in]
    bias: np.ndarray | None = None
    lora_lq: NBitsWeight | None = None  # L and R as the artifact's q4_0/q8_0 blocks (then lora_l/lora_r are None)
    lora_rq: NBitsWeight | None = None

    @property
    def has_lowrank(self) -> bool:
        return self.lora_l is not None or self.lora_lq is not None

    @property
    def rows(self) -> int:
        if self.q is not None:
            return self.q.n
        if self.dense is not None:
            return self.dense.shape[0]
        return self.lora_lq.n if self.lora_lq is not None else self.lora_l.shape[0]


class Weights:
    """Reads the tensors of an artifact (split linears) or of a plain model source (dense linears)."""

    def __init__(self, tensor: Callable[[str], torch.Tensor], has: Callable[[str], bool],
                 linears: dict | None, raw: Callable[[str], torch.Tensor] | None, zero_points: str,
                 tables: dict | None = None):
        self._tensor, self._has, self.linears, self._raw, self.zero_points = tensor, has, linears, raw, zero_points
        self.tables = tables or {}  # the artifact's stored formats of the embedding and the head
        self.down_rotation = None  # an artifact's online rotation of down_proj's input (rotate.InputRotation)
        # linears by how the graph computes them; "iquant_8bit" counts the MatMulNBits that hold an i-quant at 8 bits
        self.counts = {"matmulnbits": 0, "lowrank": 0, "lowrank_nbits": 0, "dense": 0, "iquant_8bit": 0}

    def tensor(self, name: str) -> np.ndarray:
        return self._tensor(name).float().numpy()

    def has(self, name: str) -> bool:
        return self._has(name)

    def linear(self, name: str) -> LinearWeights:
        bias = self.tensor(name + ".bias") if self.has(name + ".bias") else None
        entry = None if self.linears is None else self.linears.get(name)
        if entry is None:
            self.counts["dense"] += 1
            return LinearWeights(dense=self.tensor(name + ".weight"), bias=bias)
        out = LinearWeights(bias=bias)
        if entry["q_format"] is not None:
            assert self._raw is not None
            out.q = nbits_from_ggml(entry["q_format"], self._raw(name + ".q"), tuple(entry["shape"]), self.zero_points)
            self.counts["matmulnbits"] += 1
            self.counts["iquant_8bit"] += entry["q_format"] in _lattice_formats()
        if entry["rank"]:
            self.counts["lowrank"] += 1
            from lrdeploy.compressor import grids

            lr = entry.get("lr_format")
            n, k = entry["shape"]
            r = entry["rank"]
            block = grids.get_grid(lr).block if lr in NBITS_FORMATS else None
            if block and self._raw is not None and r % block == 0 and k % block == 0:
                out.lora_lq = nbits_from_ggml(lr, self._raw(name + ".lora_l"), (n, r), self.zero_points)
                out.lora_rq = nbits_from_ggml(lr, self._raw(name + ".lora_r"), (r, k), self.zero_points)
                self.counts["lowrank_nbits"] += 1
            else:
                out.lora_l, out.lora_r = self.tensor(name + ".lora_l"), self.tensor(name + ".lora_r")
        return out

    def blocks(self, name: str) -> tuple[str | None, NBitsWeight | None]:
        """(stored format, exact MatMulNBits form) of an embedding or head the artifact stores as ggml blocks;
        (format or None, None) where it is stored in floats or its type has no exact form."""
        entry = self.tables.get(name) or {}
        fmt = entry.get("q_format")
        if fmt is None or self._raw is None:
            return entry.get("dtype"), None
        return fmt, nbits_from_blocks(fmt, self._raw(name + ".q"), tuple(entry["shape"]))


# ----------------------------------------------------------------------------------------------------------------------
# graph building


class Graph:
    """A small onnx.helper wrapper: unique names, cached constants, and initializers streamed to a data file."""

    def __init__(self, data_path: Path, dtype: type, accuracy_level: int = 0):
        from onnx import TensorProto

        self.accuracy_level = accuracy_level  # MatMulNBits: 0 keeps activations float (exact); 4 = int8 (lossy)
        self.nodes: list = []
        self.inits: list = []
        self.dtype = np.dtype(dtype)
        self.onnx_dtype = TensorProto.FLOAT16 if self.dtype == np.float16 else TensorProto.FLOAT
        self._names: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}
        self.data_path = data_path
        self._data = open(data_path, "wb")  # closed by close()
        self.data_bytes = 0

    def fresh(self, hint: str) -> str:
        n = self._names.get(hint, 0)
        self._names[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    def init(self, name: str, array: np.ndarray) -> str:
        """Add a weight; anything over 1 KiB goes to the data file at a 64-byte aligned offset."""
        from onnx import TensorProto, helper, numpy_helper

        array = np.ascontiguousarray(array)
        name = self.fresh(name)
        if array.nbytes < 1024:
            self.inits.append(numpy_helper.from_array(array, name))
            return name
        pad = -self.data_bytes % 64
        if pad:
            self._data.write(b"\0" * pad)
            self.data_bytes += pad
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", str(self.data_bytes)), ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self._data.write(array.tobytes())
        self.data_bytes += array.nbytes
        self.inits.append(t)
        return name

    def float(self, array: np.ndarray | float, name: str) -> str:
        """A float weight in the export dtype."""
        return self.init(name, np.asarray(array, dtype=np.float32).astype(self.dtype))

    def const(self, values, dtype=np.int64) -> str:
        """A small cached constant (shapes, axes, scalars)."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            from onnx import numpy_helper

            name = self.fresh("const")
            self.inits.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", name: str | None = None,
           **attrs) -> str | list[str]:
        from onnx import helper

        base = self.fresh(name or op_type)
        outs = [base if outputs == 1 else f"{base}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, domain=domain or None, **attrs))
        return outs[0] if outputs == 1 else outs

    def node(self, op_type: str, inputs: list[str], outputs: list[str], domain: str = "", name: str | None = None,
             **attrs) -> list[str]:
        """A node with fixed output names ("" for an optional output left out)."""
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.fresh(name or op_type),
                                           domain=domain or None, **attrs))
        return outputs

    def output(self, op_type: str, out: str, *inputs: str, **attrs) -> str:
        """A node whose output is a graph output (fixed name)."""
        return self.node(op_type, list(inputs), [out], name=out, **attrs)[0]

    def close(self) -> None:
        self._data.close()


def _rms_norm(g: Graph, x: str, w: Weights, name: str, s: DecoderShape) -> str:
    """transformers' RMSNorm: in float32, x·rsqrt(mean(x²) + eps), then times the weight NAME in the model dtype;
    gemma's multiplies by (1 + w) in float32 before the cast."""
    from onnx import TensorProto

    half = g.dtype == np.float16
    xf = g.op("Cast", x, to=TensorProto.FLOAT) if half else x
    var = g.op("ReduceMean", g.op("Pow", xf, g.const(2.0, np.float32)), axes=[-1], keepdims=1)
    y = g.op("Div", xf, g.op("Sqrt", g.op("Add", var, g.const(s.eps, np.float32))))
    offset = s.family.norm_offset
    if offset:
        y = g.op("Mul", y, g.init(name, (w.tensor(name) + np.float32(offset)).astype(np.float32)))
        return g.op("Cast", y, to=TensorProto.FLOAT16) if half else y
    if half:
        y = g.op("Cast", y, to=TensorProto.FLOAT16)
    return g.op("Mul", y, g.float(w.tensor(name), name))


def fuse_linears(ws: list[LinearWeights]) -> LinearWeights | None:
    """Linears that share an input as one wider linear (Q rows stacked, R stacked, L block-diagonal), or None.

    The outputs are the same numbers: every output row keeps its own blocks, scales and zero points, and the
    zeros off L's diagonal blocks add exact zeros. It saves onnxruntime about 7 nodes per group and step.
    """
    if len(ws) < 2:
        return None
    kinds = {(w.q is not None, w.dense is not None, w.lora_l is not None, w.lora_lq is not None) for w in ws}
    if len(kinds) != 1:
        return None
    has_q, has_dense, has_lr, has_lrq = next(iter(kinds))
    if has_q and not _stackable([w.q for w in ws]):
        return None
    if has_lrq and not (_stackable([w.lora_rq for w in ws]) and _stackable([w.lora_lq for w in ws], same_k=False)
                        and ws[0].lora_lq.zero_points is None and ws[0].lora_lq.offsets is None):
        return None
    out = LinearWeights()
    sizes = [w.rows for w in ws]
    if has_q:
        out.q = _stack([w.q for w in ws])
    if has_lrq:  # R stacked; L block-diagonal, its off-diagonal blocks scale 0 (exact zeros under the default zp)
        out.lora_rq = _stack([w.lora_rq for w in ws])
        ls = [w.lora_lq for w in ws]
        out.lora_lq = NBitsWeight(ls[0].bits, ls[0].block_size, sum(sizes), sum(q.k for q in ls),
                                  _block_diagonal([q.B for q in ls]), _block_diagonal([q.scales for q in ls]), None)
    if has_dense:
        out.dense = np.concatenate([w.dense for w in ws])
    if has_lr:
        out.lora_r = np.concatenate([w.lora_r for w in ws])
        out.lora_l = _block_diagonal([w.lora_l for w in ws])
    if any(w.bias is not None for w in ws):
        out.bias = np.concatenate([w.bias if w.bias is not None else np.zeros(n, np.float32)
                                   for w, n in zip(ws, sizes, strict=True)])
    return out


def _stackable(qs: list[NBitsWeight], same_k: bool = True) -> bool:
    """Whether these MatMulNBits weights can be stacked row-wise into one (same bits, blocks, zero-point kind)."""
    kinds = {(q.bits, q.block_size, q.k if same_k else 0, None if q.zero_points is None else q.zero_points.dtype,
              q.offsets is None) for q in qs}
    return len(kinds) == 1


def _block_diagonal(parts: list[np.ndarray]) -> np.ndarray:
    """PARTS on the diagonal of their first two axes, zeros elsewhere (any trailing axes are shared)."""
    out = np.zeros((sum(p.shape[0] for p in parts), sum(p.shape[1] for p in parts), *parts[0].shape[2:]),
                   parts[0].dtype)
    row = col = 0
    for p in parts:
        out[row : row + p.shape[0], col : col + p.shape[1]] = p
        row, col = row + p.shape[0], col + p.shape[1]
    return out


def _stack(qs: list[NBitsWeight]) -> NBitsWeight:
    q0 = qs[0]
    zp = None if q0.zero_points is None else np.concatenate([q.zero_points for q in qs])
    offsets = None if q0.offsets is None else np.concatenate([q.offsets for q in qs])
    return NBitsWeight(q0.bits, q0.block_size, sum(q.n for q in qs), q0.k, np.concatenate([q.B for q in qs]),
                       np.concatenate([q.scales for q in qs]), zp, offsets)


def _linears(g: Graph, x: str, ws: list[LinearWeights], names: list[str], fuse: bool, split: bool = True) -> list[str]:
    """Several linears of one input: one fused node group and a Split when they fit together (SPLIT False: the
    fused output alone, its parts side by side along the last axis)."""
    fused = fuse_linears(ws) if fuse else None
    if fused is None:
        return [_linear(g, x, w, n) for w, n in zip(ws, names, strict=True)]
    sizes = [w.rows for w in ws]
    y = _linear(g, x, fused, "+".join(names))
    return g.op("Split", y, g.const(sizes), axis=-1, outputs=len(ws)) if split else [y]


def _linear(g: Graph, x: str, w: LinearWeights, name: str) -> str:
    """y = Q·x (+ b) + L·(R·x), in the order QLRLinear computes it."""
    y = None
    if w.q is not None:
        y = _matmul_nbits(g, x, w.q, nbits_inits(g, w.q, name), name)
    elif w.dense is not None:
        y = g.op("MatMul", x, g.float(w.dense.T, name + ".weight_t"), name=name)
    if w.bias is not None and y is not None:
        y = g.op("Add", y, g.float(w.bias, name + ".bias"))
    if w.has_lowrank:
        if w.lora_rq is not None and w.lora_lq is not None:
            rx = _matmul_nbits(g, x, w.lora_rq, nbits_inits(g, w.lora_rq, name + ".lora_r"), name + ".lora_r")
            low = _matmul_nbits(g, rx, w.lora_lq, nbits_inits(g, w.lora_lq, name + ".lora_l"), name + ".lora_l")
        else:
            rx = g.op("MatMul", x, g.float(w.lora_r.T, name + ".lora_r_t"), name=name + ".r")
            low = g.op("MatMul", rx, g.float(w.lora_l.T, name + ".lora_l_t"), name=name + ".l")
        y = low if y is None else g.op("Add", y, low)
        if w.q is None and w.dense is None and w.bias is not None:
            y = g.op("Add", y, g.float(w.bias, name + ".bias"))
    if y is None:
        raise LrdError(f"linear {name} has neither Q nor L·R")
    return y


def nbits_inits(g: Graph, q: NBitsWeight, name: str) -> dict[str, str]:
    """The initializers of one MatMulNBits weight (B, scales, zero points, split-off offsets), by role."""
    inits = {"B": g.init(name + ".q.B", q.B), "scales": g.init(name + ".q.scales", q.scales.astype(g.dtype))}
    if q.zero_points is not None:
        zp = q.zero_points if q.zero_points.dtype == np.uint8 else q.zero_points.astype(g.dtype)
        inits["zero_points"] = g.init(name + ".q.zero_points", zp)
    if q.offsets is not None:
        inits["offsets_t"] = g.float(q.offsets.T, name + ".q.offsets_t")
    return inits


def _matmul_nbits(g: Graph, x: str, q: NBitsWeight, inits: dict[str, str], name: str) -> str:
    """MatMulNBits(x), minus BlockSum(x)·offsetsᵀ where the affine offsets were split off."""
    inputs = [x, inits["B"], inits["scales"]] + ([inits["zero_points"]] if "zero_points" in inits else [])
    extra = {"accuracy_level": g.accuracy_level} if g.accuracy_level else {}
    y = g.op("MatMulNBits", *inputs, domain=MS_DOMAIN, name=name + ".q", K=q.k, N=q.n, bits=q.bits,
             block_size=q.block_size, **extra)
    if q.offsets is not None:
        kb = q.k // q.block_size
        sums = g.op("ReduceSum", g.op("Reshape", x, g.const([0, 0, kb, q.block_size])), g.const([-1]), keepdims=0)
        y = g.op("Sub", y, g.op("MatMul", sums, inits["offsets_t"]))
    return y


@dataclass
class Vocab:
    """How the graph holds the embedding and the head: MatMulNBits initializers (quantized, shared when tied) or a
    float matrix; `formats` says what each is, for the export's JSON."""

    embed_q: NBitsWeight | None
    embed_inits: dict[str, str]  # quantized: B/scales/... ; float: {"W": name}
    head_q: NBitsWeight | None
    head_inits: dict[str, str]
    formats: dict[str, str]


def vocab_weights(g: Graph, s: DecoderShape, w: Weights) -> Vocab:
    """The embedding and head initializers. A stored block format with an exact MatMulNBits form stays quantized
    (GatherBlockQuantized for the lookup, MatMulNBits for the head); anything else is a float matrix in the graph's
    dtype. A tied model holds one copy, which the lookup reads through a Reshape."""
    from lrdeploy.compressor.embeddings import EMBED, HEAD

    def one(name: str, role: str) -> tuple[NBitsWeight | None, dict[str, str], str]:
        fmt, q = w.blocks(name)
        if q is not None:
            kind = f"{fmt} as {q.bits}-bit {'GatherBlockQuantized' if role == 'embed' else 'MatMulNBits'}"
            return q, nbits_inits(g, q, name.removesuffix(".weight")), kind
        why = f"stored {fmt}, no exact quantized form" if fmt and fmt not in ("float16", "float32", "bfloat16") else ""
        kind = f"{np.dtype(g.dtype).name} matrix" + (f" ({why})" if why else "")
        return None, {"W": g.float(w.tensor(name), name)}, kind

    eq, einits, ekind = one(EMBED, "embed")
    if s.tie or not w.has(HEAD):
        v = Vocab(eq, einits, eq, einits, {"embed": ekind, "head": "tied to the embedding"})
    else:
        hq, hinits, hkind = one(HEAD, "head")
        v = Vocab(eq, einits, hq, hinits, {"embed": ekind, "head": hkind})
    return v


def _embed(g: Graph, s: DecoderShape, v: Vocab) -> str:
    """The token embeddings of input_ids [B, S, hidden] (times gemma's √hidden)."""
    q = v.embed_q
    if q is None:
        x = g.op("Gather", v.embed_inits["W"], "input_ids", axis=0)
    else:
        kb = q.k // q.block_size
        data = g.op("Reshape", v.embed_inits["B"], g.const([q.n, kb * q.block_size * q.bits // 8]))
        inputs = [data, "input_ids", v.embed_inits["scales"]]
        if "zero_points" in v.embed_inits:
            inputs.append(v.embed_inits["zero_points"])
        x = g.op("GatherBlockQuantized", *inputs, domain=MS_DOMAIN, bits=q.bits, block_size=q.block_size,
                 gather_axis=0, quantize_axis=1)
        if q.offsets is not None:  # (code − zp)·scale − offset: the offsets of the looked-up rows, per block
            offsets = g.op("Transpose", v.embed_inits["offsets_t"], perm=[1, 0])
            per_block = g.op("Unsqueeze", g.op("Gather", offsets, "input_ids", axis=0), g.const([-1]))
            blocks = g.op("Reshape", x, g.const([0, 0, kb, q.block_size]))
            x = g.op("Reshape", g.op("Sub", blocks, per_block), g.const([0, 0, s.hidden]))
    if s.embed_scale is not None:
        x = g.op("Mul", x, g.const(s.embed_scale, g.dtype))
    return x


def _logits(g: Graph, s: DecoderShape, v: Vocab, x: str) -> None:
    """The graph output logits [B, K, vocab] from the final hidden states X [B, S, hidden]: the last K positions,
    K = the optional input logits_to_keep, whose default 0 keeps all S (what onnxruntime-genai and perplexity want).
    A prefill that only needs the next token feeds 1, so the head runs once per chunk instead of S times, and the
    chunk's [S, vocab] logits (100 MB for SmolLM2's 512-token chunks) are never made."""
    from onnx import numpy_helper

    g.inits.append(numpy_helper.from_array(np.array(0, np.int64), KEEP))  # an input with a default: an initializer
    seq = g.op("Shape", x, start=1, end=2)
    want = g.op("Reshape", KEEP, g.const([1]))
    keep = g.op("Where", g.op("Equal", want, g.const([0])), seq, g.op("Min", want, seq))
    x = g.op("Slice", x, g.op("Sub", seq, keep), seq, g.const([1]))
    if v.head_q is not None:
        _matmul_nbits(g, x, v.head_q, v.head_inits, "lm_head")
        g.nodes[-1].output[0] = "logits"  # the last node (MatMulNBits, or the offsets' Sub) writes the output
        return
    flat = g.op("Gemm", g.op("Reshape", x, g.const([-1, s.hidden])), v.head_inits["W"], transB=1)
    out_shape = g.op("Concat", g.op("Shape", x, end=2), g.const([s.vocab]), axis=0)
    g.output("Reshape", "logits", flat, out_shape)


def _rotate(g: Graph, x: str, cos: str, sin: str, rot: int, dim: int) -> str:
    """x·cos + rotate_half(x)·sin, rotate_half(x) = [−x₂, x₁] (the non-interleaved RoPE of llama and qwen2), on the
    first ROT of DIM dims; the rest pass through (phi3's partial rotary)."""
    rest = None
    if rot < dim:
        x, rest = g.op("Split", x, g.const([rot, dim - rot]), axis=-1, outputs=2)
    x1, x2 = g.op("Split", x, g.const([rot // 2, rot // 2]), axis=-1, outputs=2)
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    y = g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))
    return y if rest is None else g.op("Concat", y, rest, axis=-1)


def _gelu_tanh(g: Graph, x: str) -> str:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))): torch's gelu(approximate='tanh')."""
    c = g.const(math.sqrt(2.0 / math.pi), g.dtype)
    inner = g.op("Mul", c, g.op("Add", x, g.op("Mul", g.const(0.044715, g.dtype), g.op("Mul", x, g.op("Mul", x, x)))))
    return g.op("Mul", g.op("Mul", g.const(0.5, g.dtype), x), g.op("Add", g.const(1.0, g.dtype), g.op("Tanh", inner)))


def _io(name: str, elem: int, dims: list) -> object:
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, dims)


def decoder_io(s: DecoderShape, elem: int, position_ids: bool = True) -> tuple[list, list]:
    """Graph inputs and outputs under onnxruntime-genai's names (past_key_values.N.*, present.N.*)."""
    from onnx import TensorProto

    D, KV = s.head_dim, s.kv_heads
    inputs = [
        _io("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        _io("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    if position_ids:
        inputs.append(_io("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
    inputs.append(_io(KEEP, TensorProto.INT64, []))  # optional: its initializer (0, every position) is the default
    outputs = [_io("logits", elem, ["batch_size", "logits_length", s.vocab])]
    for i in range(s.layers):
        for kind in ("key", "value"):
            inputs.append(_io(f"past_key_values.{i}.{kind}", elem, ["batch_size", KV, "past_sequence_length", D]))
            outputs.append(_io(f"present.{i}.{kind}", elem, ["batch_size", KV, "total_sequence_length", D]))
    return inputs, outputs


def decoder_model(g: Graph, inputs: list, outputs: list):
    from onnx import helper

    graph = helper.make_graph(g.nodes, "lrdeploy_decoder", inputs, outputs, g.inits)
    model = helper.make_model(graph, producer_name="lrdeploy",
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = IR_VERSION
    return model


def build_decoder(g: Graph, s: DecoderShape, w: Weights, fuse: bool = True) -> tuple[object, dict[str, str]]:
    """The plain decoder graph: attention, masks, RoPE and RMSNorm from standard ONNX ops; the KV cache grows by a
    Concat per step (so past and present are separate tensors). Returns (model, how it holds embedding and head)."""
    inputs, outputs = decoder_io(s, g.onnx_dtype)
    vocab = vocab_weights(g, s, w)
    x = _embed(g, s, vocab)
    tables = _rope_tables(g, s)
    masks = _masks(g, s)
    scale = g.const(s.attn_scale, g.dtype)
    for i in range(s.layers):
        kind = s.layer_types[i]
        x = _block(g, s, w, f"model.layers.{i}.", i, x, tables[kind], masks[kind], scale, fuse)
    _logits(g, s, vocab, _rms_norm(g, x, w, "model.norm.weight", s))
    return decoder_model(g, inputs, outputs), vocab.formats


def _rope_tables(g: Graph, s: DecoderShape) -> dict[str, tuple[str, str]]:
    """cos and sin [B, 1, S, rotary_dim] per layer kind, computed as the torch module does: float32 products, then
    cos/sin, times the rope's attention scaling."""
    from onnx import TensorProto

    pos = g.op("Unsqueeze", g.op("Cast", "position_ids", to=TensorProto.FLOAT), g.const([-1]))
    tables = {}
    for kind, (inv_freq, rope_scale) in sorted(s.rope.items()):
        freqs = g.op("Mul", pos, g.const(inv_freq, np.float32))
        emb = g.op("Concat", freqs, freqs, axis=-1)
        cos, sin = g.op("Cos", emb), g.op("Sin", emb)
        if rope_scale != 1.0:
            cos, sin = (g.op("Mul", t, g.const(rope_scale, np.float32)) for t in (cos, sin))
        if g.onnx_dtype == TensorProto.FLOAT16:
            cos, sin = (g.op("Cast", t, to=TensorProto.FLOAT16) for t in (cos, sin))
        tables[kind] = tuple(g.op("Unsqueeze", t, g.const([1])) for t in (cos, sin))
    return tables


def _masks(g: Graph, s: DecoderShape) -> dict[str, str]:
    """Additive masks [B, 1, G·S, T] per layer kind: causal over absolute positions (and within the sliding window
    for sliding layers), padding from attention_mask, rows repeated per query group."""
    from onnx import TensorProto

    seq = g.op("Squeeze", g.op("Shape", "input_ids", start=1, end=2), g.const([0]))
    total = g.op("Squeeze", g.op("Shape", "attention_mask", start=1, end=2), g.const([0]))
    past = g.op("Sub", total, seq)
    q_pos = g.op("Unsqueeze", g.op("Range", past, total, g.const(1)), g.const([-1]))  # [S, 1]
    k_pos = g.op("Range", g.const(0), total, g.const(1))  # [T]
    causal = g.op("LessOrEqual", k_pos, q_pos)
    keep = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.const([1, 2])), to=TensorProto.BOOL)  # [B,1,1,T]
    neg = float(np.finfo(np.float32).min)
    groups = s.heads // s.kv_heads
    masks = {}
    for kind in sorted(set(s.layer_types)):
        allowed = causal
        if kind == "sliding_attention" and s.sliding_window is not None:
            allowed = g.op("And", allowed, g.op("Greater", k_pos, g.op("Sub", q_pos, g.const(s.sliding_window))))
        allowed = g.op("And", allowed, keep)  # [B, 1, S, T]
        mask = g.op("Where", allowed, g.const(0.0, np.float32), g.const(neg, np.float32))
        masks[kind] = g.op("Tile", mask, g.const([1, 1, groups, 1])) if groups > 1 else mask
    return masks


def _block(g: Graph, s: DecoderShape, w: Weights, p: str, i: int, x: str, rope: tuple[str, str], mask: str,
           scale: str, fuse: bool) -> str:
    """One decoder block as the registry describes it: pre-norms, optional sandwich norms, fused or separate
    q/k/v and gate/up, q/k norms, partial RoPE, the family's activation."""
    from onnx import TensorProto

    fam, f = s.family, g.onnx_dtype
    D, H, KV = s.head_dim, s.heads, s.kv_heads
    cos, sin = rope
    h = _rms_norm(g, x, w, p + fam.attn_norm + ".weight", s)
    names = [p + n for n in fam.attn_in]
    qkv = _linears(g, h, [w.linear(n) for n in names], names, fuse)
    if fam.fused_qkv:
        qkv = g.op("Split", qkv[0], g.const([H * D, KV * D, KV * D]), axis=-1, outputs=3)
    heads = {}
    for proj, n, t in zip("qkv", (H, KV, KV), qkv, strict=True):
        t = g.op("Reshape", t, g.const([0, 0, n, D]))  # [B, S, n, D]
        if fam.qk_norm and proj in ("q", "k"):
            t = _rms_norm(g, t, w, p + f"self_attn.{proj}_norm.weight", s)
        t = g.op("Transpose", t, perm=[0, 2, 1, 3])  # [B, n, S, D]
        if proj != "v":
            t = _rotate(g, t, cos, sin, s.rotary_dim, D)
        heads[proj] = t
    k = g.output("Concat", f"present.{i}.key", f"past_key_values.{i}.key", heads["k"], axis=2)
    v = g.output("Concat", f"present.{i}.value", f"past_key_values.{i}.value", heads["v"], axis=2)
    q = g.op("Mul", g.op("Reshape", heads["q"], g.const([0, KV, -1, D])), scale)  # [B, KV, G·S, D]
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))  # [B, KV, G·S, T]
    if f == TensorProto.FLOAT16:
        scores = g.op("Cast", scores, to=TensorProto.FLOAT)
    probs = g.op("Softmax", g.op("Add", scores, mask), axis=-1)
    if f == TensorProto.FLOAT16:
        probs = g.op("Cast", probs, to=f)
    ctx = g.op("Reshape", g.op("MatMul", probs, v), g.const([0, H, -1, D]))  # [B, H, S, D]
    ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.const([0, 0, H * D]))
    attn = _linear(g, ctx, w.linear(p + archs.O_PROJ), p + archs.O_PROJ)
    if fam.post_attn_norm:
        attn = _rms_norm(g, attn, w, p + fam.post_attn_norm + ".weight", s)
    x = g.op("Add", x, attn)
    mlp = mlp_branch(g, s, w, p, _rms_norm(g, x, w, p + fam.mlp_norm + ".weight", s), fuse)
    if fam.post_mlp_norm:
        mlp = _rms_norm(g, mlp, w, p + fam.post_mlp_norm + ".weight", s)
    return g.op("Add", x, mlp)


def mlp_branch(g: Graph, s: DecoderShape, w: Weights, p: str, h: str, fuse: bool) -> str:
    """down(act(gate(h)) · up(h)), gate and up fused where they fit (phi3 stores them fused)."""
    fam = s.family
    names = [p + n for n in fam.mlp_in]
    gate_up = _linears(g, h, [w.linear(n) for n in names], names, fuse)
    gate, up = g.op("Split", gate_up[0], axis=-1, outputs=2) if fam.fused_gate_up else gate_up
    act = _gelu_tanh(g, gate) if fam.activation == "gelu_tanh" else g.op("Mul", gate, g.op("Sigmoid", gate))
    down_in = g.op("Mul", act, up)
    if w.down_rotation is not None:
        down_in = _input_rotation(g, down_in, w.down_rotation)
    return _linear(g, down_in, w.linear(p + archs.DOWN), p + archs.DOWN)


def _input_rotation(g: Graph, x: str, rot) -> str:
    """x·B for B = diag(Hb, …, Hb) (--rotate-down): Reshape to blocks, one MatMul with the shared Hb, Reshape back.
    x is [batch, seq, width]; Hb is one initializer for every layer."""
    key = ("rotation", rot.block, rot.seed)
    if key not in g._consts:
        g._consts[key] = g.float(rot.matrix.numpy(), "down_rotation")
    blocks = g.op("Reshape", x, g.const([0, 0, -1, rot.block]))
    return g.op("Reshape", g.op("MatMul", blocks, g._consts[key]), g.op("Shape", x))


# ----------------------------------------------------------------------------------------------------------------------
# the driver


def _open_weights(source: str, zero_points: str) -> tuple[object, Weights, object, dict | None]:
    """(config, weights, tokenizer, manifest or None) of an artifact or a plain model source."""
    from lrdeploy.artifact import ArtifactTensors, artifact_tokenizer, is_artifact, read_manifest

    if is_artifact(source):
        from transformers import AutoConfig

        manifest = read_manifest(Path(source))
        try:
            config = AutoConfig.from_pretrained(str(source))
        except Exception as e:
            raise LrdError(f"cannot read {Path(source) / 'config.json'}: {e}") from None
        get = ArtifactTensors(Path(source), manifest, "cpu")
        w = Weights(get, get.has, manifest["linears"], get.raw, zero_points, manifest.get("tensors"))
        from lrdeploy.compressor.rotate import MANIFEST_KEY, InputRotation

        w.down_rotation = InputRotation.from_record(manifest.get(MANIFEST_KEY))
        return config, w, artifact_tokenizer(source), manifest
    from lrdeploy.compressor.sources import open_source

    src = open_source(source)
    return src.config, Weights(src.tensor, src.has, None, None, zero_points), src.tokenizer(), None


def genai_config(s: DecoderShape, config, tokenizer, fused: bool = False, ep: str = "cpu") -> dict:
    """onnxruntime-genai's genai_config.json for this graph. The fused graph shares one past/present buffer per layer
    and takes no position_ids; the plain graph's cache grows by a Concat per step. A file built for the CUDA EP asks
    onnxruntime-genai for it, as the builder's `-e cuda` does."""
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    bos = getattr(config, "bos_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": s.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai",
                                    "provider_options": [{"cuda": {}}] if ep == "cuda" else []},
                "filename": MODEL_FILE,
                "head_size": s.head_dim,
                "hidden_size": s.hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    **({} if fused else {"position_ids": "position_ids"}),
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": s.heads,
                "num_hidden_layers": s.layers,
                "num_key_value_heads": s.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": s.arch,
            "vocab_size": s.vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": s.context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": fused,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _save(model, g: Graph, tmp: Path) -> None:
    """Write model.onnx beside its weights in model.onnx.data. onnxruntime maps an external data file instead of
    copying every weight out of the protobuf: SmolLM2's q4_0 export holds 90 MiB after load this way, 137 MiB
    inline."""
    import onnx

    g.close()
    onnx.save_model(model, str(tmp / MODEL_FILE))
    problem = graph_problem(tmp / MODEL_FILE)
    if problem is not None:
        raise LrdError(f"the exported graph does not validate: {problem}")


# onnxruntime registers these in the default domain, which onnx's checker knows only up to its own opsets
ORT_DEFAULT_DOMAIN_OPS = ("SimplifiedLayerNormalization",)


def graph_problem(path: Path) -> str | None:
    """onnx's checker over the graph at PATH and its weight files, or the first line of what it found.

    onnxruntime's own default-domain ops are checked as the contrib ops they are (the checker skips custom domains
    but rejects an op it does not know in its own): a copy of the graph with those nodes moved is checked beside
    the original, where its external weights resolve."""
    import tempfile

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:  # the checker looks for an external file, not at its extent
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            data = Path(path).parent / info.get("location", "")
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            if data.is_file() and data.stat().st_size < end:
                return f"initializer {t.name} ends at byte {end} of {data.name}, which holds {data.stat().st_size}"
    moved = False
    for node in model.graph.node:
        if node.op_type in ORT_DEFAULT_DOMAIN_OPS and not node.domain:
            node.domain, moved = MS_DOMAIN, True
    try:
        if not moved:
            onnx.checker.check_model(str(path))
            return None
        fd, copy = tempfile.mkstemp(suffix=".onnx", prefix=".check-", dir=Path(path).parent)
        os.close(fd)
        try:
            onnx.save_model(model, copy)
            onnx.checker.check_model(copy)
        finally:
            os.unlink(copy)
    except onnx.checker.ValidationError as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def kernel_notes(manifest: dict | None, vocab: dict[str, str], settings: EpSettings) -> list[str]:
    """What the export's MatMulNBits forms cost on onnxruntime's CPU kernels (tools/bench_nbits.py measured them):
    said in the export's JSON and by `lrdeploy inspect`. None for a file built for the CUDA EP."""
    if settings.ep != "cpu":
        return []
    formats = {e["q_format"] for e in (manifest or {}).get("linears", {}).values()}
    notes = []
    if "q2_k" in formats:
        notes.append("q2_k is stored as 4-bit codes with its offsets split off: onnxruntime's CPU MatMulNBits has "
                     "fast 2-bit kernels only for blocks of 32 or more weights with int8 activations, and q2_k's "
                     "16-weight sub-blocks at 2 bits would be dequantized on every call")
    eight = sorted(f for f in formats if f == "q8_0" or f.startswith("iq")) + sorted(
        v.split(" as ")[0] for v in vocab.values() if " as 8-bit" in v)
    if eight and settings.accuracy_level != 4:
        notes.append(f"{', '.join(dict.fromkeys(eight))} run as 8-bit MatMulNBits, which onnxruntime's CPU kernel "
                     "dequantizes on every call unless activations are int8 (the default CPU export; --exact keeps "
                     "them float): decode can fall below the fp32 export's speed; the default export without "
                     "--exact, or a 4-bit grid (--fallback q4_0, --target onnx) avoids it")
    return notes


def export_onnx(source: str, out_dir: Path, *, ep: str = "auto", exact: bool = False, dtype: str | None = None,
                force: bool = False, zero_points: str = "auto", fuse: bool = True, graph: str = "auto") -> dict:
    """Export an artifact (split Q + L·R linears) or a model source (dense baseline) to OUT_DIR/model.onnx.

    graph: "fused" (onnxruntime's GroupQueryAttention and fused RMSNorms, exporters/onnx_fused.py), "plain"
    (standard ONNX ops around MatMulNBits), or "auto": fused where the model fits it, else plain.
    ep, exact, dtype: what the file is built for (ep_settings): by default the CPU EP's fastest setting (int8
    activations, not bit-exact); exact=True reproduces the artifact's logits.
    zero_points: see nbits_from_ggml (benchmarks compare "auto" with "float"); fuse: q/k/v and gate/up as one
    wider linear each (same numbers, fewer nodes).
    """
    t0 = time.perf_counter()
    settings = ep_settings(ep, exact, dtype)
    if zero_points not in ZERO_POINTS:
        raise LrdError(f"unknown zero_points '{zero_points}'; choose one of {', '.join(ZERO_POINTS)}")
    if graph not in GRAPHS:
        raise LrdError(f"unknown ONNX graph '{graph}'; choose one of {', '.join(GRAPHS)}")
    out = Path(out_dir)
    with output_lock(out):  # before OUT and OUT.partial are looked at: a second export must not touch them
        return _export(source, out, settings, force, zero_points, fuse, graph, t0)


def _export(source: str, out: Path, settings: EpSettings, force: bool, zero_points: str, fuse: bool, graph: str,
            t0: float) -> dict:
    from lrdeploy.exporters.onnx_fused import build_fused_decoder, fused_problem

    if out.exists() and not force:
        raise LrdError(f"{out} already exists; pass --force to overwrite it")
    config, weights, tokenizer, manifest = _open_weights(source, zero_points)
    shape = decoder_shape(config)
    problem = fused_problem(shape)
    if graph == "fused" and problem is not None:
        raise LrdError(f"the fused ONNX graph does not fit {shape.arch}: {problem}; export with --graph plain")
    fused = graph != "plain" and problem is None
    with staged_output(out, force) as tmp:
        dtype = settings.dtype
        g = Graph(tmp / DATA_FILE, DTYPES[dtype], settings.accuracy_level)
        try:
            model, vocab = (build_fused_decoder if fused else build_decoder)(g, shape, weights, fuse)
        finally:
            g.close()
        _save(model, g, tmp)
        tokenizer.save_pretrained(str(tmp))
        config.save_pretrained(str(tmp))
        genai = genai_config(shape, config, tokenizer, fused, settings.ep)
        (tmp / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n")
        counts = weights.counts
        notes = kernel_notes(manifest, vocab, settings)
        bpw = None if manifest is None else manifest["summary"]["bpw"]
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {
            "format": META_FORMAT,
            "version": META_VERSION,
            "source": str(source),
            "kind": "uncompressed" if manifest is None else "artifact",
            "method": None if manifest is None else manifest.get("method"),
            "ep": settings.ep,
            "exact": settings.exact,
            "built_for": settings.note(),
            "dtype": dtype,
            "zero_points": zero_points,
            "fused": fuse,
            "graph": "fused" if fused else "plain",
            "plain_because": None if fused or graph == "plain" else problem,
            "kv_cache": "shared buffer" if fused else "grows by concatenation",
            "vocab": vocab,
            "notes": notes,
            "accuracy_level": settings.accuracy_level,
            "bpw": bpw,
            "opset": OPSET,
            "ir_version": IR_VERSION,
            "linears": counts,
            "graph_nodes": len(model.graph.node),
            "model_bytes": sum(v for k, v in files.items() if k.startswith(MODEL_FILE)),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    seconds = time.perf_counter() - t0
    iq = f" ({counts['iquant_8bit']} i-quants as exact 8-bit codes)" if counts["iquant_8bit"] else ""
    what = (f"{counts['matmulnbits']} linears as MatMulNBits{iq}, {counts['lowrank']} with L·R, artifact bpw "
            f"{bpw:.3f} (`lrdeploy inspect` gives the file's)"
            if manifest is not None else f"{counts['dense']} dense MatMuls (uncompressed baseline)")
    how = f"{meta['graph']} graph" + (f" ({meta['plain_because']})" if meta["plain_because"] else "")
    built = "exact" if settings.exact else f"for the {settings.ep.upper()} EP" + (
        ", int8 activations" if settings.accuracy_level == 4 else "")
    message = (f"wrote {out / MODEL_FILE} ({meta['model_bytes'] / 1e6:.1f} MB, {dtype}, {built}, {shape.layers} "
               f"layers, {how}): "
               f"{what}; embedding {vocab['embed']}, head {vocab['head']}; in {seconds:.1f} s")
    keys = ("kind", "ep", "exact", "accuracy_level", "built_for", "dtype", "zero_points", "bpw", "graph",
            "plain_because", "kv_cache", "vocab", "notes")
    return {"output": str(out), "format": "onnx", **{k: meta[k] for k in keys},
            "linears": counts, "model_bytes": meta["model_bytes"], "seconds": round(seconds, 2), "message": message}

