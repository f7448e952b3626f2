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

The graph is plain ONNX (opset 17) apart from MatMulNBits; embeddings and norms keep their float values. The
directory also holds the tokenizer, config.json, genai_config.json (onnxruntime-genai) and lrdeploy_onnx.json.
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
from lrdeploy.files import ONNX_META as META_FILE
from lrdeploy.files import ONNX_MODEL as MODEL_FILE
from lrdeploy.io import output_lock, staged_output

OPSET = 17
IR_VERSION = 8  # onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads at most 13
MS_DOMAIN = "com.microsoft"
META_FORMAT = "lrdeploy-onnx"
INLINE_LIMIT = 1 << 30  # weights below this many bytes live inside model.onnx; above, in model.onnx.data
DTYPES = {"fp32": np.float32, "fp16": np.float16}
ZERO_POINTS = ("auto", "uint8", "float")
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


class Weights:
    """Reads the tensors of an artifact (split linears) or of a plain model source (dense linears)."""

    def __init__(self, tensor: Callable[[str], torch.Tensor], has: Callable[[str], bool],
                 linears: dict | None, raw: Callable[[str], torch.Tensor] | None, zero_points: str):
        self._tensor, self._has, self.linears, self._raw, self.zero_points = tensor, has, linears, raw, zero_points
        # linears by how the graph computes them; "iquant_8bit" counts the MatMulNBits that hold an i-quant at 8 bits
        self.counts = {"matmulnbits": 0, "lowrank": 0, "dense": 0, "iquant_8bit": 0}

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
            out.lora_l, out.lora_r = self.tensor(name + ".lora_l"), self.tensor(name + ".lora_r")
            self.counts["lowrank"] += 1
        return out


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

    def output(self, op_type: str, out: str, *inputs: str, **attrs) -> str:
        """A node whose output is a graph output (fixed name)."""
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.fresh(out), **attrs))
        return out

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
    kinds = {(w.q is not None, w.dense is not None, w.lora_l is not None) for w in ws}
    if len(kinds) != 1:
        return None
    has_q, has_dense, has_lr = next(iter(kinds))
    if has_q:
        qs = [w.q for w in ws if w.q is not None]
        zps = {(None if q.zero_points is None else q.zero_points.dtype, q.offsets is None) for q in qs}
        if len({(q.bits, q.block_size, q.k) for q in qs}) != 1 or len(zps) != 1:
            return None
    out = LinearWeights()
    sizes = [(w.q.n if w.q is not None else w.dense.shape[0] if w.dense is not None else w.lora_l.shape[0])
             for w in ws]
    if has_q:
        q0 = qs[0]
        zp = None if q0.zero_points is None else np.concatenate([q.zero_points for q in qs])
        offsets = None if q0.offsets is None else np.concatenate([q.offsets for q in qs])
        out.q = NBitsWeight(q0.bits, q0.block_size, sum(sizes), q0.k, np.concatenate([q.B for q in qs]),
                            np.concatenate([q.scales for q in qs]), zp, offsets)
    if has_dense:
        out.dense = np.concatenate([w.dense for w in ws])
    if has_lr:
        out.lora_r = np.concatenate([w.lora_r for w in ws])
        ranks = [w.lora_r.shape[0] for w in ws]
        out.lora_l = np.zeros((sum(sizes), sum(ranks)), np.float32)
        row = col = 0
        for w, n, r in zip(ws, sizes, ranks, strict=True):
            out.lora_l[row : row + n, col : col + r] = w.lora_l
            row, col = row + n, col + r
    if any(w.bias is not None for w in ws):
        out.bias = np.concatenate([w.bias if w.bias is not None else np.zeros(n, np.float32)
                                   for w, n in zip(ws, sizes, strict=True)])
    return out


def _linears(g: Graph, x: str, ws: list[LinearWeights], names: list[str], fuse: bool) -> list[str]:
    """Several linears of one input: one fused node group and a Split when they fit together."""
    fused = fuse_linears(ws) if fuse else None
    if fused is None:
        return [_linear(g, x, w, n) for w, n in zip(ws, names, strict=True)]
    sizes = [w.q.n if w.q is not None else w.dense.shape[0] if w.dense is not None else w.lora_l.shape[0]
             for w in ws]
    y = _linear(g, x, fused, "+".join(names))
    return g.op("Split", y, g.const(sizes), axis=-1, outputs=len(ws))


