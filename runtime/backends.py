"""One interface over the runtimes: `.tokenizer`, `.logits(ids) -> (len, vocab)`, `.bpw`, and the streaming
protocol of runtime/stream.py that the bench drives (reset, prefill, decode, kv_bytes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lrdeploy.devices import torch_device
from lrdeploy.errors import LrdError
from lrdeploy.runtime.llamacpp import ADAPTER, BASE
from lrdeploy.runtime.onnxrt import MODEL_FILE
from lrdeploy.runtime.stream import PREFILL_CHUNK, kv_bytes_per_token


@dataclass
class TorchBackend:
    """A transformers model (an artifact's QLRLinear modules, or a plain source), its KV in a DynamicCache."""

    model: Any
    tokenizer: Any
    device: torch.device
    bpw: float | None = None
    cache: Any = None
    last: Any = None  # logits of the last position fed

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(ids[None].to(self.device), use_cache=False).logits[0].float().cpu()

    @property
    def kv_per_token(self) -> int:
        from lrdeploy.compressor.arch import head_dim

        cfg = self.model.config
        first = next(self.model.parameters(), None)
        elem = first.element_size() if first is not None else 4
        return kv_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim(cfg), elem)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def reset(self, n_ctx: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    def prefill(self, ids: list[int]) -> None:
        with torch.no_grad():
            for i in range(0, len(ids), PREFILL_CHUNK):
                self._step(torch.tensor([ids[i : i + PREFILL_CHUNK]], device=self.device))

    def decode(self, n: int) -> None:
        with torch.no_grad():
            for _ in range(n):
                self._step(torch.argmax(self.last).reshape(1, 1))
        self.sync()

    def _step(self, ids: torch.Tensor) -> None:
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache, self.last = out.past_key_values, out.logits[0, -1]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of the key and value tensors the cache really holds (gemma3's sliding layers keep their window)."""
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is not None and hasattr(t, "numel"):
                    total += t.numel() * t.element_size()
        return total

    def close(self) -> None:
        self.cache = None


def detect_backend(path: str | Path, files: bool = True) -> str | None:
    """The backend PATH runs on by itself: an artifact on torch, a GGUF export directory or .gguf file on llamacpp,
    an ONNX export directory or .onnx file on onnxruntime; None for anything else (a model source, a hub id).

    FILES False counts only artifacts and export directories: bench's baseline treats a bare .gguf as a model source.
    """
    from lrdeploy.artifact import is_artifact

    p = Path(path)
    if is_artifact(p):
        return "torch"
    if (p / BASE).is_file() or (files and p.suffix == ".gguf" and p.is_file()):
        return "llamacpp"
    if (p / MODEL_FILE).is_file() or (files and p.suffix == ".onnx" and p.is_file()):
        return "onnxruntime"
    return None


def auto_backend(source: str) -> str:
    """`--backend auto`: the backend SOURCE runs on (detect_backend), torch for a model source."""
    return detect_backend(source) or "torch"


def adapter_beside(source: str | Path) -> Path | None:
    """The adapter.gguf in the same directory as the .gguf file SOURCE (a GGUF export's LoRA), if there is one."""
    p = Path(source)
    adapter = p.parent / ADAPTER
    if p.suffix != ".gguf" or p.name == adapter.name or not p.is_file() or not adapter.is_file():
        return None
    return adapter


BACKENDS = ("torch", "llamacpp", "onnxruntime")


def check_backend(backend: str) -> None:
    """A one-line error for a --backend that is neither auto nor one of BACKENDS."""
    if backend not in ("auto", *BACKENDS):
        raise LrdError(f"unknown backend '{backend}'; choose one of auto, {', '.join(BACKENDS)}")


def open_backend(source: str, backend: str, device: str = "auto", lora: Path | None = None, n_ctx: int | None = 2048,
                 threads: int | None = None):
    """SOURCE opened on BACKEND; every backend tokenizes with the same HF tokenizer so windows match exactly.

    BACKEND 'auto' picks it from SOURCE (auto_backend). On llamacpp a .gguf file gets the adapter.gguf beside it
    unless LORA names one, as an export directory does; torch loads the file alone (eval warns about that). N_CTX
    sizes llama.cpp's logits context (None: each call's length, as bench wants). THREADS: CPU threads (torch's are
    process-wide), all cores where None.
    """
    if backend == "auto":
        backend = auto_backend(source)
    if backend == "torch":
        if threads:
            torch.set_num_threads(threads)
        from lrdeploy.artifact import artifact_tokenizer, is_artifact, load_artifact
        from lrdeploy.compressor.model import load_full
        from lrdeploy.compressor.sources import open_source

        dev = torch_device(device)
        if lora is not None:
            raise LrdError("--lora applies to --backend llamacpp only")
        if is_artifact(source):
            model, manifest = load_artifact(source, dev)
            return TorchBackend(model, artifact_tokenizer(source), dev, manifest["summary"]["bpw"])
        src = open_source(source)
        return TorchBackend(load_full(src.config, src.tensor, dev), src.tokenizer(), dev)
    if backend == "llamacpp":
        from lrdeploy.compressor.named import NAMES, named_path
        from lrdeploy.runtime.llamacpp import open_llamacpp

        if source in NAMES:  # a named model is a GGUF file: run that file, as llama.cpp users would
            source = str(named_path(source))
        return open_llamacpp(Path(source), lora=lora or adapter_beside(source), n_ctx=n_ctx, device=device,
                             n_threads=threads)
    if backend == "onnxruntime":
        from lrdeploy.runtime.onnxrt import open_onnxruntime

        return open_onnxruntime(Path(source), device=device, threads=threads)
    raise LrdError(f"unknown backend '{backend}'")
