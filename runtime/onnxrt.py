"""onnxruntime backend: perplexity logits and greedy generation through an exported decoder and its KV cache."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrdeploy.devices import check_device
from lrdeploy.errors import LrdError
from lrdeploy.files import ONNX_KEEP as KEEP
from lrdeploy.files import ONNX_META as META_FILE
from lrdeploy.files import ONNX_MODEL as MODEL_FILE
from lrdeploy.runtime.stream import PREFILL_CHUNK, kv_bytes_per_token

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def providers_for(device: str) -> list[str]:
    """Execution providers for DEVICE: auto picks CUDA only where a GPU is actually present."""
    import onnxruntime as ort

    check_device(device)
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available and (Path("/dev/nvidiactl").exists() or torch.cuda.is_available())
    if device == "cpu" or (device == "auto" and not has_cuda):
        return ["CPUExecutionProvider"]
    if not has_cuda:
        raise LrdError("--device cuda was asked for but onnxruntime has no usable CUDAExecutionProvider here")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


@dataclass
class DecoderIO:
    """What the runtime needs to know about an exported decoder's inputs, read from the session itself."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: type
    has_position_ids: bool


def check_decoder_io(inputs: list, outputs: list, where: object, head_size: int | None = None) -> DecoderIO:
    """Validate the session's inputs/outputs against the export's contract; one clear line when they don't fit.
    HEAD_SIZE (genai_config.json's) stands in where the graph leaves the cache's last dim symbolic."""
    names = {i.name: i for i in inputs}
    out_names = {o.name for o in outputs}
    missing = [n for n in ("input_ids", "attention_mask") if n not in names]
    if "logits" not in out_names:
        missing.append("output logits")
    layers = sorted({int(m.group(1)) for n in names if (m := _PAST.match(n))})
    if not layers:
        missing.append("past_key_values.N.key/value")
    if missing:
        got = ", ".join(sorted(names)) or "none"
        raise LrdError(f"{where} is not a decoder with a KV cache: missing {', '.join(missing)} (inputs: {got})")
    n = len(layers)
    if layers != list(range(n)):
        raise LrdError(f"{where}: past_key_values layers are not numbered 0..{n - 1}")
    for i in range(n):
        for kind in ("key", "value"):
            if f"past_key_values.{i}.{kind}" not in names or f"present.{i}.{kind}" not in out_names:
                raise LrdError(f"{where}: layer {i} lacks past_key_values.{i}.{kind} or present.{i}.{kind}")
    past = names["past_key_values.0.key"]
    shape = list(past.shape)
    if len(shape) == 4 and not isinstance(shape[3], int) and head_size:
        shape[3] = int(head_size)
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise LrdError(f"{where}: past_key_values.0.key has shape {shape}, expected [batch, kv_heads, past, head_dim]")
    if past.type not in _TYPES:
        raise LrdError(f"{where}: past_key_values.0.key is {past.type}, expected float or float16")
    return DecoderIO(n, shape[1], shape[3], _TYPES[past.type], "position_ids" in names)


