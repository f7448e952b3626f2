"""Model sources: an HF directory, a hub id, a .gguf file or the bundled SmolLM2, read one tensor at a time.

Tensors are served under their transformers names, dequantized to float32, so the streaming driver can build one
decoder block at a time without materializing the whole model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lrdeploy.compressor import arch as archs
from lrdeploy.compressor.named import NAMES, SMOLLM2, named_path, smollm2_path  # noqa: F401 - re-exported
from lrdeploy.errors import LrdError
from lrdeploy.io import cache_root, sha256_file


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's converter permutation of q/k rows (pairs of rotary halves interleaved per head)."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: the inverse of unpermute_rows."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass
class ModelSource:
    """A model readable tensor by tensor under transformers names."""

    spec: str
    kind: str  # "hf" or "gguf"
    path: Path  # the .gguf file, or the HF directory
    config: object
    _index: dict[str, object] = field(default_factory=dict, repr=False)
    gguf_arch: str = ""  # general.architecture of a GGUF source; decides the q/k row permutation

    @property
    def arch(self) -> str:
        return self.config.model_type

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    def names(self) -> list[str]:
        return list(self._index)

    def has(self, name: str) -> bool:
        return name in self._index

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor as float32 (integer tensors keep their dtype)."""
        if name not in self._index:
            raise LrdError(f"tensor {name} is missing from {self.path}")
        if self.kind == "gguf":
            return self._gguf_tensor(name)
        from safetensors import safe_open

        file = self._index[name]
        try:
            with safe_open(str(file), framework="pt") as f:
                t = f.get_tensor(name)
        except Exception as e:  # safetensors raises several types for corrupt files
            raise LrdError(f"cannot read {name} from {file}: {e}") from None
        return t.float() if t.is_floating_point() else t

    def stored(self, name: str) -> torch.Tensor:
        """One tensor in the dtype the source stores it (GGUF blocks come back dequantized to float32)."""
        if self.kind == "gguf":
            return self._gguf_tensor(name)
        from safetensors import safe_open

        file = self._index[name]
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:  # safetensors raises several types for corrupt files
            raise LrdError(f"cannot read {name} from {file}: {e}") from None

    def native(self, name: str) -> tuple[str | None, torch.Tensor]:
        """A tensor exactly as stored, never widened: (ggml type name, raw blocks (rows, row bytes) as uint8) for a
        block-quantized GGUF tensor, else (None, the tensor in its stored dtype). Rows stay in the file's order."""
        if self.kind != "gguf":
            return None, self.stored(name)
        import gguf

        t = self._index[name]
        qtype = gguf.GGMLQuantizationType(t.qtype)
        raw = np.array(t.raw())
        floats = {gguf.GGMLQuantizationType.F32: torch.float32, gguf.GGMLQuantizationType.F16: torch.float16,
                  gguf.GGMLQuantizationType.BF16: torch.bfloat16}
        if qtype in floats:
            return None, torch.from_numpy(raw).view(floats[qtype]).reshape(t.shape)
        return qtype.name.lower(), torch.from_numpy(raw)

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows INDEX (any shape) of a 2-D tensor as float32, shape (*index.shape, cols): an embedding lookup. A GGUF
        dequantizes only those rows (not for a llama GGUF's q/k, whose rows are permuted)."""
        flat = index.reshape(-1).cpu()
        if self.kind != "gguf":
            picked = self.stored(name)[flat].float()
        else:
            t = self._index[name]
            picked = self._gguf_rows(t, np.asarray(t.raw()[flat.numpy()]))
        return picked.reshape(*index.shape, -1)

    def row_chunks(self, name: str, rows: int):
        """A 2-D tensor as float32 chunks of ROWS rows, top to bottom; a GGUF dequantizes one chunk at a time."""
        if self.kind != "gguf":
            w = self.stored(name)
            for start in range(0, w.shape[0], rows):
                yield w[start : start + rows].float()
            return
        t = self._index[name]
        raw = t.raw()
        for start in range(0, raw.shape[0], rows):
            yield self._gguf_rows(t, np.asarray(raw[start : start + rows]))

    @staticmethod
    def _gguf_rows(t: GGUFTensor, raw: np.ndarray) -> torch.Tensor:
        import gguf

        data = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.qtype))
        return torch.from_numpy(np.array(data, dtype=np.float32).reshape(raw.shape[0], t.shape[-1]))

    def _gguf_tensor(self, name: str) -> torch.Tensor:
        t = self._index[name]
        w = self._gguf_rows(t, t.raw()).reshape(t.shape)
        arch = archs.by_gguf(self.gguf_arch)
        if arch.permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.config.num_attention_heads if "q_proj" in name else self.config.num_key_value_heads
            w = unpermute_rows(w, heads)
        if arch.norm_offset and name.endswith("norm.weight"):  # llama.cpp's converter stores gemma's 1 + w
            w = w - arch.norm_offset
        return w

    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            if self.kind == "gguf":
                return AutoTokenizer.from_pretrained(str(gguf_meta_cache(self.path)))
            return AutoTokenizer.from_pretrained(str(self.path))
        except Exception as e:
            raise LrdError(f"cannot load the tokenizer of {self.spec}: {e}") from None

    def save_meta(self, out: Path) -> None:
        """Write config.json and the tokenizer files, so an artifact is self-contained."""
        self.config.save_pretrained(str(out))
        self.tokenizer().save_pretrained(str(out))

    def digest(self) -> str:
        if self.kind == "gguf":
            return sha256_file(self.path)
        files = sorted({str(f) for f in self._index.values()}) + [str(self.path / "config.json")]
        import hashlib

        h = hashlib.sha256()
        for f in files:
            h.update(Path(f).name.encode())
            h.update(sha256_file(Path(f)).encode())
        return h.hexdigest()


