"""The ONNX graph builder and the parts both decoder graphs share: a small onnx.helper wrapper (`Graph`), RMSNorm,
the split linear y = MatMulNBits(x, Q) (+ b) + MatMul(MatMul(x, Rᵀ), Lᵀ), the embedding and head, the MLP branch and
the graph's inputs and outputs (onnxruntime-genai's names)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrdeploy.compressor import arch as archs
from lrdeploy.errors import LrdError
from lrdeploy.exporters.onnx.model import DecoderShape, LinearWeights, Weights, fuse_linears
from lrdeploy.exporters.onnx.nbits import NBitsWeight
from lrdeploy.files import ONNX_DATA as DATA_FILE
from lrdeploy.files import ONNX_KEEP as KEEP

OPSET = 17
IR_VERSION = 8  # onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads at most 13
MS_DOMAIN = "com.microsoft"


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
        self._shared: dict[tuple, str] = {}
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

    def shared(self, key: tuple, make: Callable[[], str]) -> str:
        """The initializer MAKE adds, made once per KEY (one rotation matrix for every layer's down_proj)."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

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


def rms_norm(g: Graph, x: str, w: Weights, name: str, s: DecoderShape) -> str:
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


def linears(g: Graph, x: str, ws: list[LinearWeights], names: list[str], fuse: bool, split: bool = True) -> list[str]:
    """Several linears of one input: one fused node group and a Split when they fit together (SPLIT False: the
    fused output alone, its parts side by side along the last axis)."""
    fused = fuse_linears(ws) if fuse else None
    if fused is None:
        return [linear(g, x, w, n) for w, n in zip(ws, names, strict=True)]
    sizes = [w.rows for w in ws]
    y = linear(g, x, fused, "+".join(names))
    return g.op("Split", y, g.const(sizes), axis=-1, outputs=len(ws)) if split else [y]


def linear(g: Graph, x: str, w: LinearWeights, name: str) -> str:
    """y = Q·x (+ b) + L·(R·x), in the order QLRLinear computes it."""
    y = None
    if w.q is not None:
        y = matmul_nbits(g, x, w.q, nbits_inits(g, w.q, name), name)
    elif w.dense is not None:
        y = g.op("MatMul", x, g.float(w.dense.T, name + ".weight_t"), name=name)
    if w.bias is not None and y is not None:
        y = g.op("Add", y, g.float(w.bias, name + ".bias"))
    if w.has_lowrank:
        if w.lora_rq is not None and w.lora_lq is not None:
            rx = matmul_nbits(g, x, w.lora_rq, nbits_inits(g, w.lora_rq, name + ".lora_r"), name + ".lora_r")
            low = matmul_nbits(g, rx, w.lora_lq, nbits_inits(g, w.lora_lq, name + ".lora_l"), name + ".lora_l")
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


def matmul_nbits(g: Graph, x: str, q: NBitsWeight, inits: dict[str, str], name: str) -> str:
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


def embed(g: Graph, s: DecoderShape, v: Vocab) -> str:
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


def logits(g: Graph, s: DecoderShape, v: Vocab, x: str) -> None:
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
        matmul_nbits(g, x, v.head_q, v.head_inits, "lm_head")
        g.nodes[-1].output[0] = "logits"  # the last node (MatMulNBits, or the offsets' Sub) writes the output
        return
    flat = g.op("Gemm", g.op("Reshape", x, g.const([-1, s.hidden])), v.head_inits["W"], transB=1)
    out_shape = g.op("Concat", g.op("Shape", x, end=2), g.const([s.vocab]), axis=0)
    g.output("Reshape", "logits", flat, out_shape)


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


def mlp_branch(g: Graph, s: DecoderShape, w: Weights, p: str, h: str, fuse: bool) -> str:
    """down(act(gate(h)) · up(h)), gate and up fused where they fit (phi3 stores them fused)."""
    fam = s.family
    names = [p + n for n in fam.mlp_in]
    gate_up = linears(g, h, [w.linear(n) for n in names], names, fuse)
    gate, up = g.op("Split", gate_up[0], axis=-1, outputs=2) if fam.fused_gate_up else gate_up
    act = _gelu_tanh(g, gate) if fam.activation == "gelu_tanh" else g.op("Mul", gate, g.op("Sigmoid", gate))
    down_in = g.op("Mul", act, up)
    if w.down_rotation is not None:
        down_in = input_rotation(g, down_in, w.down_rotation)
    return linear(g, down_in, w.linear(p + archs.DOWN), p + archs.DOWN)


def input_rotation(g: Graph, x: str, rot) -> str:
    """x·B for B = diag(Hb, …, Hb) (--rotate-down): Reshape to blocks, one MatMul with the shared Hb, Reshape back.
    x is [batch, seq, width]; Hb is one initializer for every layer."""
    matrix = g.shared(("rotation", rot.block, rot.seed), lambda: g.float(rot.matrix.numpy(), "down_rotation"))
    blocks = g.op("Reshape", x, g.const([0, 0, -1, rot.block]))
    return g.op("Reshape", g.op("MatMul", blocks, matrix), g.op("Shape", x))