class OnnxDecoder:
    """`.tokenizer`, `.logits(ids)` (empty cache), `.generate(ids, n_new)` (greedy, cache step by step), `.bpw`, and
    the streaming protocol of runtime/stream.py.

    Two cache disciplines, as onnxruntime-genai's past_present_share_buffer says: a shared buffer (the fused graph's
    GroupQueryAttention, and onnxruntime-genai's builder) is one preallocated [1, kv_heads, capacity, head_dim]
    OrtValue per layer and kind, bound as both past and present so the op writes new positions in place; a growing
    cache (the plain graph) is carried between calls as the arrays each step returns."""

    def __init__(self, session: Any, tokenizer: Any, io: DecoderIO, bpw: float | None, device: str,
                 max_positions: int | None = None, shared: bool = False):
        self.session, self.tokenizer, self.io, self.bpw, self.device = session, tokenizer, io, bpw, device
        self.max_positions, self.shared = max_positions, shared
        self._outputs = [o.name for o in session.get_outputs()]
        # lrdeploy's exports take an optional logits_to_keep (an initializer the caller may override): a prefill
        # then computes the head for its last position only; other graphs (the builder's) give every position's
        self._keep = KEEP in {i.name for i in session.get_overridable_initializers()}
        self._cache: dict[str, Any] = {}
        self._start, self._last = 0, None

    @property
    def kv_per_token(self) -> int:
        return kv_bytes_per_token(self.io.layers, self.io.kv_heads, self.io.head_dim, self.io.dtype().itemsize)

    def _names(self) -> list[tuple[str, str]]:
        return [(f"past_key_values.{i}.{k}", f"present.{i}.{k}")
                for i in range(self.io.layers) for k in ("key", "value")]

    def reset(self, n_ctx: int) -> None:
        """An empty cache; with a shared buffer, room for N_CTX positions is allocated now."""
        self._start, self._last = 0, None
        if not self.shared:
            self._cache = self.empty_cache()
            return
        import onnxruntime as ort

        where = ("cuda", 0) if self.device == "cuda" else ("cpu", 0)
        shape = (1, self.io.kv_heads, int(n_ctx), self.io.head_dim)
        self._cache = {past: ort.OrtValue.ortvalue_from_shape_and_type(shape, self.io.dtype, *where)
                       for past, _ in self._names()}

    def prefill(self, ids: list[int]) -> None:
        for i in range(0, len(ids), PREFILL_CHUNK):
            self._advance(np.asarray(ids[i : i + PREFILL_CHUNK], np.int64), every=False)

    def decode(self, n: int) -> None:
        for _ in range(n):
            self._advance(np.array([int(np.argmax(self._last))], np.int64), every=False)

    def _advance(self, chunk: np.ndarray, every: bool = True) -> np.ndarray:
        """Run CHUNK at the current position on the current cache; returns its logits [n, vocab], or where EVERY is
        false and the graph allows it, the last position's alone [1, vocab]."""
        keep = {} if every or not self._keep else {KEEP: np.array(1, np.int64)}
        if self.shared or self.device == "cuda":
            logits = self._run_bound(chunk, keep)
        else:
            logits, self._cache = self.step(chunk, self._start, self._cache, keep)
        self._start += len(chunk)
        self._last = logits[-1]
        return logits

    def _run_bound(self, chunk: np.ndarray, keep: dict[str, np.ndarray]) -> np.ndarray:
        """One step through IO binding: a shared buffer is written in place (present bound to past), a growing cache
        stays on the GPU between steps (present bound to new device tensors)."""
        import onnxruntime as ort

        if self.shared:
            capacity = next(iter(self._cache.values())).shape()[2]
            if self._start + len(chunk) > capacity:
                raise LrdError(f"the KV buffer holds {capacity} positions; {self._start + len(chunk)} were asked for")
        elif not self._cache or isinstance(next(iter(self._cache.values())), np.ndarray):
            self._cache = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in self._cache.items()}
        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # outputs come back in the order they were bound
        for k, v in self._feed(chunk, self._start).items():
            binding.bind_cpu_input(k, v)
        for k, v in keep.items():  # an overridable initializer binds as an OrtValue only
            binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v))
        for past, present in self._names():
            binding.bind_ortvalue_input(past, self._cache[past])
            if self.shared:
                binding.bind_ortvalue_output(present, self._cache[past])
            else:
                binding.bind_output(present, "cuda", 0)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        if not self.shared:
            self._cache = {past: v for (past, _), v in zip(self._names(), values[1:], strict=True)}
        return values[0].numpy()[0]

    def sync(self) -> None:
        pass

    def kv_bytes(self, tokens: int) -> int:
        """What the cache holds now: the whole preallocated buffer when shared."""
        total = 0
        for v in self._cache.values():
            shape = v.shape if isinstance(v, np.ndarray) else v.shape()
            total += int(np.prod(shape)) * self.io.dtype().itemsize
        return total

    def close(self) -> None:
        self._cache = {}

    def _feed(self, ids: np.ndarray, start: int) -> dict[str, np.ndarray]:
        n = ids.shape[-1]
        feed = {"input_ids": ids.reshape(1, n).astype(np.int64),
                "attention_mask": np.ones((1, start + n), np.int64)}
        if self.io.has_position_ids:
            feed["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None]
        return feed

    def empty_cache(self) -> dict[str, np.ndarray]:
        z = np.zeros((1, self.io.kv_heads, 0, self.io.head_dim), self.io.dtype)
        return {past: z for past, _ in self._names()}

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] of one sequence from an empty cache (float32)."""
        feed = {**self._feed(np.asarray(ids.cpu(), np.int64), 0), **self.empty_cache()}
        (out,) = self.session.run(["logits"], feed)
        return torch.from_numpy(np.asarray(out[0], np.float32))

    def step_logits(self, ids: torch.Tensor, prefill: int | list[int] | None = None) -> torch.Tensor:
        """Logits of every position of IDS through the cache: a prefill of PREFILL tokens (or chunks of these sizes,
        one after another), then one token at a time."""
        ids_np = np.asarray(ids.cpu(), np.int64)
        sizes = [len(ids_np)] if prefill is None else [prefill] if isinstance(prefill, int) else list(prefill)
        bounds = np.cumsum([0, *sizes]).tolist()
        chunks = [ids_np[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        chunks += [ids_np[i : i + 1] for i in range(bounds[-1], len(ids_np))]
        self.reset(len(ids_np))
        return torch.from_numpy(np.concatenate([self._advance(c) for c in chunks]).astype(np.float32))

    def step(self, chunk: np.ndarray, start: int, cache: dict,
             keep: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
        """Run CHUNK at position START on a growing CACHE; returns (logits of the chunk, the grown cache)."""
        outs = self.session.run(self._outputs, {**self._feed(chunk, start), **cache, **(keep or {})})
        by_name = dict(zip(self._outputs, outs, strict=True))
        return by_name["logits"][0], {past: by_name[present] for past, present in self._names()}

    def generate(self, ids: torch.Tensor, n_new: int) -> list[int]:
        """Greedy: prefill IDS, then feed back the argmax N_NEW−1 times through the KV cache (no stop at EOS)."""
        chunk = np.asarray(ids.cpu(), np.int64)
        self.reset(len(chunk) + n_new)
        out: list[int] = []
        while len(out) < n_new:
            logits = self._advance(chunk, every=False)
            out.append(int(np.argmax(logits[-1])))
            chunk = np.array([out[-1]], np.int64)
        return out


def session_options(threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


def open_onnxruntime(path: Path, device: str = "auto", threads: int | None = None) -> OnnxDecoder:
    """An export directory (or its model.onnx) opened in onnxruntime, with the tokenizer saved beside it."""
    import onnxruntime as ort

    path = Path(path)
    model = path / MODEL_FILE if path.is_dir() else path
    if not model.is_file():
        raise LrdError(f"no ONNX model at {model}")
    folder = model.parent
    providers = providers_for(device)
    try:
        session = ort.InferenceSession(str(model), sess_options=session_options(threads), providers=providers)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LrdError(f"onnxruntime cannot load {model}: {first}") from None
    genai = _genai_config(folder)
    decoder = genai.get("model", {}).get("decoder", {})
    io = check_decoder_io(session.get_inputs(), session.get_outputs(), model, decoder.get("head_size"))
    shared = bool(genai.get("search", {}).get("past_present_share_buffer", False))
    bpw = None
    if (folder / META_FILE).is_file():
        try:
            bpw = json.loads((folder / META_FILE).read_text()).get("bpw")
        except ValueError:
            raise LrdError(f"{folder / META_FILE} is not valid JSON") from None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise LrdError(f"cannot load the tokenizer in {folder}: {e}") from None
    used = "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"
    config = folder / "config.json"
    limit = json.loads(config.read_text()).get("max_position_embeddings") if config.is_file() else None
    return OnnxDecoder(session, tokenizer, io, bpw, used, limit, shared)


def _genai_config(folder: Path) -> dict:
    """genai_config.json beside the model ({} without one): its cache discipline and head size."""
    path = folder / "genai_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise LrdError(f"{path} is not valid JSON") from None

