"""`lrdeploy inspect`: tensors, types, bytes and bpw of GGUF files, exports and artifacts; clear errors."""

from __future__ import annotations

import json

import pytest

from lrdeploy.compressor.driver import CompressOptions, compress
from lrdeploy.compressor.sources import open_source, smollm2_path
from lrdeploy.errors import LrdError
from lrdeploy.exporters.gguf import export_gguf
from lrdeploy.runtime.inspect import inspect_path, is_linear_gguf, linear_bpw


@pytest.fixture(scope="module")
def rtn_export(tiny_llama, calib_text, tmp_path_factory):
    """A q4_k rtn artifact (rank 0: no adapter) and its GGUF export: cheap, and every linear is q4_k."""
    root = tmp_path_factory.mktemp("inspect")
    opts = CompressOptions(method="rtn", q_format="q4_k", calib=calib_text, calib_range="0:0.05", calib_tokens=256,
                           seq_len=128, device="cpu")
    compress(open_source(str(tiny_llama)), opts, root / "art")
    export_gguf(str(root / "art"), root / "gguf")
    return root / "art", root / "gguf"


def test_inspect_gguf_file(rtn_export, cli):
    _, exp = rtn_export
    code, stdout, err = cli("inspect", exp / "model.gguf", "--json")
    assert code == 0, err
    info = json.loads(stdout)
    rows = {r["name"]: r for r in info["tensors"]}
    assert info["tensor_count"] == len(rows) == 2 * 7 + 2 * 2 + 2  # linears, norms, token_embd + output_norm
    q = rows["blk.0.attn_q.weight"]
    assert q["type"] == "q4_k" and q["shape"] == [256, 256] and q["bytes"] == 256 * 256 // 256 * 144
    assert q["bpw"] == pytest.approx(4.5)
    assert rows["token_embd.weight"]["type"] == "f16" and rows["token_embd.weight"]["bpw"] == 16.0
    assert rows["blk.1.ffn_norm.weight"]["type"] == "f32"
    assert info["bytes"] == sum(r["bytes"] for r in info["tensors"]) < info["file_bytes"]
    assert info["linear_bpw"] == pytest.approx(4.5)
    assert "blk.0.ffn_down.weight" in cli("inspect", exp / "model.gguf")[1]  # the table


def test_inspect_export_dir_and_artifact_agree(rtn_export):
    art, exp = rtn_export
    a, e = inspect_path(art), inspect_path(exp)
    assert a["kind"] == "artifact" and e["kind"] == "gguf export"
    assert a["linear_bpw"] == pytest.approx(e["linear_bpw"]) == pytest.approx(4.5)
    qs = {r["name"]: r for r in a["tensors"] if r["name"].endswith(".q")}
    assert qs["model.layers.1.mlp.down_proj.q"]["type"] == "q4_k"
    assert qs["model.layers.1.mlp.down_proj.q"]["shape"] == [256, 512]


def test_inspect_bundled_smollm2_is_fast_and_right():
    info = inspect_path(smollm2_path())
    types = {r["type"] for r in info["tensors"]}
    assert info["tensor_count"] == 272 and types == {"q4_1", "q8_0", "f32"}
    assert info["linear_bpw"] == pytest.approx(5.0)  # Q4_1: 20 bytes per 32 weights


def test_linear_bpw_counts_lora_bytes():
    rows = [{"name": "blk.0.attn_q.weight", "shape": [256, 256], "bytes": 256 * 256 // 8},
            {"name": "blk.0.attn_q.weight.lora_a", "shape": [32, 256], "bytes": 32 * 256 * 2},
            {"name": "blk.0.attn_q.weight.lora_b", "shape": [256, 32], "bytes": 256 * 32 * 2},
            {"name": "token_embd.weight", "shape": [10, 256], "bytes": 10 * 256 * 4}]
    assert is_linear_gguf("blk.3.ffn_down.weight.lora_b") and not is_linear_gguf("blk.3.attn_norm.weight")
    assert linear_bpw(rows) == pytest.approx(1 + 8 * (2 * 32 * 256 * 2) / (256 * 256))


def test_truncated_and_corrupt_files_one_line_error(rtn_export, tmp_path, cli):
    _, exp = rtn_export
    data = (exp / "model.gguf").read_bytes()
    cuts = {"header": 2000, "tensor data": len(data) - 1000}
    for where, n in cuts.items():
        bad = tmp_path / f"cut-{where.replace(' ', '-')}.gguf"
        bad.write_bytes(data[:n])
        code, _, err = cli("inspect", bad)
        assert code == 2 and len(err.strip().splitlines()) == 1, (where, err)
        assert str(bad) in err and ("truncated" in err or "ends inside" in err), err
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    code, _, err = cli("inspect", junk)
    assert code == 2 and "bad magic" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    code, _, err = cli("inspect", empty)
    assert code == 2 and len(err.strip().splitlines()) == 1
    with pytest.raises(LrdError, match="no such file"):
        inspect_path(tmp_path / "missing.gguf")
    with pytest.raises(LrdError, match="is not a .gguf or .onnx file"):
        inspect_path(tmp_path)