def _linear(g: Graph, x: str, w: LinearWeights, name: str) -> str:
    """y = Q·x (+ b) + L·(R·x), in the order QLRLinear computes it."""
    y = None
    if w.q is not None:
        q = w.q
        inputs = [x, g.init(name + ".q.B", q.B), g.init(name + ".q.scales", q.scales.astype(g.dtype))]
        if q.zero_points is not None:
            zp = q.zero_points if q.zero_points.dtype == np.uint8 else q.zero_points.astype(g.dtype)
            inputs.append(g.init(name + ".q.zero_points", zp))
        extra = {"accuracy_level": g.accuracy_level} if g.accuracy_level else {}
        y = g.op("MatMulNBits", *inputs, domain=MS_DOMAIN, name=name + ".q", K=q.k, N=q.n, bits=q.bits,
                 block_size=q.block_size, **extra)
        if q.offsets is not None:
            kb = q.k // q.block_size
            sums = g.op("ReduceSum", g.op("Reshape", x, g.const([0, 0, kb, q.block_size])), g.const([-1]),
                        keepdims=0)
            y = g.op("Sub", y, g.op("MatMul", sums, g.float(q.offsets.T, name + ".q.offsets_t")))
    elif w.dense is not None:
        y = g.op("MatMul", x, g.float(w.dense.T, name + ".weight_t"), name=name)
    if w.bias is not None and y is not None:
        y = g.op("Add", y, g.float(w.bias, name + ".bias"))
    if w.lora_l is not None and w.lora_r is not None:
        rx = g.op("MatMul", x, g.float(w.lora_r.T, name + ".lora_r_t"), name=name + ".r")
        low = g.op("MatMul", rx, g.float(w.lora_l.T, name + ".lora_l_t"), name=name + ".l")
        y = low if y is None else g.op("Add", y, low)
        if w.q is None and w.dense is None and w.bias is not None:
            y = g.op("Add", y, g.float(w.bias, name + ".bias"))
    if y is None:
        raise LrdError(f"linear {name} has neither Q nor L·R")
    return y


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


