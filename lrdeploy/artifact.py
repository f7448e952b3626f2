"""The artifact: the one contract between compressor, exporters and runtime.

A directory with config.json + tokenizer files, `lrdeploy.json` (the manifest) and `model.safetensors`, where each
compressed linear NAME stores `NAME.q` (raw ggml blocks, uint8), `NAME.lora_l` (out×r) and `NAME.lora_r` (r×in)
as f16 or raw ggml blocks. The embedding and the head are stored in their chosen formats, recorded in the manifest's
`tensors` table: block-quantized as `NAME.q` (any ggml type, e.g. q2_k or a source's q6_k), else as floats. Every
other tensor is stored as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrdeploy.errors import LrdError
from lrdeploy.files import MANIFEST, WEIGHTS  # noqa: F401 - the artifact's file names, re-exported

FORMAT = "lrdeploy-artifact"
VERSION = 1


class QLRLinear(nn.Module):
    """y = Q·x + L·(R·x) + b, never merged: the reference that every export must reproduce."""

    def __init__(self, in_features: int, out_features: int, rank: int, has_q: bool, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"device": device, "dtype": torch.float32}
        self.register_buffer("q", torch.empty(out_features, in_features, **kw) if has_q else None)
        self.register_buffer("lora_l", torch.empty(out_features, rank, **kw) if rank else None)
        self.register_buffer("lora_r", torch.empty(rank, in_features, **kw) if rank else None)
        self.register_buffer("bias", torch.empty(out_features, **kw) if bias else None)

    @classmethod
    def from_values(cls, q: torch.Tensor | None, lora_l: torch.Tensor | None, lora_r: torch.Tensor | None,
                    bias: torch.Tensor | None) -> QLRLinear:
        ref = q if q is not None else lora_l @ lora_r
        m = cls(ref.shape[1], ref.shape[0], 0 if lora_l is None else lora_l.shape[1], q is not None,
                bias is not None, device=ref.device)
        for name, value in (("q", q), ("lora_l", lora_l), ("lora_r", lora_r), ("bias", bias)):
            if value is not None:
                getattr(m, name).copy_(value)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rot = getattr(self, "in_rotation", None)  # an online input rotation (compressor/rotate.py, --rotate-down)
        if rot is not None:
            x = rot.apply(x)
        y = F.linear(x, self.q, self.bias) if self.q is not None else None
        if self.rank:
            low = F.linear(F.linear(x, self.lora_r), self.lora_l)
            y = low if y is None else y + low
            if self.q is None and self.bias is not None:
                y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, q={self.q is not None}"


@dataclass
class LinearEntry:
    """Per-linear record in the manifest."""

    shape: list[int]
    q_format: str | None
    rank: int
    lr_format: str | None
    error: float
    fallback: str | None = None
    history: list[float] | None = None
    seconds: float = 0.0
    bytes: int = 0  # Q + L + R as stored, scales included

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        if d["history"] is None:
            d.pop("history")
        return d


def read_manifest(path: Path) -> dict:
    """The manifest of artifact PATH, validated; a clear error for every way it can be broken."""
    path = Path(path)
    if not path.exists():
        raise LrdError(f"no such artifact: {path}")
    file = path / MANIFEST
    if not file.is_file():
        raise LrdError(f"{path} is not an lrdeploy artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(file.read_text())
    except OSError as e:
        raise LrdError(f"cannot read {file}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise LrdError(f"{file} is not valid JSON: {e}") from None
    return validate_manifest(manifest, file)


def validate_manifest(manifest: object, where: object = MANIFEST) -> dict:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LrdError(f"{where} is not an lrdeploy manifest (format field missing)")
    version = manifest.get("version")
    if version != VERSION:
        raise LrdError(f"{where} has manifest version {version!r}; this lrdeploy reads version {VERSION}")
    linears = manifest.get("linears")
    if not isinstance(linears, dict):
        raise LrdError(f"{where} has no 'linears' table")
    for name, e in linears.items():
        ok = (
            isinstance(e, dict)
            and isinstance(e.get("shape"), list)
            and len(e["shape"]) == 2
            and all(isinstance(x, int) and x > 0 for x in e["shape"])
            and isinstance(e.get("rank"), int)
            and e["rank"] >= 0
            and (e.get("q_format") is None or isinstance(e.get("q_format"), str))
            and (e.get("lr_format") is None or isinstance(e.get("lr_format"), str))
        )
        if not ok:
            raise LrdError(f"{where}: bad entry for linear {name}")
    tensors = manifest.get("tensors", {})
    if not isinstance(tensors, dict):
        raise LrdError(f"{where}: bad 'tensors' table")
    for name, e in tensors.items():
        if not _tensor_entry_ok(e):
            raise LrdError(f"{where}: bad entry for tensor {name}")
    if not isinstance(manifest.get("untied", False), bool):
        raise LrdError(f"{where}: bad 'untied' flag")
    if manifest.get("rotate_down") is not None:
        from lrdeploy.compressor.rotate import InputRotation

        try:
            InputRotation.from_record(manifest["rotate_down"])
        except LrdError as e:
            raise LrdError(f"{where}: {e}") from None
    summary = manifest.get("summary")
    if summary is not None and not (isinstance(summary, dict) and _is_number(summary.get("bpw"))):
        raise LrdError(f"{where}: bad 'summary' (no numeric bpw)")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise LrdError(f"{where}: bad 'files' table")
    for name, f in files.items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise LrdError(f"{where}: 'files' names {name!r}, which is not a plain file name")
        if not (isinstance(f, dict) and isinstance(f.get("sha256"), str) and isinstance(f.get("bytes"), int)
                and not isinstance(f.get("bytes"), bool)):
            raise LrdError(f"{where}: bad 'files' entry for {name}")
    return manifest


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _tensor_entry_ok(e: object) -> bool:
    """A `tensors` entry: a shape, its bytes, and either a known ggml block type (q_format) or a dtype."""
    if not (isinstance(e, dict) and isinstance(e.get("shape"), list) and e["shape"]
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in e["shape"])
            and isinstance(e.get("bytes"), int) and not isinstance(e["bytes"], bool) and e["bytes"] >= 0):
        return False
    fmt = e.get("q_format")
    if fmt is None:
        return isinstance(e.get("dtype"), str)
    return isinstance(fmt, str) and fmt.upper() in gguf.GGMLQuantizationType.__members__


def dequantize_blocks(fmt: str, raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """ggml blocks of type FMT as float32: our grids by our own decoder, any other ggml type by gguf-py's."""
    from lrdeploy.compressor import grids

    if fmt in grids.GRIDS:
        return grids.get_grid(fmt).unpack(raw, shape)
    data = gguf.quants.dequantize(raw.cpu().numpy().reshape(shape[0], -1), gguf.GGMLQuantizationType[fmt.upper()])
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape)).to(raw.device)


