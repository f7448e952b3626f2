"""One place per architecture: what the compressor, the exporters and the runtime need to know about a decoder.

Every other module asks `get(config)` (or `get_type(model_type)`) instead of keeping its own list. An entry holds:

- the linear groups of one block (linears in a group read the same input, so they share one H), in the order their
  inputs become available, and which linears write the residual stream;
- the norms and where they sit: the one before attention, the one before the MLP, and the sandwich norms some
  families put on each branch's output before the residual add;
- the RMSNorm weight convention (gemma multiplies by 1 + w), the activation, the embedding scale, q/k norms, RoPE
  per layer type and the attention scale;
- the GGUF side: llama.cpp's architecture name (tensor names come from gguf-py's TensorNameMap for it), whether its
  converter permutes q/k rows, and what the metadata must say beyond the common keys;
- whether the compressor's fast staged H path (hcollect.staged_h) is valid for the block. The hook path, which
  records what each linear really receives, is the reference; the staged path is a shortcut for llama-shaped
  blocks only, and tests hold it equal to the hook path per architecture.

Adding a llama clone is one entry: `ARCHS["name"] = LLAMA` with its GGUF name. A mixture-of-experts family
(Mixtral) would list its router as a group of its own and its experts' linears as one group per expert: the
driver already loops over groups, and each expert's H is the MLP input seen through the router.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lrdeploy.errors import LrdError

ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
O_PROJ = "self_attn.o_proj"
DOWN = "mlp.down_proj"
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class Arch:
    """How one decoder family is built (see the module docstring)."""

    name: str  # the transformers model_type this entry was registered under
    gguf: str  # llama.cpp's general.architecture
    attn_in: tuple[str, ...] = ATTN_QKV  # linears reading the attention norm's output (one fused qkv for phi3)
    mlp_in: tuple[str, ...] = GATE_UP  # linears reading the MLP norm's output (one fused gate_up for phi3)
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    post_attn_norm: str | None = None  # sandwich norm on the attention output, before the residual add
    post_mlp_norm: str | None = None  # likewise on the MLP output
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w)
    activation: str = "silu"
    embed_scale: bool = False  # embeddings are multiplied by √hidden
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE
    permute_qk: bool = False  # llama.cpp's converter interleaves the rotary halves of q/k rows
    staged_h: bool = True  # hcollect.staged_h computes this block's H exactly (tested per architecture)
    rotatable: bool = True  # compressor/rotate.py can fold an orthogonal change of basis into it
    gguf_extra: tuple[str, ...] = field(default_factory=tuple)  # extra metadata: sliding_window, swa_rope, key_length

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        return (self.attn_in, (O_PROJ,), self.mlp_in, (DOWN,))

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    @property
    def writes(self) -> tuple[str, ...]:
        """Linears whose output is added to the residual stream."""
        return (O_PROJ, DOWN)

    @property
    def reads(self) -> dict[str, tuple[str, ...]]:
        """Norm -> the linears that read its output."""
        return {self.attn_norm: self.attn_in, self.mlp_norm: self.mlp_in}

    @property
    def fused_qkv(self) -> bool:
        return len(self.attn_in) == 1

    @property
    def fused_gate_up(self) -> bool:
        return len(self.mlp_in) == 1

    def value_rows(self, config) -> tuple[str, int]:
        """(linear, first row) of the value projection's rows: v_proj's own rows, or the tail of a fused qkv."""
        if not self.fused_qkv:
            return "self_attn.v_proj", 0
        d = head_dim(config)
        return self.attn_in[0], (config.num_attention_heads + config.num_key_value_heads) * d


LLAMA = Arch("llama", "llama", permute_qk=True)
QWEN2 = Arch("qwen2", "qwen2")
QWEN3 = Arch("qwen3", "qwen3", qk_norm=True)
GEMMA3 = Arch(
    "gemma3_text", "gemma3", mlp_norm="pre_feedforward_layernorm", post_attn_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm", norm_offset=1.0, activation="gelu_tanh", embed_scale=True,
    qk_norm=True, staged_h=False, rotatable=False, gguf_extra=("sliding_window", "swa_rope", "key_length"),
)
PHI3 = Arch("phi3", "phi3", attn_in=("self_attn.qkv_proj",), mlp_in=("mlp.gate_up_proj",), staged_h=False,
            gguf_extra=("sliding_window",))
ARCHS: dict[str, Arch] = {
    "llama": LLAMA,
    "mistral": replace(LLAMA, name="mistral"),
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "gemma3_text": GEMMA3,
    "phi3": PHI3,
}
SUPPORTED = tuple(ARCHS)


def get_type(model_type: str | None) -> Arch:
    arch = ARCHS.get(model_type or "")
    if arch is None:
        raise LrdError(f"unsupported architecture '{model_type}'; supported: {', '.join(SUPPORTED)}")
    return arch


def get(config) -> Arch:
    return get_type(getattr(config, "model_type", None))


def by_gguf(gguf_arch: str) -> Arch:
    """The entry a GGUF's general.architecture belongs to (the first registered, e.g. llama for mistral)."""
    for arch in ARCHS.values():
        if arch.gguf == gguf_arch:
            return arch
    raise LrdError(f"unsupported architecture '{gguf_arch}'; supported: {', '.join(SUPPORTED)}")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_types(config) -> list[str]:
    """Each layer's attention kind: full_attention or sliding_attention (transformers' names)."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    window = getattr(config, "sliding_window", None)
    return ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers


def rope_for(config, layer_type: str) -> dict:
    """The RoPE settings one layer kind uses, as one dict with rope_type and rope_theta."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if layer_type in params and isinstance(params[layer_type], dict):  # per-kind settings (gemma3)
        params = dict(params[layer_type])
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def attention_scale(config) -> float:
    """The factor on q·k: 1/√query_pre_attn_scalar where the config has one (gemma), else 1/√head_dim."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    return float(scalar if scalar else head_dim(config)) ** -0.5


def rotary_dim(config) -> int:
    """How many of each head's dims RoPE turns (phi3's partial_rotary_factor)."""
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    factor = factor or getattr(config, "partial_rotary_factor", None) or 1.0
    return int(head_dim(config) * factor)