def open_source(spec: str) -> ModelSource:
    """Resolve SPEC: a named source (smollm2, qwen2.5-coder-1.5b), a .gguf file, an HF directory, or a hub id."""
    if spec in NAMES:
        return _open_gguf(spec, named_path(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LrdError(f"no such file: {path}")
        return _open_gguf(spec, path)
    if path.is_dir():
        if (path / "lrdeploy.json").exists():
            raise LrdError(f"{path} is an lrdeploy artifact, not a source model")
        if not (path / "config.json").is_file():
            raise LrdError(f"{path} is not a model directory (no config.json)")
        return _open_hf(spec, path)
    if path.exists():
        raise LrdError(f"{path} is not a model: expected a directory with config.json or a .gguf file")
    if looks_like_hub_id(spec):
        return _open_hf(spec, _download(spec))
    raise LrdError(f"no such file or directory: {spec}")


def looks_like_hub_id(spec: str) -> bool:
    """'org/name' that names nothing here: a mistyped 'out/model' (its folder 'out' exists) is a path, not a hub id."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).parent.is_dir()


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LrdError(f"cannot fetch '{repo_id}' from the hub (offline or not found): {first}") from None
    return Path(local)


def _open_hf(spec: str, path: Path) -> ModelSource:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise LrdError(f"cannot read {path / 'config.json'}: {e}") from None
    archs.get(config)
    index: dict[str, object] = {}
    sharded = path / "model.safetensors.index.json"
    if sharded.is_file():
        try:
            weight_map = json.loads(sharded.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise LrdError(f"corrupt {sharded}: {e}") from None
        index = {name: path / file for name, file in weight_map.items()}
    elif (path / "model.safetensors").is_file():
        from lrdeploy.io import read_safetensors_header

        header, _ = read_safetensors_header(path / "model.safetensors")
        if any(n.endswith((".q", ".lora_l", ".lora_r")) for n in header):
            raise LrdError(f"{path} holds lrdeploy artifact tensors but its lrdeploy.json is missing; restore the "
                           "manifest or re-create the artifact")
        index = dict.fromkeys(header, path / "model.safetensors")
    else:
        raise LrdError(f"{path} has no model.safetensors (only safetensors weights are supported)")
    return ModelSource(spec, "hf", path, config, index)


def _open_gguf(spec: str, path: Path) -> ModelSource:
    import gguf

    arch, tensors = read_gguf_index(path)
    config = _gguf_config(path, arch)
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_enum is None:
        raise LrdError(f"unsupported architecture '{arch}' in {path}")
    tmap = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    index: dict[str, object] = {}
    for name in _hf_parameter_names(config):
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname in tensors:
            index[name] = tensors[gname]
    return ModelSource(spec, "gguf", path, config, index, gguf_arch=arch)


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor's bytes lie in a GGUF file."""

    path: Path
    qtype: int
    shape: tuple[int, ...]  # numpy order (rows last-dim-fastest reversed from ggml's ne)
    offset: int
    nbytes: int

    def raw(self) -> np.ndarray:
        """The tensor's bytes as (rows, row_bytes) uint8, memory-mapped."""
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset, shape=(self.nbytes,))
        return mm.reshape(rows, self.nbytes // rows)


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_index(path: Path) -> tuple[str, dict[str, GGUFTensor]]:
    """Parse a GGUF header: (general.architecture, tensor index). Much faster than gguf.GGUFReader on big vocabs."""
    meta, tensors = read_gguf_header(path)
    return str(meta.get("general.architecture", "?")), tensors


def read_gguf_header(path: Path) -> tuple[dict[str, object], dict[str, GGUFTensor]]:
    """A GGUF header: (scalar and string metadata, tensor index); numeric arrays are skipped, not read."""
    meta, tensors, _, _ = read_gguf_layout(path)
    return meta, tensors


def read_gguf_layout(path: Path) -> tuple[dict[str, object], dict[str, GGUFTensor], int, int]:
    """A GGUF header walked once: (metadata, tensor index, where the tensor data starts, general.alignment).

    gguf.GGUFReader gives the same, but builds every vocabulary entry first (~9 s for SmolLM2's on 2 cores).
    """
    import math
    import struct

    import gguf

    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
        pos = 0

        def take(fmt: str):
            nonlocal pos
            size = struct.calcsize(fmt)
            if pos + size > len(data):
                raise ValueError("file ends inside its header")
            value = struct.unpack_from(fmt, data, pos)
            pos += size
            return value[0] if len(value) == 1 else value

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            if pos + n > len(data):
                raise ValueError("file ends inside its header")
            s = bytes(data[pos : pos + n]).decode("utf-8", errors="replace")
            pos += n
            return s

        def value(vtype: int):
            if vtype in _GGUF_SCALARS:
                return take(_GGUF_SCALARS[vtype])
            if vtype == 8:
                return string()
            if vtype == 9:
                etype, count = take("<I"), take("<Q")
                if etype in _GGUF_SCALARS:  # skip numeric arrays in one step
                    nonlocal pos
                    pos += struct.calcsize(_GGUF_SCALARS[etype]) * count
                    return None
                for _ in range(count):
                    value(etype)
                return None
            raise ValueError(f"unknown metadata type {vtype}")

        if bytes(data[:4]) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        pos = 4
        version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            ndim = take("<I")
            ne = [take("<Q") for _ in range(ndim)]
            infos.append((name, ne, take("<I"), take("<Q")))
        align = meta.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0:
            raise ValueError(f"bad general.alignment {align!r}")
        start = pos + (-pos % align)
        tensors = {}
        for name, ne, qtype, off in infos:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
            nbytes = math.prod(ne) // block * type_size
            if start + off + nbytes > len(data):
                raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
            tensors[name] = GGUFTensor(path, qtype, tuple(int(x) for x in reversed(ne)), start + off, nbytes)
    except (ValueError, KeyError, struct.error, OSError, RecursionError, OverflowError) as e:
        raise LrdError(f"cannot read GGUF {path}: {e}") from None
    return meta, tensors, start, align


def _gguf_config(path: Path, arch: str):
    """The transformers config of a GGUF, cached beside its tokenizer (parsing GGUF metadata takes ~30 s)."""
    from transformers import AutoConfig, AutoTokenizer

    cache = gguf_meta_cache(path)
    if not (cache / "config.json").is_file():
        archs.by_gguf(arch)
        try:
            with _quiet():
                config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
                tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:
            raise LrdError(f"cannot read the metadata of {path}: {e}") from None
        _restore_config(config, read_gguf_header(path)[0])
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(tmp))
        config.save_pretrained(str(tmp))
        try:
            os.replace(tmp, cache)
        except OSError:  # another process filled the cache first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    config = AutoConfig.from_pretrained(str(cache))
    archs.get(config)
    return config


def _restore_config(config, meta: dict[str, object]) -> None:
    """Put back what transformers' GGUF reader drops, as llama.cpp reads the file.

    phi3: its sliding window. gemma3: the global layers' RoPE scaling (rope.scaling.*), and the attention scale,
    which llama.cpp derives from the shapes (1/√head_dim; 1/√(hidden/heads) for the 62-layer 27B) where
    transformers would assume 256."""
    arch = archs.get(config)
    window = meta.get(f"{arch.gguf}.attention.sliding_window")
    if "sliding_window" in arch.gguf_extra and window and not getattr(config, "sliding_window", None):
        config.sliding_window = int(window)
    if config.model_type != "gemma3_text":
        return
    prefix = "gemma3."
    factor = meta.get(prefix + "rope.scaling.factor")
    if meta.get(prefix + "rope.scaling.type") == "linear" and factor:
        full = dict(config.rope_parameters["full_attention"])
        full.update(rope_type="linear", factor=float(factor))
        config.rope_parameters = {**config.rope_parameters, "full_attention": full}
    heads = config.num_attention_heads
    config.query_pre_attn_scalar = (config.hidden_size // heads if config.num_hidden_layers == 62
                                    else archs.head_dim(config))


def gguf_meta_cache(path: Path) -> Path:
    """Per-file cache directory keyed by path, size and mtime."""
    import hashlib

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf-meta" / key


def _hf_parameter_names(config) -> list[str]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return list(model.state_dict())


class _quiet:
    """Silence transformers' chatter while it parses GGUF metadata."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)

