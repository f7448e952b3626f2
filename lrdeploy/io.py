"""Small I/O helpers shared by the drivers: atomic writes, hashing, streamed safetensors, output locks."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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


def partial_dir(out: Path) -> Path:
    """OUT.partial: where OUT is built before it is moved into place."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """OUT written whole or not at all: yields a fresh OUT.partial, moved to OUT when the block ends normally and
    removed on any failure. An existing OUT is an error unless FORCE; it is replaced only at the last moment."""
    out = Path(out)
    if out.exists() and not force:
        raise LrdError(f"{out} already exists; pass --force to overwrite it")
    tmp = partial_dir(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def lock_path(out: Path) -> Path:
    """OUT.lock: beside OUT and OUT.partial, so it is never part of the finished output and survives a --resume."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


@contextmanager
def output_lock(out: Path, wait: float = 5.0) -> Iterator[Path]:
    """Hold OUT.lock, a file with this process's pid, while OUT or OUT.partial is written; yields its path.

    A second run on the same OUT fails with one line naming the first one's pid. The lock appears whole: the pid is
    written to a private sibling, which is then hard-linked to OUT.lock, and the link fails if OUT.lock exists. A lock
    whose process is gone, or that holds no pid, is taken over; only the holder of OUT.lock.takeover (taken the same
    way) may remove it, so two runs that find the same stale lock cannot both win. WAIT bounds the seconds spent
    behind another run's takeover. The lock is removed on every way out of the block, if it is still ours.
    """
    out = Path(out)
    lock = lock_path(out)
    lock.parent.mkdir(parents=True, exist_ok=True)
    mine = lock.with_name(f"{lock.name}.{os.getpid()}")  # only this process writes this name
    mine.unlink(missing_ok=True)  # a dead namesake's leftover may still be linked to its lock: never write into it
    mine.write_text(f"{os.getpid()}\n")
    try:
        deadline = time.monotonic() + wait
        while not _take(lock, mine, out):
            if time.monotonic() > deadline:
                raise LrdError(f"{out} is being written by another lrdeploy run ({lock} is being taken over); "
                               "wait for it or stop it")
            time.sleep(0.01)
        held = _identity(lock)
    finally:
        mine.unlink(missing_ok=True)
    try:
        yield lock
    finally:
        try:
            if _identity(lock) == held:
                lock.unlink()
        except FileNotFoundError:
            pass


def _take(lock: Path, mine: Path, out: Path) -> bool:
    """One attempt: True once LOCK is ours; False to try again; LrdError while a live process holds it."""
    if _place(mine, lock):
        return True
    try:
        pid = _lock_pid(lock)
    except FileNotFoundError:  # released meanwhile
        return False
    if pid is not None and _alive(pid):
        raise LrdError(f"{out} is being written by another lrdeploy run (pid {pid}); wait for it or stop it")
    claim = lock.with_name(lock.name + ".takeover")
    if not _place(mine, claim):
        try:
            taker = _lock_pid(claim)
        except FileNotFoundError:
            return False
        if taker is None or not _alive(taker):  # a taker killed within its few microseconds of holding the claim
            claim.unlink(missing_ok=True)
        return False
    try:
        try:
            pid = _lock_pid(lock)  # still the stale lock: nobody but a claim holder removes a lock it did not write
        except FileNotFoundError:
            pid = 0
        if pid is None or (pid and not _alive(pid)):
            lock.unlink(missing_ok=True)
        return _place(mine, lock)
    finally:
        claim.unlink(missing_ok=True)


def _place(src: Path, dst: Path) -> bool:
    """Create DST with SRC's content in one step; False if DST exists."""
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    # a file system without hard links: create exclusively, then write (a reader may see it empty for a moment)
    try:
        fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(src.read_bytes())
    return True


def _lock_pid(lock: Path) -> int | None:
    """The pid in LOCK; None if the file is empty or garbled (a crash or another program wrote it)."""
    text = lock.read_bytes()[:64].decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and 0 < int(text) < 2**31 else None


def _alive(pid: int) -> bool:
    """Whether process PID exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino
