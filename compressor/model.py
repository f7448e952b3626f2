"""transformers models built piece by piece: a meta skeleton, one decoder block materialized at a time."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from lrdeploy.compressor import arch as archs

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


class BlockContext:
    """Keyword arguments a standalone decoder block needs, built exactly as the full model builds them: one set per
    layer kind (full or sliding-window attention, each with its own mask and RoPE tables), picked per layer."""

    def __init__(self, model: nn.Module, x: torch.Tensor, rot: nn.Module):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        config = model.config
        self.types = archs.layer_types(config)
        x = x[:1]  # masks built for one sequence broadcast over any batch (a short last batch included)
        pos = torch.arange(x.shape[1], device=x.device)[None]
        per_type = "layer_type" in inspect.signature(rot.forward).parameters  # gemma3: RoPE base per layer kind
        self.by_type = {}
        for kind in set(self.types):
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            mask = make(config=config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos)
            pe = rot(x, pos, kind) if per_type else rot(x, position_ids=pos)
            self.by_type[kind] = {"attention_mask": mask, "position_ids": pos, "position_embeddings": pe}

    def __getitem__(self, layer: int) -> dict:
        return self.by_type[self.types[layer]]


def embed_scale(config) -> float | None:
    """What the model multiplies its embeddings by (gemma: √hidden, as a float32 scalar), or None."""
    if not archs.get(config).embed_scale:
        return None
    return float(torch.tensor(config.hidden_size**0.5, dtype=torch.float32))


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
    scale = embed_scale(config)
    if scale is not None:  # a non-persistent buffer: to_empty left it unset
        model.model.embed_tokens.embed_scale.fill_(scale)
    model.model.rotary_emb = rotary(model, device)
    return model.eval()
