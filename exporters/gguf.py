"""GGUF export that stock llama.cpp runs: the base file holds Q, the adapter file holds L·R as a LoRA.

llama.cpp computes every adapted linear as W·x + scale·B·(A·x) with scale = alpha / rank. Writing Q as W, R as A,
L as B and alpha = rank makes that y = Q·x + L·(R·x): the artifact's own QLRLinear, with nothing merged and nothing
requantized. Q goes in as the artifact's raw ggml blocks, so the bytes llama.cpp multiplies with are the bytes the
compressor optimised.

The pure helpers (names, permutations, row checks, vocab, rope factors) come first; `export_gguf` is the driver.
Tensors are produced one at a time while the file is written, so peak memory is one tensor, not the model.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lrdeploy.compressor import arch as archs
from lrdeploy.compressor import grids
from lrdeploy.compressor.embeddings import EMBED, HEAD
from lrdeploy.compressor.sources import permute_rows
from lrdeploy.errors import LrdError
from lrdeploy.files import GGUF_ADAPTER as ADAPTER
from lrdeploy.files import GGUF_BASE as BASE
from lrdeploy.files import GGUF_SUMMARY as SUMMARY
from lrdeploy.io import atomic_write_json, output_lock, staged_output

QT = gguf.GGMLQuantizationType
FLOATS: dict[str, tuple[np.dtype, QT]] = {
    "f32": (np.dtype(np.float32), QT.F32),
    "f16": (np.dtype(np.float16), QT.F16),
}
FILE_TYPES = {
    "q2_k": gguf.LlamaFileType.MOSTLY_Q2_K,
    "q3_k": gguf.LlamaFileType.MOSTLY_Q3_K_S,
    "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "f32": gguf.LlamaFileType.ALL_F32,
}
# Split regexes of well-known byte-level BPE tokenizers (from their tokenizer.json) -> llama.cpp pre-tokenizer name
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
KNOWN_SPLITS = {_WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe", _WORDS + r"\p{N}" + _REST: "qwen2"}


# ---------------------------------------------------------------------------------------------------------------------
# pure helpers


@dataclass(frozen=True)
class TensorOut:
    """One tensor of an output file; `data` produces it only when it is written."""

    name: str
    qtype: QT
    shape: tuple[int, ...]  # logical shape, numpy order (rows first)
    data: Callable[[], np.ndarray]

    @property
    def quantized(self) -> bool:
        return self.qtype not in (QT.F32, QT.F16)

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size

    @property
    def array_shape(self) -> tuple[int, ...]:
        """Shape of the array `data` returns: quantized tensors come as (rows, row bytes) uint8."""
        if not self.quantized:
            return self.shape
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return (math.prod(self.shape[:-1]), self.shape[-1] // block * size)

    @property
    def array_dtype(self) -> np.dtype:
        if self.quantized:
            return np.dtype(np.uint8)
        return np.dtype(np.float32 if self.qtype == QT.F32 else np.float16)


def gguf_arch(model_type: str) -> str:
    """llama.cpp's general.architecture for a transformers model_type (the registry's `gguf`)."""
    if model_type not in archs.ARCHS:
        raise LrdError(f"GGUF export does not support architecture '{model_type}'; "
                       f"supported: {', '.join(archs.SUPPORTED)}")
    return archs.ARCHS[model_type].gguf


def name_map(arch: str, n_layers: int) -> gguf.TensorNameMap:
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    return gguf.get_tensor_name_map(arch_enum, n_layers)


def gguf_name(tmap: gguf.TensorNameMap, hf_name: str) -> str:
    """llama.cpp's name for a transformers parameter name."""
    name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise LrdError(f"no llama.cpp tensor name for '{hf_name}'")
    return name


def qk_heads(hf_name: str, config: Any, arch: str) -> int | None:
    """Heads to permute the rows of HF_NAME by (llama q/k weights and biases), or None."""
    if not archs.by_gguf(arch).permute_qk:  # llama.cpp's llama rope pairs rows differently from HF
        return None
    if ".self_attn.q_proj." in hf_name + ".":
        return config.num_attention_heads
    if ".self_attn.k_proj." in hf_name + ".":
        return config.num_key_value_heads
    return None


