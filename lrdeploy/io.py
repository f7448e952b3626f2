"""Small I/O helpers shared by the drivers: atomic writes, hashing, streamed safetensors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

from lrdeploy.errors import LrdError


def cache_root() -> Path:
    """Where lrdeploy keeps what it can rebuild: $LRDEPLOY_CACHE, else ~/.cache/lrdeploy."""
    return Path(os.environ.get("LRDEPLOY_CACHE") or Path.home() / ".cache" / "lrdeploy").expanduser()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename: readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Return (header without __metadata__, byte offset where tensor data starts); clear error if corrupt."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError("header length past end of file")
            header = json.loads(f.read(n))
        _check_header(header)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise LrdError(f"corrupt safetensors file {path}: {e}") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise LrdError(f"corrupt safetensors file {path}: truncated ({size} bytes, header needs {8 + n + end})")
    return header, 8 + n


def _check_header(header: object) -> None:
    """Every entry a tensor with a dtype, a shape and in-order offsets: damaged headers fail here, not deep inside."""
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    for name, v in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list)
              and all(isinstance(x, int) and x >= 0 for x in v["shape"]) and isinstance(v.get("data_offsets"), list)
              and len(v["data_offsets"]) == 2 and all(isinstance(x, int) and x >= 0 for x in v["data_offsets"])
              and v["data_offsets"][0] <= v["data_offsets"][1])
        if not ok:
            raise ValueError(f"bad header entry for tensor {name}")


def merge_safetensors(out: Path, shards: Iterable[Path], chunk: int = 1 << 24) -> None:
    """Concatenate safetensors shards into one file without loading tensors: peak memory is one chunk."""
    entries: list[tuple[str, dict, Path, int]] = []
    for shard in shards:
        header, base = read_safetensors_header(shard)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            entries.append((name, info, shard, base))
    new_header: dict[str, dict] = {}
    offset = 0
    for name, info, _, _ in entries:
        if name in new_header:
            raise LrdError(f"tensor {name} appears in two shards")
        a, b = info["data_offsets"]
        new_header[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + b - a]}
        offset += b - a
    blob = json.dumps(new_header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, info, shard, base in entries:
            a, b = info["data_offsets"]
            with open(shard, "rb") as src:
                src.seek(base + a)
                left = b - a
                while left:
                    buf = src.read(min(chunk, left))
                    if not buf:
                        raise LrdError(f"corrupt safetensors file {shard}: truncated")
                    f.write(buf)
                    left -= len(buf)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory into place, replacing an old output only at the last moment."""
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
