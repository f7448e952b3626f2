"""The plain decoder graph: opset 17 standard ops (attention, masks, RoPE, RMSNorm) around the contrib
MatMulNBits/GatherBlockQuantized, with a KV cache that grows by a Concat per step. It fits every family the
registry covers; the fused graph (fused.py) is the default wherever a model fits it."""

from __future__ import annotations

import numpy as np

from lrdeploy.compressor import arch as archs
from lrdeploy.exporters.onnx.graph import (
    Graph,
    decoder_io,
    decoder_model,
    embed,
    linear,
    linears,
    logits,
    mlp_branch,
    rms_norm,
    vocab_weights,
)
from lrdeploy.exporters.onnx.model import DecoderShape, Weights


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


def build_decoder(g: Graph, s: DecoderShape, w: Weights, fuse: bool = True) -> tuple[object, dict[str, str]]:
    """The plain decoder graph: attention, masks, RoPE and RMSNorm from standard ONNX ops; the KV cache grows by a
    Concat per step (so past and present are separate tensors). Returns (model, how it holds embedding and head)."""
    inputs, outputs = decoder_io(s, g.onnx_dtype)
    vocab = vocab_weights(g, s, w)
    x = embed(g, s, vocab)
    tables = _rope_tables(g, s)
    masks = _masks(g, s)
    scale = g.const(s.attn_scale, g.dtype)
    for i in range(s.layers):
        kind = s.layer_types[i]
        x = _block(g, s, w, f"model.layers.{i}.", i, x, tables[kind], masks[kind], scale, fuse)
    logits(g, s, vocab, rms_norm(g, x, w, "model.norm.weight", s))
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
    h = rms_norm(g, x, w, p + fam.attn_norm + ".weight", s)
    names = [p + n for n in fam.attn_in]
    qkv = linears(g, h, [w.linear(n) for n in names], names, fuse)
    if fam.fused_qkv:
        qkv = g.op("Split", qkv[0], g.const([H * D, KV * D, KV * D]), axis=-1, outputs=3)
    heads = {}
    for proj, n, t in zip("qkv", (H, KV, KV), qkv, strict=True):
        t = g.op("Reshape", t, g.const([0, 0, n, D]))  # [B, S, n, D]
        if fam.qk_norm and proj in ("q", "k"):
            t = rms_norm(g, t, w, p + f"self_attn.{proj}_norm.weight", s)
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
    attn = linear(g, ctx, w.linear(p + archs.O_PROJ), p + archs.O_PROJ)
    if fam.post_attn_norm:
        attn = rms_norm(g, attn, w, p + fam.post_attn_norm + ".weight", s)
    x = g.op("Add", x, attn)
    mlp = mlp_branch(g, s, w, p, rms_norm(g, x, w, p + fam.mlp_norm + ".weight", s), fuse)
    if fam.post_mlp_norm:
        mlp = rms_norm(g, mlp, w, p + fam.post_mlp_norm + ".weight", s)
    return g.op("Add", x, mlp)
