"""The fused ONNX decoder: onnxruntime's contrib ops where its CPU and CUDA EPs have kernels, around the same split
Q + L·R linears as the plain graph (plain.py).

* GroupQueryAttention does the grouped heads, the causal (and sliding-window) mask, RoPE from cos/sin tables and
  the KV cache in one node. Under onnxruntime-genai's past_present_share_buffer, past and present are one
  preallocated buffer [batch, kv_heads, capacity, head_dim] that the op writes the new positions into, so no step
  copies the cache. seqlens_k and total_sequence_length come from attention_mask: padding must be on the right.
  Fed a past of its true length instead (a growing cache), the op returns past + new as present.
* SimplifiedLayerNormalization is RMSNorm; SkipSimplifiedLayerNormalization adds a branch to the residual stream and
  normalizes the sum for the next branch in one node.
* The RoPE tables are initializers, cos and sin [context_length, rotary_dim / 2], computed by torch in float32 from
  the rotary module's own inv_freq and multiplied by the rope's attention scaling, as the torch model does.
  HF's sliding window W (a query sees the W most recent keys, itself included) is GroupQueryAttention's
  local_window_size W.
* The linears are those of the plain graph: MatMulNBits for Q, two MatMuls for L·R; q, k and v fused into one
  packed input of the attention where the model has no q/k norms.
"""

from __future__ import annotations

import numpy as np

from lrdeploy.compressor import arch as archs
from lrdeploy.exporters.onnx.graph import (
    MS_DOMAIN,
    Graph,
    decoder_io,
    decoder_model,
    embed,
    linear,
    linears,
    logits,
    mlp_branch,
    vocab_weights,
)
from lrdeploy.exporters.onnx.model import DecoderShape, Weights

# GroupQueryAttention's CPU kernel takes cos/sin tables whose width (rotary_dim / 2) is a multiple of 8
ROTARY_MULTIPLE = 16


def fused_problem(s: DecoderShape) -> str | None:
    """Why the fused graph cannot express this model, or None."""
    if s.rotary_dim % ROTARY_MULTIPLE:
        return (f"GroupQueryAttention's rotary needs rotary dims in multiples of {ROTARY_MULTIPLE}; this model rotates "
                f"{s.rotary_dim}")
    return None


def _rope_caches(g: Graph, s: DecoderShape) -> dict[str, tuple[str, str]]:
    import torch

    pos = torch.arange(s.context_length, dtype=torch.float32)[:, None]
    caches = {}
    for kind, (inv_freq, rope_scale) in sorted(s.rope.items()):
        freqs = pos * torch.from_numpy(inv_freq)[None]  # one float32 product per entry, as the torch module's matmul
        cos, sin = freqs.cos(), freqs.sin()
        if rope_scale != 1.0:
            cos, sin = cos * rope_scale, sin * rope_scale
        caches[kind] = (g.float(cos.numpy(), f"cos_cache.{kind}"), g.float(sin.numpy(), f"sin_cache.{kind}"))
    return caches


def _gamma(g: Graph, w: Weights, name: str, s: DecoderShape) -> str:
    """A norm's weight as the op multiplies it: gemma's 1 + w added in float32 first."""
    weight = w.tensor(name)
    if s.family.norm_offset:
        weight = (weight + np.float32(s.family.norm_offset)).astype(np.float32)
    return g.float(weight, name)


def _norm(g: Graph, x: str, w: Weights, name: str, s: DecoderShape) -> str:
    return g.op("SimplifiedLayerNormalization", x, _gamma(g, w, name, s), epsilon=s.eps, axis=-1, stash_type=1)


def _skip_norm(g: Graph, branch: str, x: str, w: Weights, name: str, s: DecoderShape) -> tuple[str, str]:
    """(norm(x + branch), x + branch)."""
    h, total = g.fresh("normed"), g.fresh("residual")
    g.node("SkipSimplifiedLayerNormalization", [branch, x, _gamma(g, w, name, s)], [h, "", "", total],
           domain=MS_DOMAIN, epsilon=s.eps)
    return h, total


