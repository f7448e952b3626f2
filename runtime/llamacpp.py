"""llama.cpp through llama-cpp-python: the stock runtime an export must run on, behind the backend interface.

Token ids come from the same HF tokenizer as the torch backend, so both score exactly the same windows; llama.cpp's
own tokenizer is never involved in a comparison.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrdeploy.devices import check_device
from lrdeploy.errors import LrdError
from lrdeploy.files import GGUF_ADAPTER as ADAPTER
from lrdeploy.files import GGUF_BASE as BASE
from lrdeploy.runtime.stream import PREFILL_CHUNK, kv_bytes_per_token


@dataclass
class LlamaCppBackend:
    """A GGUF (+ LoRA adapter) in llama.cpp, behind the one backend protocol of runtime/stream.py.

    llama.cpp sizes its KV cache at load, so the backend holds one of two contexts at a time. `logits` and
    `generate` run on one with logits at every position (eval's need): N_CTX tokens, or as long as each call's ids
    where N_CTX is None. The streaming side (`reset`, `prefill`, `decode`) runs on one without them, which speed must
    not pay for, loaded again when `reset` asks for another size. Every call starts from an empty KV cache.
    """

    model_path: Path
    lora_path: Path | None
    tokenizer: Any
    bpw: float | None
    device: str
    n_ctx: int | None = None
    threads: int | None = None
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    kv_per_token: int = 0
    max_positions: int | None = None
    llm: Any = field(default=None, repr=False)
    _context: tuple[str, int] | None = field(default=None, repr=False)  # ("scores" | "stream", its size)

    def _open(self, kind: str, size: int) -> Any:
        if self._context != (kind, size):
            self.close()
            extra = {} if kind == "scores" else {"logits_all": False, "n_batch": PREFILL_CHUNK,
                                                 "n_ubatch": PREFILL_CHUNK}
            self.llm = load_llama(self.model_path, self.lora_path, size, self.device, self.threads,
                                  **{**self.load_kwargs, **extra})
            self._context = (kind, size)
        self.llm.reset()  # eval() then drops every cached position: a fresh context
        return self.llm

    def _scores(self, ids: list[int], room: int = 0) -> Any:
        size = self.n_ctx or len(ids) + room
        if len(ids) + room > size:
            what = f"{len(ids)}" + (f" + {room}" if room else "")
            raise LrdError(f"{what} tokens do not fit llama.cpp's context of {size}; raise --ctx")
        llm = self._open("scores", size)
        llm.eval(ids)
        return llm

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits at every position (n, vocab), float32."""
        ids_list = [int(i) for i in ids.reshape(-1).tolist()]
        llm = self._scores(ids_list)
        return torch.from_numpy(np.array(llm.scores[: len(ids_list)], dtype=np.float32))

    def generate(self, ids: torch.Tensor, n_new: int) -> list[int]:
        """Greedy continuation: the argmax of llama.cpp's logits, token by token."""
        ids_list = [int(i) for i in ids.reshape(-1).tolist()]
        llm = self._scores(ids_list, n_new)
        new: list[int] = []
        for _ in range(n_new):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            new.append(tok)
            llm.eval([tok])
        return new

    def reset(self, n_ctx: int) -> None:
        self._open("stream", n_ctx)

    def prefill(self, ids: list[int]) -> None:
        self.llm.eval(ids)

    def decode(self, n: int) -> None:
        import llama_cpp

        vocab = self.llm.n_vocab()
        for _ in range(n):  # without logits_all, llama-cpp-python keeps no scores: read the last row from the context
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(vocab,))
            self.llm.eval([int(np.argmax(row))])

    def sync(self) -> None:
        pass

    def kv_bytes(self, tokens: int) -> int:
        """llama.cpp's cache holds f16 keys and values for every stored token (allocated for n_ctx up front)."""
        return self.kv_per_token * tokens

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm, self._context = None, None


def resolve(path: Path, lora: Path | None) -> tuple[Path, Path | None, Path | None]:
    """(model .gguf, adapter or None, directory with the HF tokenizer files or None) for PATH."""
    path = Path(path)
    if not path.exists():
        raise LrdError(f"no such file or directory: {path}")
    if path.is_dir():
        model = path / BASE
        if not model.is_file():
            raise LrdError(f"{path} is not a GGUF export: {BASE} is missing")
        adapter = lora if lora is not None else (path / ADAPTER if (path / ADAPTER).is_file() else None)
        tok_dir = path if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file() else None
    else:
        if path.suffix != ".gguf":
            raise LrdError(f"{path} is not a .gguf file or a GGUF export directory")
        model, adapter = path, lora
        parent = path.parent  # a .gguf inside one of our exports: use the export's tokenizer files
        ours = (parent / "export.json").is_file() and (parent / "tokenizer_config.json").is_file()
        tok_dir = parent if ours else None
    if adapter is not None and not Path(adapter).is_file():
        raise LrdError(f"no such LoRA adapter: {adapter}")
    return model, None if adapter is None else Path(adapter), tok_dir


def _tokenizer(model: Path, tok_dir: Path | None):
    if tok_dir is not None:
        from lrdeploy.artifact import artifact_tokenizer

        return artifact_tokenizer(tok_dir)
    from lrdeploy.compressor.sources import open_source

    return open_source(str(model)).tokenizer()


def gpu_layers(device: str) -> int:
    """-1 (all layers) on a GPU build when asked or available, else 0."""
    import llama_cpp

    check_device(device)
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    if device == "cuda" and not gpu:
        raise LrdError("--device cuda was asked for but this llama-cpp-python build has no GPU offload")
    return -1 if device == "cuda" or (device == "auto" and gpu) else 0


