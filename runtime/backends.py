"""One interface over the runtimes: `.tokenizer`, `.logits(ids) -> (len, vocab)` and `.bpw`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lrdeploy.errors import LrdError


@dataclass
class TorchBackend:
    model: Any
    tokenizer: Any
    device: torch.device
    bpw: float | None = None

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(ids[None].to(self.device), use_cache=False).logits[0].float().cpu()


def torch_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LrdError("--device cuda was asked for but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise LrdError(f"unknown device '{device}'; choose auto, cpu or cuda")
    return torch.device(device)


def open_backend(source: str, backend: str, device: str = "auto", lora: Path | None = None, n_ctx: int = 2048):
    """SOURCE opened on BACKEND; every backend tokenizes with the same HF tokenizer so windows match exactly."""
    if backend == "torch":
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
        from lrdeploy.runtime.llamacpp import open_llamacpp

        return open_llamacpp(Path(source), lora=lora, n_ctx=n_ctx, device=device)
    if backend == "onnxruntime":
        from lrdeploy.runtime.onnxrt import open_onnxruntime

        return open_onnxruntime(Path(source), device=device)
    raise LrdError(f"unknown backend '{backend}'")
