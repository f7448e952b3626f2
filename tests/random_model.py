"""Write a random-weight llama-family model as an HF directory (config + safetensors + SmolLM2's tokenizer).

Real shapes at no download cost: tests use dims that are multiples of 256 so the K-quants fit, and timing runs use
Llama-2-7B's 4096/11008. gemma3_text and phi3 models also carry what their real configs set beyond the sizes
(FAMILY), and random norm weights, so an exporter that drops a norm convention fails on them.

    python tests/random_model.py OUT --hidden 256 --layers 2 --ffn 512 --heads 4 --kv-heads 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

# What the real configs set beyond the sizes, at test sizes. gemma3_text (google/gemma-3-4b-it): head_dim apart
# from hidden/heads with query_pre_attn_scalar equal to it, five sliding layers per global one, two RoPE bases with
# linear scaling on the global layers, GELU-tanh; the window is cut to 32 so that short test texts cross it.
# phi3 (microsoft/Phi-3-mini-4k-instruct): its window and eps (fused qkv and gate_up come with the class).
FAMILY: dict[str, dict] = {
    "gemma3_text": {
        "head_dim": 128, "query_pre_attn_scalar": 128, "sliding_window": 32, "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
    },
    "phi3": {"sliding_window": 2047, "rms_norm_eps": 1e-5, "original_max_position_embeddings": 4096},
}


def make_random_model(
    out: Path,
    hidden: int = 256,
    layers: int = 2,
    ffn: int = 512,
    heads: int = 4,
    kv_heads: int = 2,
    arch: str = "llama",
    vocab: int | None = None,
    seed: int = 0,
    tie: bool = True,
    shard_layers: bool = False,
) -> Path:
    """Save a random model with the bundled SmolLM2 tokenizer; weights are N(0, 0.02) like a fresh init."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from lrdeploy.compressor.sources import open_source

    tok = open_source("smollm2").tokenizer()
    vocab = vocab or len(tok)
    cfg_cls = AutoConfig.for_model(arch).__class__
    config = cfg_cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        **FAMILY.get(arch, {}),
    )
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_config(config)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if arch in FAMILY:  # norms away from their init (ones, or gemma's zeros for 1 + w)
        for k, v in sd.items():
            if k.endswith("norm.weight"):
                sd[k] = v + 0.1 * torch.randn_like(v)
    if tie:
        sd.pop("lm_head.weight", None)
    config.save_pretrained(out)
    tok.save_pretrained(out)
    if shard_layers:  # one file per block, like a big hub checkpoint
        import json

        weight_map = {}
        groups: dict[str, dict] = {}
        for k, v in sd.items():
            part = k.split(".")[2] if k.startswith("model.layers.") else "rest"
            groups.setdefault(part, {})[k] = v
        for part, tensors in groups.items():
            name = f"model-{part}.safetensors"
            save_file(tensors, str(out / name))
            weight_map.update(dict.fromkeys(tensors, name))
        (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(sd, str(out / "model.safetensors"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--arch", default="llama")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-layers", action="store_true")
    a = p.parse_args()
    make_random_model(a.out, a.hidden, a.layers, a.ffn, a.heads, a.kv_heads, a.arch, a.vocab, a.seed,
                      shard_layers=a.shard_layers)


if __name__ == "__main__":
    main()