@contextlib.contextmanager
def captured_stderr(sink: list[str]) -> Iterator[None]:
    """Route file descriptor 2 (llama.cpp's C-level logging) into SINK while loading: chatter hidden, errors kept."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode("utf-8", errors="replace"))


def amx_in_build() -> bool:
    """Whether this llama.cpp build carries ggml's AMX kernels (Intel Sapphire Rapids and later)."""
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


@contextlib.contextmanager
def plain_cpu_buffers(llama_cpp: Any) -> Iterator[None]:
    """Models loaded inside keep their weights in plain CPU buffers when the build has AMX kernels.

    ggml's AMX matmul segfaults on the first decode on some AMX machines (llama.cpp issue #20824, open), and it
    did so here for every q4_0 GGUF of SmolLM2. Turning off llama.cpp's extra buffer types (`--no-repack` in its
    own tools) avoids it. llama-cpp-python has no argument for `use_extra_bufts`, so its default-parameter factory
    is wrapped while the model loads.
    """
    if not amx_in_build():
        yield
        return
    import llama_cpp.llama as high_level

    factory = high_level.llama_cpp.llama_model_default_params

    def params() -> Any:
        p = factory()
        p.use_extra_bufts = False
        return p

    high_level.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        high_level.llama_cpp.llama_model_default_params = factory


def _last_error(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return (errors or lines or [""])[-1]


def load_llama(model: Path, lora: Path | None, n_ctx: int, device: str = "auto", n_threads: int | None = None,
               **kwargs: Any) -> Any:
    """A llama_cpp.Llama with logits for every position; load failures become one-line errors."""
    try:
        import llama_cpp
    except ImportError:
        raise LrdError("the llamacpp backend needs llama-cpp-python: pip install llama-cpp-python") from None
    threads = n_threads or os.cpu_count() or 1
    layers = gpu_layers(device)
    log: list[str] = []
    what = f"{model}" + (f" with LoRA {lora}" if lora is not None else "")
    try:
        with captured_stderr(log), plain_cpu_buffers(llama_cpp):
            params = {"n_batch": n_ctx, "n_ubatch": min(n_ctx, 512), "logits_all": True, "n_gpu_layers": layers,
                      "n_threads": threads, "n_threads_batch": threads, "verbose": False, **kwargs}
            llm = llama_cpp.Llama(model_path=str(model), lora_path=None if lora is None else str(lora), n_ctx=n_ctx,
                                  **params)
    except (ValueError, RuntimeError) as e:
        detail = _last_error("".join(log))
        raise LrdError(f"llama.cpp cannot load {what}: {e}" + (f" ({detail})" if detail else "")) from None
    # llama-cpp-python 0.3.x tests the adapter pointer with `is None`, but a failed load returns a NULL pointer
    # object: the LoRA would be silently dropped. A NULL ctypes pointer is falsy, so check it here.
    if lora is not None and not getattr(llm, "_lora_adapter", None):
        llm.close()
        raise LrdError(f"llama.cpp cannot load {what}: {adapter_problem(lora, model)}")
    return llm


def adapter_problem(lora: Path, model: Path) -> str:
    """Why llama.cpp would reject LORA for MODEL, in words (its own message is not reliably printed)."""
    import gguf

    from lrdeploy.compressor.sources import read_gguf_index

    try:
        fields = gguf.GGUFReader(lora).fields
    except Exception as e:  # gguf raises several types for broken files
        return f"{lora} is not a readable GGUF ({e})"

    def field(key: str) -> object:
        return fields[key].contents() if key in fields else None

    if field("general.type") != "adapter" or field("adapter.type") != "lora":
        return f"{lora} is not a LoRA adapter (general.type = {field('general.type')})"
    arch, tensors = read_gguf_index(model)
    if field("general.architecture") != arch:
        return f"the adapter is for '{field('general.architecture')}', the model is '{arch}'"
    _, parts = read_gguf_index(lora)
    for name in parts:
        base = name.removesuffix(".lora_a").removesuffix(".lora_b")
        if base not in tensors:
            return f"the model has no tensor {base} (wrong base model?)"
    return "tensor shapes do not match the base model"


def open_llamacpp(path: Path, lora: Path | None, n_ctx: int | None, device: str, n_threads: int | None = None,
                  **kwargs: Any) -> LlamaCppBackend:
    """PATH is an export directory (model.gguf [+ adapter.gguf]) or a .gguf file with an optional LoRA.

    With N_CTX, the logits context is loaded now, so a file llama.cpp rejects fails here; without, each context is
    loaded when first used (bench sizes one per measurement). KWARGS go to llama_cpp.Llama.
    """
    from lrdeploy.compressor.sources import read_gguf_header
    from lrdeploy.runtime.inspect import export_bpw

    model, adapter, tok_dir = resolve(path, lora)
    bpw = export_bpw(model, adapter)  # parses both headers first: a truncated file is one clear error, not a crash
    meta, _ = read_gguf_header(model)
    arch = meta.get("general.architecture")

    def number(key: str, default: int | None = None) -> int | None:
        value = meta.get(f"{arch}.{key}")  # None also where the file stores an array (one value per layer)
        if value is None and default is None:
            raise LrdError(f"cannot read {model}: it has no scalar {arch}.{key} (not a llama.cpp language model?)")
        return default if value is None else int(value)

    heads = number("attention.head_count")
    head_dim = number("attention.key_length", number("embedding_length") // heads)
    kv = kv_bytes_per_token(number("block_count"), number("attention.head_count_kv", heads), head_dim, 2)  # f16 KV
    positions = meta.get(f"{arch}.context_length")
    backend = LlamaCppBackend(model, adapter, _tokenizer(model, tok_dir), bpw, device, n_ctx, n_threads, kwargs, kv,
                              None if positions is None else int(positions))
    if n_ctx is not None:
        backend._open("scores", n_ctx)
    return backend
