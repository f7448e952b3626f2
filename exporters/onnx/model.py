"""What the ONNX exporter reads: one decoder's shapes (from its transformers config) and its weights (from an
artifact's split linears or a plain model's dense ones), as the graph will compute them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lrdeploy.compressor import arch as archs
from lrdeploy.errors import LrdError
from lrdeploy.exporters.onnx.nbits import (
    NBITS_FORMATS,
    NBitsWeight,
    block_diagonal,
    nbits_from_blocks,
    nbits_from_ggml,
    stack,
    stackable,
)

# transformers' activation names -> the registry's
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


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
        from lrdeploy.compressor import grids, lattice

        out = LinearWeights(bias=bias)
        if entry["q_format"] is not None:
            assert self._raw is not None
            out.q = nbits_from_ggml(entry["q_format"], self._raw(name + ".q"), tuple(entry["shape"]), self.zero_points)
            self.counts["matmulnbits"] += 1
            self.counts["iquant_8bit"] += entry["q_format"] in lattice.LATTICES
        if entry["rank"]:
            self.counts["lowrank"] += 1
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
    if has_q and not stackable([w.q for w in ws]):
        return None
    if has_lrq and not (stackable([w.lora_rq for w in ws]) and stackable([w.lora_lq for w in ws], same_k=False)
                        and ws[0].lora_lq.zero_points is None and ws[0].lora_lq.offsets is None):
        return None
    out = LinearWeights()
    sizes = [w.rows for w in ws]
    if has_q:
        out.q = stack([w.q for w in ws])
    if has_lrq:  # R stacked; L block-diagonal, its off-diagonal blocks scale 0 (exact zeros under the default zp)
        out.lora_rq = stack([w.lora_rq for w in ws])
        ls = [w.lora_lq for w in ws]
        out.lora_lq = NBitsWeight(ls[0].bits, ls[0].block_size, sum(sizes), sum(q.k for q in ls),
                                  block_diagonal([q.B for q in ls]), block_diagonal([q.scales for q in ls]), None)
    if has_dense:
        out.dense = np.concatenate([w.dense for w in ws])
    if has_lr:
        out.lora_r = np.concatenate([w.lora_r for w in ws])
        out.lora_l = block_diagonal([w.lora_l for w in ws])
    if any(w.bias is not None for w in ws):
        out.bias = np.concatenate([w.bias if w.bias is not None else np.zeros(n, np.float32)
                                   for w, n in zip(ws, sizes, strict=True)])
    return out


def open_weights(source: str, zero_points: str) -> tuple[object, Weights, object, dict | None]:
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