def _head_norm(g: Graph, t: str, n: int, w: Weights, name: str, s: DecoderShape) -> str:
    """qwen3/gemma3's RMSNorm over each head of T [B, S, n·D]."""
    D = s.head_dim
    heads = g.op("Reshape", t, g.const([0, 0, n, D]))
    return g.op("Reshape", _norm(g, heads, w, name, s), g.const([0, 0, n * D]))


def _attention(g: Graph, s: DecoderShape, w: Weights, p: str, i: int, h: str, cache: tuple[str, str],
               lengths: tuple[str, str], fuse: bool) -> str:
    fam = s.family
    D, H, KV = s.head_dim, s.heads, s.kv_heads
    names = [p + n for n in fam.attn_in]
    parts = linears(g, h, [w.linear(n) for n in names], names, fuse, split=fam.qk_norm)
    if fam.qk_norm:
        if len(parts) == 1:
            parts = g.op("Split", parts[0], g.const([H * D, KV * D, KV * D]), axis=-1, outputs=3)
        q, k, v = parts
        parts = [_head_norm(g, q, H, w, p + "self_attn.q_norm.weight", s),
                 _head_norm(g, k, KV, w, p + "self_attn.k_norm.weight", s), v]
    qkv = parts if len(parts) == 3 else [parts[0], "", ""]  # one packed [q | k | v] input
    kind = s.layer_types[i]
    window = s.sliding_window if kind == "sliding_attention" and s.sliding_window else -1
    out = g.fresh(p + "attn")
    g.node("GroupQueryAttention",
           [*qkv, f"past_key_values.{i}.key", f"past_key_values.{i}.value", *lengths, *cache],
           [out, f"present.{i}.key", f"present.{i}.value"], domain=MS_DOMAIN, num_heads=H, kv_num_heads=KV,
           scale=s.attn_scale, do_rotary=1, local_window_size=window)
    return linear(g, out, w.linear(p + archs.O_PROJ), p + archs.O_PROJ)


def build_fused_decoder(g: Graph, s: DecoderShape, w: Weights, fuse: bool = True):
    """The whole fused decoder graph (no position_ids input: GroupQueryAttention counts positions itself), for a
    model fused_problem accepts. Returns (model, how it holds embedding and head)."""
    from onnx import TensorProto

    fam = s.family
    inputs, outputs = decoder_io(s, g.onnx_dtype, position_ids=False)
    vocab = vocab_weights(g, s, w)
    x = embed(g, s, vocab)
    seen = g.op("ReduceSum", "attention_mask", g.const([1]), keepdims=0)
    seqlens_k = g.op("Cast", g.op("Sub", seen, g.const(1)), to=TensorProto.INT32)  # [B]: last position per row
    total = g.op("Squeeze", g.op("Shape", "attention_mask", start=1, end=2), g.const([0]))
    lengths = (seqlens_k, g.op("Cast", total, to=TensorProto.INT32))
    caches = _rope_caches(g, s)
    h = _norm(g, x, w, f"model.layers.0.{fam.attn_norm}.weight", s)
    for i in range(s.layers):
        p = f"model.layers.{i}."
        attn = _attention(g, s, w, p, i, h, caches[s.layer_types[i]], lengths, fuse)
        if fam.post_attn_norm:
            attn = _norm(g, attn, w, p + fam.post_attn_norm + ".weight", s)
        h, x = _skip_norm(g, attn, x, w, p + fam.mlp_norm + ".weight", s)
        mlp = mlp_branch(g, s, w, p, h, fuse)
        if fam.post_mlp_norm:
            mlp = _norm(g, mlp, w, p + fam.post_mlp_norm + ".weight", s)
        following = f"model.layers.{i + 1}.{fam.attn_norm}.weight" if i + 1 < s.layers else "model.norm.weight"
        h, x = _skip_norm(g, mlp, x, w, following, s)
    logits(g, s, vocab, h)
    return decoder_model(g, inputs, outputs), vocab.formats