def build_decoder(g: Graph, s: DecoderShape, w: Weights, fuse: bool = True):
    """The whole decoder graph: inputs, outputs and nodes (genai's names: past_key_values.N.*, present.N.*)."""
    from onnx import TensorProto, helper

    f = g.onnx_dtype
    D, KV = s.head_dim, s.kv_heads
    inputs = [
        _io("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        _io("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        _io("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [_io("logits", f, ["batch_size", "sequence_length", s.vocab])]
    for i in range(s.layers):
        for kind in ("key", "value"):
            inputs.append(_io(f"past_key_values.{i}.{kind}", f, ["batch_size", KV, "past_sequence_length", D]))
            outputs.append(_io(f"present.{i}.{kind}", f, ["batch_size", KV, "total_sequence_length", D]))

    embed = g.float(w.tensor("model.embed_tokens.weight"), "model.embed_tokens.weight")
    x = g.op("Gather", embed, "input_ids", axis=0)
    if s.embed_scale is not None:
        x = g.op("Mul", x, g.const(s.embed_scale, g.dtype))
    tables = _rope_tables(g, s)
    masks = _masks(g, s)
    scale = g.const(s.attn_scale, g.dtype)
    for i in range(s.layers):
        kind = s.layer_types[i]
        x = _block(g, s, w, f"model.layers.{i}.", i, x, tables[kind], masks[kind], scale, fuse)

    x = _rms_norm(g, x, w, "model.norm.weight", s)
    head = embed if s.tie or not w.has("lm_head.weight") else g.float(w.tensor("lm_head.weight"), "lm_head.weight")
    flat = g.op("Gemm", g.op("Reshape", x, g.const([-1, s.hidden])), head, transB=1)
    out_shape = g.op("Concat", g.op("Shape", "input_ids"), g.const([s.vocab]), axis=0)
    g.output("Reshape", "logits", flat, out_shape)
    graph = helper.make_graph(g.nodes, "lrdeploy_decoder", inputs, outputs, g.inits)
    model = helper.make_model(graph, producer_name="lrdeploy",
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = IR_VERSION
    return model


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
    h = _rms_norm(g, x, w, p + fam.mlp_norm + ".weight", s)
    names = [p + n for n in fam.mlp_in]
    gate_up = _linears(g, h, [w.linear(n) for n in names], names, fuse)
    gate, up = g.op("Split", gate_up[0], axis=-1, outputs=2) if fam.fused_gate_up else gate_up
    act = _gelu_tanh(g, gate) if fam.activation == "gelu_tanh" else g.op("Mul", gate, g.op("Sigmoid", gate))
    mlp = _linear(g, g.op("Mul", act, up), w.linear(p + archs.DOWN), p + archs.DOWN)
    if fam.post_mlp_norm:
        mlp = _rms_norm(g, mlp, w, p + fam.post_mlp_norm + ".weight", s)
    return g.op("Add", x, mlp)


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
        w = Weights(get, get.has, manifest["linears"], get.raw, zero_points)
        return config, w, artifact_tokenizer(source), manifest
    from lrdeploy.compressor.sources import open_source

    src = open_source(source)
    return src.config, Weights(src.tensor, src.has, None, None, zero_points), src.tokenizer(), None


def genai_config(s: DecoderShape, config, tokenizer) -> dict:
    """onnxruntime-genai's genai_config.json for this graph (no shared past/present buffer: the cache grows)."""
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
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": s.head_dim,
                "hidden_size": s.hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
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
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _save(model, g: Graph, tmp: Path) -> None:
    """Write model.onnx; small models take their weights inline, large ones keep model.onnx.data beside them."""
    import onnx

    g.close()
    if g.data_bytes < INLINE_LIMIT:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(tmp))
        g.data_path.unlink()
    onnx.save_model(model, str(tmp / MODEL_FILE))
    try:
        onnx.checker.check_model(str(tmp / MODEL_FILE))
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LrdError(f"the exported graph does not validate: {first}") from None


def export_onnx(source: str, out_dir: Path, *, dtype: str = "fp32", force: bool = False,
                zero_points: str = "auto", fuse: bool = True, accuracy_level: int = 0) -> dict:
    """Export an artifact (split Q + L·R linears) or a model source (dense baseline) to OUT_DIR/model.onnx.

    zero_points: see nbits_from_ggml (benchmarks compare "auto" with "float"); fuse: q/k/v and gate/up as one
    wider linear each (same numbers, fewer nodes); accuracy_level: MatMulNBits' attribute, 0 (float activations,
    exact) by default; 4 lets onnxruntime's CPU kernel quantize activations to int8 (faster, no longer exact).
    """
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise LrdError(f"unknown ONNX dtype '{dtype}'; choose fp32 or fp16")
    if zero_points not in ZERO_POINTS:
        raise LrdError(f"unknown zero_points '{zero_points}'; choose one of {', '.join(ZERO_POINTS)}")
    out = Path(out_dir)
    with output_lock(out):  # before OUT and OUT.partial are looked at: a second export must not touch them
        return _export(source, out, dtype, force, zero_points, fuse, accuracy_level, t0)


def _export(source: str, out: Path, dtype: str, force: bool, zero_points: str, fuse: bool, accuracy_level: int,
            t0: float) -> dict:
    if out.exists() and not force:
        raise LrdError(f"{out} already exists; pass --force to overwrite it")
    config, weights, tokenizer, manifest = _open_weights(source, zero_points)
    shape = decoder_shape(config)
    with staged_output(out, force) as tmp:
        g = Graph(tmp / DATA_FILE, DTYPES[dtype], accuracy_level)
        try:
            model = build_decoder(g, shape, weights, fuse)
        finally:
            g.close()
        _save(model, g, tmp)
        tokenizer.save_pretrained(str(tmp))
        config.save_pretrained(str(tmp))
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(shape, config, tokenizer), indent=2) + "\n")
        counts = weights.counts
        bpw = None if manifest is None else manifest["summary"]["bpw"]
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {
            "format": META_FORMAT,
            "version": 1,
            "source": str(source),
            "kind": "uncompressed" if manifest is None else "artifact",
            "method": None if manifest is None else manifest.get("method"),
            "dtype": dtype,
            "zero_points": zero_points,
            "fused": fuse,
            "accuracy_level": accuracy_level,
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
    message = (f"wrote {out / MODEL_FILE} ({meta['model_bytes'] / 1e6:.1f} MB, {dtype}, {shape.layers} layers): "
               f"{what}, in {seconds:.1f} s")
    return {"output": str(out), "format": "onnx", **{k: meta[k] for k in ("kind", "dtype", "zero_points", "bpw")},
            "linears": counts, "model_bytes": meta["model_bytes"], "seconds": round(seconds, 2), "message": message}


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