def verify_files(path: str | Path, manifest: dict) -> list[str]:
    """Check every file the manifest records against its size and sha256; returns the names checked.

    Size first (cheap, and the usual damage: a truncated copy), then the digest. Artifacts from before digests were
    recorded have no 'files' table and pass unchecked.
    """
    from lrdeploy.io import sha256_file

    path = Path(path)
    checked = []
    for name, rec in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise LrdError(f"{file} is missing (the manifest records it); re-create the artifact")
        size = file.stat().st_size
        if size != rec["bytes"]:
            raise LrdError(f"{file} has {size} bytes, the manifest records {rec['bytes']} (truncated or replaced?); "
                           "re-create the artifact")
        if sha256_file(file) != rec["sha256"]:
            raise LrdError(f"{file} does not match its sha256 in the manifest (corrupt or modified); "
                           "re-create the artifact")
        checked.append(name)
    return checked


def is_artifact(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).exists()


class ArtifactTensors:
    """Tensor getter over an artifact: `NAME.q`, `NAME.lora_l`, `NAME.lora_r` come back dequantized to float32, and
    so does every tensor of the `tensors` table stored as blocks, under its own NAME."""

    def __init__(self, path: Path, manifest: dict, device: str | torch.device = "cpu", weights: Path | None = None):
        from safetensors import safe_open

        from lrdeploy.io import read_safetensors_header

        self.path, self.manifest, self.device = Path(path), manifest, device
        self.tensors: dict = manifest.get("tensors") or {}
        own = weights is None
        weights = weights or self.path / WEIGHTS
        if not weights.is_file():
            raise LrdError(f"{self.path} is missing {WEIGHTS}")
        if own:  # the artifact's own tensor file: check it against the manifest's digest once per load
            verify_files(self.path, manifest)
        self.header, _ = read_safetensors_header(weights)
        try:
            self._file = safe_open(str(weights), framework="pt", device=str(device))
        except Exception as e:
            raise LrdError(f"corrupt {weights}: {e}") from None

    def raw(self, name: str) -> torch.Tensor:
        if name not in self.header:
            raise LrdError(f"{self.path} lacks tensor {name}")
        return self._file.get_tensor(name)

    def has(self, name: str) -> bool:
        """Whether NAME can be asked for: stored under its own name or as the blocks of a `tensors` entry."""
        entry = self.tensors.get(name)
        return name in self.header or (entry is not None and bool(entry.get("q_format"))
                                       and f"{name}.q" in self.header)

    def __call__(self, name: str) -> torch.Tensor:
        from lrdeploy.compressor import grids

        table = self.tensors.get(name)
        if table is not None and table.get("q_format"):
            return dequantize_blocks(table["q_format"], self.raw(f"{name}.q"), tuple(table["shape"]))
        base, _, kind = name.rpartition(".")
        entry = self.manifest["linears"].get(base)
        if entry is not None and kind in ("q", "lora_l", "lora_r"):
            out, in_ = entry["shape"]
            r = entry["rank"]
            fmt = entry["q_format"] if kind == "q" else entry["lr_format"]
            shape = {"q": (out, in_), "lora_l": (out, r), "lora_r": (r, in_)}[kind]
            t = self.raw(name)
            if fmt in (None, "f16", "f32"):
                return t.float().reshape(shape)
            return grids.get_grid(fmt).unpack(t, shape)
        t = self.raw(name)
        return t.float() if t.is_floating_point() else t


