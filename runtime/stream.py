"""The streaming side of the one backend protocol, which the bench drives and every backend implements.

Each backend (TorchBackend in backends.py, OnnxDecoder in onnxrt.py, LlamaCppBackend in llamacpp.py), as
backends.open_backend opens it for eval and bench alike, offers:

- `tokenizer`, `bpw`, and `logits(ids) -> (len, vocab)` from an empty cache (eval, perplexity);
- `kv_per_token` (bytes of K and V per token at full depth) and `max_positions` (the model's context limit);
- `reset(n_ctx)`: an empty KV cache for up to N_CTX tokens; `prefill(ids)`: feed IDS into it, PREFILL_CHUNK tokens
  per call; `decode(n)`: N greedy steps; `sync()`: wait for the device; `kv_bytes(tokens)`: the bytes the cache
  really holds; `close()`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

PREFILL_CHUNK = 512  # tokens per forward when a long prompt is fed into the cache


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, elem_bytes: int) -> int:
    """K and V of one token in every layer."""
    return 2 * layers * kv_heads * head_dim * elem_bytes


@runtime_checkable
class Stream(Protocol):
    tokenizer: Any
    bpw: float | None
    kv_per_token: int
    max_positions: int | None

    def logits(self, ids: Any) -> Any: ...
    def reset(self, n_ctx: int) -> None: ...
    def prefill(self, ids: list[int]) -> None: ...
    def decode(self, n: int) -> None: ...
    def sync(self) -> None: ...
    def kv_bytes(self, tokens: int) -> int: ...
    def close(self) -> None: ...