def permute(a: np.ndarray, heads: int | None) -> np.ndarray:
    """llama.cpp's q/k row order; whole rows move, so rows of raw ggml blocks stay intact."""
    if heads is None:
        return a
    return permute_rows(torch.from_numpy(np.ascontiguousarray(a)), heads).numpy()


def block_rows(t: torch.Tensor, qtype: QT, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Raw ggml bytes as (rows, row bytes); valid only for a per-row layout (each row a whole number of blocks)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, n = math.prod(shape[:-1]), shape[-1]
    a = t.contiguous().view(torch.uint8).reshape(-1).numpy()
    if n % block or a.size != rows * (n // block) * size:
        raise LrdError(f"{what}: {a.size} bytes do not hold a {'x'.join(map(str, shape))} {qtype.name} tensor")
    return a.reshape(rows, n // block * size)


def row_fit_problem(name: str, entry: dict) -> str | None:
    """Why a linear's stored blocks cannot become GGUF rows (rows must be whole blocks), or None."""
    out, in_ = entry["shape"]
    rank = entry.get("rank") or 0
    parts = []
    if entry.get("q_format"):
        parts.append(("Q", entry["q_format"], (out, in_)))
    if rank and entry.get("lr_format") in grids.GRIDS:
        parts += [("R", entry["lr_format"], (rank, in_)), ("L", entry["lr_format"], (out, rank))]
    for part, fmt, shape in parts:
        if fmt not in grids.GRIDS:
            return f"{name}: unknown {part} format '{fmt}'"
        reason = grids.get_grid(fmt).fits(shape, per_row=True)
        if reason is not None:
            return f"{name}: {part} in {fmt}: {reason}"
    return None


def fallback_summary(linears: dict) -> str:
    """One line: how many linears fell back to another format than asked, and to what."""
    fell = {k: e["fallback"] for k, e in linears.items() if e.get("fallback")}
    if not fell:
        return f"no fallbacks: all {len(linears)} linears use their requested format"
    moves = Counter(str(v).rsplit(": ", 1)[-1] for v in fell.values())
    name, reason = next(iter(fell.items()))
    parts = ", ".join(f"{m} x{c}" for m, c in moves.most_common())
    return f"{len(fell)} of {len(linears)} linears fell back ({parts}); e.g. {name}: {reason}"


def file_type(formats: list[str]) -> int:
    """general.file_type: the most common linear format (informational; llama.cpp reads each tensor's type)."""
    if not formats:
        return int(gguf.LlamaFileType.MOSTLY_F16)
    return int(FILE_TYPES.get(Counter(formats).most_common(1)[0][0], gguf.LlamaFileType.GUESSED))


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json; 'default' when unrecognised."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split":
        return KNOWN_SPLITS.get((steps[0].get("pattern") or {}).get("Regex", ""), "default")
    return "default"


def bpe_vocab(tokenizer_json: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and llama.cpp token types of a byte-level BPE tokenizer.json, padded to the embedding's rows."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type", "?") + (" with byte fallback" if model.get("byte_fallback") else "")
        raise LrdError(f"GGUF export from an HF model supports byte-level BPE tokenizers; this one is {kind}")
    tokens: list[str | None] = [None] * n_vocab
    types = [int(gguf.TokenType.NORMAL)] * n_vocab
    for tok, i in model.get("vocab", {}).items():
        if i < n_vocab:
            tokens[i] = tok
    for added in tokenizer_json.get("added_tokens", []):
        i = added["id"]
        if i < n_vocab:
            tokens[i] = added["content"]
            types[i] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    for i, tok in enumerate(tokens):
        if tok is None:
            tokens[i] = f"[PAD{i}]"
            types[i] = int(gguf.TokenType.UNUSED)
    return [t for t in tokens if t is not None], types


def rope_parameters(config: Any) -> dict:
    """Rope settings of the full-attention layers as one dict (transformers 5 has rope_parameters, per layer kind
    for gemma3; earlier versions rope_theta + rope_scaling)."""
    return archs.rope_for(config, "full_attention")


def arch_problem(config: Any) -> str | None:
    """What llama.cpp's graph for this architecture cannot express about CONFIG, or None.

    llama.cpp's gemma3 fixes what transformers' config makes free: every sixth layer global, the sliding layers'
    RoPE base at 10000 unscaled, the attention scale at 1/√head_dim, and no logit soft-capping."""
    if config.model_type != "gemma3_text":
        return None
    types = archs.layer_types(config)
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(types))]
    if types != pattern:
        return "llama.cpp's gemma3 makes every sixth layer global; this model's layer_types differ"
    local = archs.rope_for(config, "sliding_attention")
    if local["rope_type"] != "default" or float(local["rope_theta"]) != 10000.0:
        return "llama.cpp's gemma3 runs the sliding layers with RoPE base 10000, unscaled; this model's differ"
    if abs(archs.attention_scale(config) - archs.head_dim(config) ** -0.5) > 1e-9:
        return "llama.cpp's gemma3 scales attention by 1/√head_dim; this model's query_pre_attn_scalar differs"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        return "llama.cpp's gemma3 has no logit soft-capping; this model sets it"
    return None


def norm_shifted(get: Callable[[], torch.Tensor], offset: float) -> torch.Tensor:
    """A norm weight as llama.cpp's converter stores it for gemma: offset + w."""
    return get().float() + offset


def llama3_rope_factors(head_dim: int, params: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling: llama.cpp's rope_freqs tensor (n_rot/2 floats)."""
    theta, factor = float(params["rope_theta"]), float(params["factor"])
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params["original_max_position_embeddings"])
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    factors = 1.0 / ((1.0 - smooth) / factor + smooth)  # 1 for short wavelengths, `factor` for long ones
    return factors.astype(np.float32)


def requantize(W: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W rounded to FMT's grid (per-row layout): (values, raw bytes)."""
    grid = grids.get_grid(fmt)
    reason = grid.fits(W.shape, per_row=True)
    if reason is not None:
        raise LrdError(f"cannot requantize a {W.shape[0]}x{W.shape[1]} weight to {fmt}: {reason}")
    return grid.quantize_rtn(W)


def tensors_bpw(tensors: list[TensorOut]) -> float | None:
    """Linear bpw of what is written (base linears plus their LoRA parts), the way `lrdeploy inspect` counts it."""
    from lrdeploy.runtime.inspect import linear_bpw

    return linear_bpw([{"name": t.name, "shape": list(t.shape), "bytes": t.nbytes} for t in tensors])


def rel_frobenius(A: torch.Tensor, B: torch.Tensor) -> float:
    """‖A − B‖ / ‖B‖ in float64 (0 when B is zero)."""
    den = float(B.double().norm())
    return float((A.double() - B.double()).norm()) / den if den > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# metadata


KV = Callable[[gguf.GGUFWriter], None]
_SKIP_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.type")


def copied_metadata(path: Path, ftype: int) -> KV:
    """A source GGUF's metadata and tokenizer, as they are, with our file type."""
    reader = gguf.GGUFReader(path)
    fields = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _SKIP_KEYS:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 2:
            raise LrdError(f"{path}: nested array metadata '{key}' is not supported")
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        fields.append((key, field.contents(), vtype, sub))

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        for key, value, vtype, sub in fields:
            w.add_key_value(key, value, vtype, sub)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    return fill


def hf_metadata(config: Any, tok_dir: Path, arch: str, ftype: int, name: str) -> tuple[KV, str]:
    """Architecture and tokenizer metadata of an HF model, written through the gguf package; (fill, pre name)."""
    file = tok_dir / "tokenizer.json"
    if not file.is_file():
        raise LrdError(f"{tok_dir} has no tokenizer.json; GGUF export from an HF model needs one")
    try:
        tj = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LrdError(f"cannot read {file}: {e}") from None
    tokens, types = bpe_vocab(tj, config.vocab_size)
    pre = pre_tokenizer_name(tj)
    special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=len(tokens))
    heads = config.num_attention_heads
    head_dim = archs.head_dim(config)
    rope = rope_parameters(config)
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        raise LrdError(f"GGUF export does not support rope type '{rope['rope_type']}' yet")
    extra = archs.get(config).gguf_extra
    window = getattr(config, "sliding_window", None) if "sliding_window" in extra else None

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        w.add_rope_freq_base(float(rope["rope_theta"]))
        w.add_rope_dimension_count(archs.rotary_dim(config))
        if "swa_rope" in extra:
            w.add_float32(gguf.Keys.Rope.FREQ_BASE_SWA.format(arch=arch),
                          float(archs.rope_for(config, "sliding_attention")["rope_theta"]))
        if window:
            w.add_sliding_window(int(window))
        if head_dim * heads != config.hidden_size or "key_length" in extra:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if rope["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_vocab_size(config.vocab_size)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        special.add_to_gguf(w, quiet=True)

    return fill, pre


def adapter_metadata(rank: int, name: str) -> KV:
    """general.type = adapter, adapter.type = lora, alpha = rank: llama.cpp's scale alpha/rank is then exactly 1."""

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
        w.add_name(name)

    return fill


def write_gguf(path: Path, arch: str, fill: KV, tensors: list[TensorOut]) -> int:
    """Write one GGUF, streaming tensor data; returns the file size."""
    w = gguf.GGUFWriter(path, arch)
    try:
        fill(w)
        for t in tensors:
            w.add_tensor_info(t.name, t.array_shape, t.array_dtype, t.nbytes, raw_dtype=t.qtype if t.quantized
                              else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            a = np.ascontiguousarray(t.data())
            if a.shape != t.array_shape or a.dtype != t.array_dtype:
                raise AssertionError(f"{t.name}: produced {a.dtype}{a.shape}, expected {t.array_dtype}{t.array_shape}")
            w.write_tensor_data(a)
    finally:
        w.close()
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------------------------------
# tensor producers (run while writing)


def _float(get: Callable[[], torch.Tensor], dtype: np.dtype, heads: int | None) -> np.ndarray:
    return permute(get().float().numpy().astype(dtype), heads)


def _stored_rows(t: Any) -> np.ndarray:
    """A source GGUF tensor's bytes as stored: floats viewed as floats, blocks as (rows, row bytes)."""
    raw = np.array(t.raw())
    if QT(t.qtype) == QT.F32:
        return raw.view(np.float32).reshape(t.shape)
    if QT(t.qtype) == QT.F16:
        return raw.view(np.float16).reshape(t.shape)
    return raw


def _dequant_stored(t: Any, dtype: np.dtype) -> np.ndarray:
    data = gguf.quants.dequantize(np.asarray(t.raw()), QT(t.qtype))
    return np.asarray(data, dtype=np.float32).reshape(t.shape).astype(dtype)


def _stored_tensor(t: Any, name: str, dtype: np.dtype | None) -> TensorOut:
    """A source GGUF tensor copied as stored (DTYPE None, or 1-D), else dequantized to the float DTYPE."""
    target = None if dtype is None else (QT.F32 if dtype == np.float32 else QT.F16)
    if target is None or len(t.shape) < 2 or QT(t.qtype) == target:
        return TensorOut(name, QT(t.qtype), tuple(t.shape), partial(_stored_rows, t))
    return TensorOut(name, target, tuple(t.shape), partial(_dequant_stored, t, dtype))


# ---------------------------------------------------------------------------------------------------------------------
# driver


@dataclass
class _Plan:
    base: list[TensorOut]
    adapter: list[TensorOut]
    rank: int
    merge_errors: dict[str, float]
    lr_shares: dict[str, float]


def export_gguf(source: str, out_dir: Path, *, dtype: str = "f16", merge: bool = False, force: bool = False) -> dict:
    """Export an artifact (base + LoRA adapter, or one merged file) or an uncompressed model to OUT_DIR."""
    from lrdeploy.artifact import is_artifact

    if dtype not in FLOATS:
        raise LrdError(f"unknown --dtype '{dtype}' for GGUF; choose f32 or f16")
    out_dir = Path(out_dir)
    with output_lock(out_dir):  # before OUT_DIR and its .partial are looked at: a second export must not touch them
        if out_dir.exists() and not force:
            raise LrdError(f"{out_dir} already exists; pass --force to overwrite it")
        src_path = Path(source).expanduser()
        artifact = is_artifact(src_path)
        if not artifact and src_path.is_dir() and not (src_path / "config.json").exists():
            raise LrdError(f"{src_path} is neither an lrdeploy artifact nor a model directory")
        if not artifact and merge:
            raise LrdError("--merge applies to compressed artifacts only")
        with staged_output(out_dir, force) as tmp:
            if artifact:
                summary = _export_artifact(src_path, tmp, FLOATS[dtype][0], dtype, merge)
            else:
                summary = _export_model(source, tmp, FLOATS[dtype][0], dtype)
            summary["output"] = str(out_dir)
            atomic_write_json(tmp / SUMMARY, summary)
    summary["message"] = _message(summary, out_dir)
    return summary


def _export_artifact(path: Path, tmp: Path, np_dtype: np.dtype, dtype: str, merge: bool) -> dict:
    from transformers import AutoConfig

    from lrdeploy.artifact import ArtifactTensors, read_manifest
    from lrdeploy.compressor.sources import read_gguf_index
    from lrdeploy.io import sha256_file

    manifest = read_manifest(path)
    linears: dict = manifest["linears"]
    target = (manifest.get("options") or {}).get("target", "?")
    if manifest.get("rotate_down") is not None:
        raise LrdError(f"{path} was compressed with --rotate-down: its down_proj reads a rotated input that llama.cpp "
                       "cannot compute; export it with --format onnx, or compress without --rotate-down")
    for name, entry in linears.items():
        problem = row_fit_problem(name, entry)
        if problem is not None:
            raise LrdError(f"{problem}, so its blocks cross rows and GGUF cannot hold them (artifact compressed with "
                           f"--target {target}); compress with --target gguf")
        if not merge and entry.get("rank") and not entry.get("q_format"):
            raise LrdError(f"{name} has no Q (method {manifest.get('method')}): llama.cpp's LoRA needs a base tensor; "
                           "export with --merge")
    ranks = {e["rank"] for e in linears.values() if e.get("rank")}
    if len(ranks) > 1 and not merge:
        raise LrdError(f"linears have different ranks {sorted(ranks)}; one LoRA alpha cannot scale them all to 1")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise LrdError(f"cannot read {path / 'config.json'}: {e}") from None
    arch = _checked_arch(config)
    tmap = name_map(arch, config.num_hidden_layers)
    get = ArtifactTensors(path, manifest)
    formats = [e["q_format"] or dtype for e in linears.values()]
    ftype = file_type(formats)

    # Metadata and untouched tensors: from the source GGUF when it is still there, byte for byte; else from the
    # artifact's config, tokenizer files and stored tensors.
    src = manifest.get("source") or {}
    src_file = Path(src.get("path", ""))
    from_gguf = (src.get("kind") == "gguf" and src_file.is_file() and src.get("sha256")
                 and sha256_file(src_file) == src["sha256"])
    linear_by_gguf = {gguf_name(tmap, n + ".weight"): n for n in linears}
    plan = _plan_linears(linears, get, config, arch, tmap, merge, np_dtype)
    vocab = _vocab_tensors(get, tmap, np_dtype)  # the embedding and head in the artifact's formats, when recorded
    untouched: list[TensorOut] = []
    if from_gguf:
        garch, stored = read_gguf_index(src_file)
        if garch != arch:
            raise LrdError(f"the source GGUF {src_file} is '{garch}', the artifact's config says '{arch}'")
        missing = set(linear_by_gguf) - set(stored)
        if missing:
            raise LrdError(f"the source GGUF {src_file} lacks {sorted(missing)[0]}")
        # a `tensors` table replaces the source's token_embd and output (an artifact without a head has none)
        replaced = {gguf_name(tmap, n) for n in (EMBED, HEAD)} if get.tensors else set()
        # a rotated artifact's norms (ones) and rotated biases are its own: the source's would undo the rotation
        rotated = (manifest.get("options") or {}).get("rotate", "none") != "none"
        own = _artifact_untouched(get, config, tmap, linears, np_dtype, arch) if rotated else {}
        untouched = [own.get(n) or _stored_tensor(t, n, None) for n, t in stored.items()
                     if n not in linear_by_gguf and n not in replaced] + vocab
        fill = copied_metadata(src_file, ftype)
        meta_from, pre = f"copied from {src_file.name}", None
        untouched_as = "copied as the source GGUF stores them"
    else:
        untouched += vocab + list(_artifact_untouched(get, config, tmap, linears, np_dtype, arch).values())
        untouched += _rope_tensors(config, head_dim=getattr(config, "head_dim", None))
        fill, pre = hf_metadata(config, path, arch, ftype, _model_name(path))
        meta_from = "written from config.json and tokenizer.json"
        untouched_as = f"{dtype} (1-D tensors f32)"
        if src.get("kind") == "gguf":
            meta_from += f" (source GGUF {src_file} missing or changed)"

    files = {BASE: write_gguf(tmp / BASE, arch, fill, untouched + plan.base)}
    if plan.adapter:
        files[ADAPTER] = write_gguf(tmp / ADAPTER, arch, adapter_metadata(plan.rank, _model_name(path) + " L·R"),
                                    plan.adapter)
    copy_tokenizer_files(path, tmp)

    summary: dict = {
        "format": "gguf",
        "kind": "merged" if merge else ("base+adapter" if plan.adapter else "base"),
        "source": str(path),
        "architecture": arch,
        "files": files,
        "bytes": sum(files.values()),
        "bpw": tensors_bpw(untouched + plan.base + plan.adapter),
        "artifact_bpw": manifest.get("summary", {}).get("bpw"),
        "rank": plan.rank,
        "base_tensors": len(untouched) + len(plan.base),
        "adapter_tensors": len(plan.adapter),
        "metadata": meta_from,
        "untouched_tensors": untouched_as,
        "vocab_tensors": {t.name: t.qtype.name.lower() for t in vocab},
        "tokenizer_pre": pre,
        "fallbacks": fallback_summary(linears),
        "fallback_count": sum(1 for e in linears.values() if e.get("fallback")),
    }
    if merge:
        errs = list(plan.merge_errors.values())
        shares = list(plan.lr_shares.values())
        summary["merge_error"] = {
            "metric": "relative Frobenius error of the merged weight vs the artifact's Q + L·R",
            "mean": float(np.mean(errs)) if errs else 0.0,
            "max": float(np.max(errs)) if errs else 0.0,
            "lr_share_mean": float(np.mean(shares)) if shares else 0.0,
            "per_linear": plan.merge_errors,
        }
    return summary


def _plan_linears(linears: dict, get: Any, config: Any, arch: str, tmap: gguf.TensorNameMap, merge: bool,
                  np_dtype: np.dtype) -> _Plan:
    """Q tensors for the base, L/R for the adapter (or merged weights), each produced only when written."""
    base: list[TensorOut] = []
    adapter: list[TensorOut] = []
    merge_errors: dict[str, float] = {}
    lr_shares: dict[str, float] = {}
    rank = 0
    for name, e in linears.items():
        out, in_ = e["shape"]
        r = e.get("rank") or 0
        fmt = e.get("q_format")
        heads = qk_heads(name + ".weight", config, arch)
        gname = gguf_name(tmap, name + ".weight")
        if merge and r:
            qtype = grids.get_grid(fmt).ggml_type if fmt else FLOATS["f32" if np_dtype == np.float32 else "f16"][1]
            produce = partial(_merged, get, name, fmt, np_dtype, heads, qtype, (out, in_), merge_errors, lr_shares)
            base.append(TensorOut(gname, qtype, (out, in_), produce))
            continue
        if fmt:
            qtype = grids.get_grid(fmt).ggml_type
            base.append(TensorOut(gname, qtype, (out, in_), partial(_q_rows, get, name, qtype, (out, in_), heads)))
        if r:
            rank = r
            lr = e.get("lr_format") or "f16"
            qtype = grids.get_grid(lr).ggml_type if lr in grids.GRIDS else QT.F16
            # lora_a = R (r x in) keeps its rows; lora_b = L (out x r) has W's rows, so it is permuted like Q
            sides = ((".lora_a", "lora_r", (r, in_), None), (".lora_b", "lora_l", (out, r), heads))
            for suffix, key, shape, h in sides:
                produce = partial(_lr_part, get, f"{name}.{key}", qtype, shape, h)
                adapter.append(TensorOut(gname + suffix, qtype, shape, produce))
    return _Plan(base, adapter, rank, merge_errors, lr_shares)


def _vocab_tensors(get: Any, tmap: gguf.TensorNameMap, np_dtype: np.dtype) -> list[TensorOut]:
    """The artifact's `tensors` table as GGUF tensors: blocks as their own ggml type, floats in the export dtype."""
    outs = []
    for name, e in get.tensors.items():
        shape = tuple(e["shape"])
        if e.get("q_format"):
            qtype = QT[e["q_format"].upper()]
            produce = partial(_vocab_rows, get, f"{name}.q", qtype, shape)
        else:
            qtype = QT.F16 if np_dtype == np.float16 else QT.F32
            produce = partial(_float, partial(get, name), np_dtype, None)
        outs.append(TensorOut(gguf_name(tmap, name), qtype, shape, produce))
    return outs


def _vocab_rows(get: Any, key: str, qtype: QT, shape: tuple[int, ...]) -> np.ndarray:
    return block_rows(get.raw(key), qtype, shape, key)


def _q_rows(get: Any, name: str, qtype: QT, shape: tuple[int, int], heads: int | None) -> np.ndarray:
    return permute(block_rows(get.raw(f"{name}.q"), qtype, shape, f"{name}.q"), heads)


def _lr_part(get: Any, key: str, qtype: QT, shape: tuple[int, int], heads: int | None) -> np.ndarray:
    t = get.raw(key)
    if qtype == QT.F16:
        a = t.to(torch.float16).reshape(shape).numpy()  # the artifact stores f16 factors: exact
    else:
        a = block_rows(t, qtype, shape, key)
    return permute(a, heads)


def _merged(get: Any, name: str, fmt: str | None, np_dtype: np.dtype, heads: int | None, qtype: QT,
            shape: tuple[int, int], errors: dict, shares: dict) -> np.ndarray:
    """Q + L·R requantized to Q's format (or cast to the float dtype when there is no Q); records the extra error."""
    LR = get(f"{name}.lora_l") @ get(f"{name}.lora_r")
    W = LR + get(f"{name}.q") if fmt else LR
    if fmt:
        values, raw = requantize(W, fmt)
        a = block_rows(raw, qtype, shape, name)
    else:
        a = W.numpy().astype(np_dtype)
        values = torch.from_numpy(a.astype(np.float32))
    errors[name] = rel_frobenius(values, W)
    shares[name] = rel_frobenius(W - LR, W) if fmt else 1.0  # what dropping L·R altogether would cost
    return permute(a, heads)


def _checked_arch(config: Any) -> str:
    """general.architecture for CONFIG, after checking llama.cpp's graph can run it as transformers does."""
    arch = gguf_arch(config.model_type)
    problem = arch_problem(config)
    if problem is not None:
        raise LrdError(f"GGUF export: {problem}")
    return arch


def _artifact_untouched(get: Any, config: Any, tmap: gguf.TensorNameMap, linears: dict, np_dtype: np.dtype,
                        arch: str) -> dict[str, TensorOut]:
    """Every tensor the artifact stores besides its linears' Q, L, R and its embedding and head (norms, biases), by
    GGUF name: 2-D ones in NP_DTYPE, 1-D ones in float32."""
    parts = tuple(f"{n}.{k}" for n in linears for k in ("q", "lora_l", "lora_r"))
    parts += tuple(get.tensors) + tuple(f"{n}.q" for n in get.tensors)
    out: dict[str, TensorOut] = {}
    for hf_name, info in get.header.items():
        if hf_name in parts or (hf_name == HEAD and config.tie_word_embeddings):
            continue
        shape = tuple(info["shape"])
        kind = np_dtype if len(shape) == 2 else np.dtype(np.float32)
        name = gguf_name(tmap, hf_name)
        out[name] = TensorOut(name, QT.F16 if kind == np.float16 else QT.F32, shape,
                              partial(_float, _getter(get, hf_name, config), kind, qk_heads(hf_name, config, arch)))
    return out


def _getter(get: Callable[[str], torch.Tensor], hf_name: str, config: Any) -> Callable[[], torch.Tensor]:
    """A producer of HF_NAME's values as the GGUF stores them (gemma's norms as 1 + w)."""
    offset = archs.get(config).norm_offset
    if offset and hf_name.endswith("norm.weight"):
        return partial(norm_shifted, partial(get, hf_name), offset)
    return partial(get, hf_name)


def _rope_tensors(config: Any, head_dim: int | None) -> list[TensorOut]:
    """llama.cpp keeps Llama 3.1's rope scaling as a tensor of per-frequency divisors."""
    rope = rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return []
    hd = head_dim or config.hidden_size // config.num_attention_heads
    factors = llama3_rope_factors(hd, rope)
    return [TensorOut("rope_freqs.weight", QT.F32, factors.shape, lambda: factors)]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """The HF tokenizer beside the GGUFs: the llamacpp backend tokenizes with it, like the torch backend."""
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise LrdError(f"{src} has no tokenizer files")
    for f in copied:
        shutil.copy2(src / f, dst / f)


def _model_name(path: Path) -> str:
    return Path(path).resolve().name


def _export_model(source: str, tmp: Path, np_dtype: np.dtype, dtype: str) -> dict:
    """An uncompressed model in DTYPE (1-D tensors stay f32): the baseline that benchmarks compare against."""
    from lrdeploy.compressor.sources import open_source, read_gguf_index

    src = open_source(source)
    arch = _checked_arch(src.config)
    ftype = int(FILE_TYPES[dtype])
    if src.kind == "gguf":
        garch, stored = read_gguf_index(src.path)
        if garch != arch:
            raise LrdError(f"{src.path}: general.architecture '{garch}' is not the expected '{arch}'")
        tensors = [_stored_tensor(t, n, np_dtype) for n, t in stored.items()]
        fill = copied_metadata(src.path, ftype)
        pre, meta_from = None, f"copied from {src.path.name}"
    else:
        from lrdeploy.compressor.model import skeleton

        tmap = name_map(arch, src.config.num_hidden_layers)
        shapes = {k: tuple(v.shape) for k, v in skeleton(src.config).state_dict().items()}
        tensors = []
        for name in src.names():
            if name == "lm_head.weight" and src.config.tie_word_embeddings:
                continue
            if name not in shapes:
                raise LrdError(f"{source}: unexpected tensor {name}")
            kind = np_dtype if len(shapes[name]) == 2 else np.dtype(np.float32)
            qtype = QT.F16 if kind == np.float16 else QT.F32
            heads = qk_heads(name, src.config, arch)
            tensors.append(TensorOut(gguf_name(tmap, name), qtype, shapes[name],
                                     partial(_float, _getter(src.tensor, name, src.config), kind, heads)))
        tensors += _rope_tensors(src.config, getattr(src.config, "head_dim", None))
        fill, pre = hf_metadata(src.config, src.path, arch, ftype, _model_name(src.path))
        meta_from = "written from config.json and tokenizer.json"
    files = {BASE: write_gguf(tmp / BASE, arch, fill, tensors)}
    src.tokenizer().save_pretrained(str(tmp))

    return {
        "format": "gguf",
        "kind": f"uncompressed {dtype}",
        "source": source,
        "architecture": arch,
        "files": files,
        "bytes": sum(files.values()),
        "bpw": tensors_bpw(tensors),
        "base_tensors": len(tensors),
        "adapter_tensors": 0,
        "metadata": meta_from,
        "tokenizer_pre": pre,
    }


def _message(summary: dict, out_dir: Path) -> str:
    files = ", ".join(f"{out_dir / n} ({b / 1e6:.1f} MB)" for n, b in summary["files"].items())
    lines = [f"wrote {files}: {summary['kind']}, {summary['architecture']}, linear bpw {summary['bpw']:.3f}"
             + (f", LoRA rank {summary['rank']} (alpha = rank)" if summary.get("adapter_tensors") else "")]
    if "merge_error" in summary:
        m = summary["merge_error"]
        lines.append(f"merge: requantizing Q + L·R adds a relative error of {m['mean']:.4f} on average "
                     f"(max {m['max']:.4f}); dropping L·R instead would cost {m['lr_share_mean']:.4f}")
    if summary.get("fallbacks"):
        lines.append(summary["fallbacks"])
    return "\n".join(lines)
