"""transformers models built piece by piece: a meta skeleton, one decoder block materialized at a time."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Linears of a llama-family decoder block, in the order their inputs become available. Linears in one group
# share their input, so they share one H.
LINEAR_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEARS: tuple[str, ...] = tuple(name for group in LINEAR_GROUPS for name in group)
TensorGetter = Callable[[str], torch.Tensor]


def skeleton(config) -> nn.Module:
    """The full model on the meta device: shapes and module classes, no memory."""
    from transformers import AutoModelForCausalLM

    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def materialize(module: nn.Module, prefix: str, get: TensorGetter, device: torch.device | str) -> nn.Module:
    """Allocate MODULE on DEVICE and fill every parameter from get(prefix + name)."""
    module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(get(prefix + name).to(p.dtype))
    return module.eval()


def rotary(model: nn.Module, device: torch.device | str) -> nn.Module:
    """A fresh rotary embedding (its inv_freq buffer is not a checkpoint tensor)."""
    rot = model.model.rotary_emb
    return type(rot)(config=model.config).to(device)


def block_context(model: nn.Module, x: torch.Tensor, rot: nn.Module) -> dict:
    """Keyword arguments a standalone decoder block needs, built exactly as the full model builds them."""
    from transformers.masking_utils import create_causal_mask

    pos = torch.arange(x.shape[1], device=x.device)[None]
    mask = create_causal_mask(
        config=model.config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos
    )
    return {"attention_mask": mask, "position_ids": pos, "position_embeddings": rot(x, position_ids=pos)}


def load_full(config, get: TensorGetter, device: torch.device | str = "cpu", replace=None) -> nn.Module:
    """The whole model in memory (for eval). REPLACE(model) may swap modules before the weights are filled."""
    model = skeleton(config)
    if replace is not None:
        replace(model)
    with torch.no_grad():
        model.to_empty(device=device)
        sd = model.state_dict(keep_vars=True)
        for name, p in model.named_parameters():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            p.copy_(get(name).to(p.dtype))
        for name, b in model.named_buffers():
            if not name.endswith(("inv_freq", "original_inv_freq")) and name in sd:
                b.copy_(get(name).to(b.dtype))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = rotary(model, device)
    return model.eval()