def install_qlr(model: nn.Module, linears: dict) -> None:
    """Swap each compressed nn.Linear of MODEL for an empty QLRLinear of the manifest's shape and rank (keeping a
    down_proj's online input rotation)."""
    from lrdeploy.compressor.rotate import carry

    for name, e in linears.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        out, in_ = e["shape"]
        qlr = QLRLinear(in_, out, e["rank"], e["q_format"] is not None, old.bias is not None, device="meta")
        setattr(parent, child, carry(old, qlr))


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the transformers model of an artifact with QLRLinear modules; returns (model, manifest)."""
    from transformers import AutoConfig

    from lrdeploy.compressor.model import load_full
    from lrdeploy.compressor.rotate import MANIFEST_KEY as ROTATE_DOWN
    from lrdeploy.compressor.rotate import InputRotation, install_down

    path = Path(path)
    manifest = read_manifest(path)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise LrdError(f"cannot read {path / 'config.json'}: {e}") from None
    get = ArtifactTensors(path, manifest, device)

    def replace(m: nn.Module) -> None:
        install_down(m, InputRotation.from_record(manifest.get(ROTATE_DOWN)))
        install_qlr(m, manifest["linears"])

    try:
        model = load_full(config, get, device, replace=replace)
    except (RuntimeError, ValueError, AttributeError, KeyError) as e:  # manifest, config and tensors disagree
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LrdError(f"{path}: manifest, config.json and {WEIGHTS} do not fit together: {first}") from None
    return model, manifest


def artifact_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise LrdError(f"cannot load the tokenizer in {path}: {e}") from None
