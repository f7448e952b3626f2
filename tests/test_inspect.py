"""`lrdeploy inspect`: tensors, types, bytes and bpw of GGUF files, exports and artifacts; clear errors."""

from __future__ import annotations

import json
import math
import struct

import pytest

from lrdeploy.artifact import read_manifest
from lrdeploy.compressor.driver import CompressOptions, compress
from lrdeploy.compressor.sources import open_source, read_gguf_index, smollm2_path
from lrdeploy.errors import LrdError
from lrdeploy.exporters.gguf import export_gguf
from lrdeploy.runtime.inspect import gguf_tensors, inspect_path, is_linear_gguf, linear_bpw


@pytest.fixture(scope="module")
def q4k_export(tiny_llama, calib_text, tmp_path_factory):
    """A caldera artifact (q4_k + rank-32 f16 L·R, one cheap iteration; every linear is q4_k) and its GGUF export:
    base + LoRA adapter."""
    root = tmp_path_factory.mktemp("inspect")
    opts = CompressOptions(method="caldera", q_format="q4_k", rank=32, lr_format="f16", calib=calib_text,
                           calib_range="0:0.05", calib_tokens=256, seq_len=128, iters=1, lplr_iters=1, device="cpu")
    compress(open_source(str(tiny_llama)), opts, root / "art")
    export_gguf(str(root / "art"), root / "gguf")
    return root / "art", root / "gguf"


def test_inspect_gguf_file(q4k_export, cli):
    _, exp = q4k_export
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
    assert info["weights"] == sum(math.prod(r["shape"]) for r in info["tensors"])
    assert info["bpw_file"] == pytest.approx(8 * info["bytes"] / info["weights"]) and info["bpw_file"] > 4.5
    assert info["bpw_linears"] == pytest.approx(4.5) and info["bpw_linears_from"] == "tensors"
    text = cli("inspect", exp / "model.gguf")[1]
    assert "blk.0.ffn_down.weight" in text  # the table
    assert f"file bpw {info['bpw_file']:.3f} (all tensors" in text
    assert "linear bpw 4.500 (decoder linears, the README's definition" in text


def test_inspect_export_dir_and_artifact_agree(q4k_export):
    art, exp = q4k_export
    a, e = inspect_path(art), inspect_path(exp)
    assert a["kind"] == "artifact" and e["kind"] == "gguf export"
    assert a["bpw_linears"] == pytest.approx(e["bpw_linears"], rel=1e-12) and a["bpw_linears"] > 4.5  # Q + L + R
    assert a["bpw_linears_from"] == "manifest" and e["bpw_linears_from"] == "tensors"
    assert a["weights"] == e["weights"]  # L and R are bytes, not weights, in both
    qs = {r["name"]: r for r in a["tensors"] if r["name"].endswith(".q")}
    assert qs["model.layers.1.mlp.down_proj.q"]["type"] == "q4_k"
    assert qs["model.layers.1.mlp.down_proj.q"]["shape"] == [256, 512]


def test_inspect_bundled_smollm2_is_fast_and_right():
    info = inspect_path(smollm2_path())
    types = {r["type"] for r in info["tensors"]}
    assert info["tensor_count"] == 272 and types == {"q4_1", "q8_0", "f32"}
    assert info["bpw_linears"] == pytest.approx(5.0)  # Q4_1: 20 bytes per 32 weights


def test_linear_bpw_counts_lora_bytes():
    rows = [{"name": "blk.0.attn_q.weight", "shape": [256, 256], "bytes": 256 * 256 // 8},
            {"name": "blk.0.attn_q.weight.lora_a", "shape": [32, 256], "bytes": 32 * 256 * 2},
            {"name": "blk.0.attn_q.weight.lora_b", "shape": [256, 32], "bytes": 256 * 32 * 2},
            {"name": "token_embd.weight", "shape": [10, 256], "bytes": 10 * 256 * 4}]
    assert is_linear_gguf("blk.3.ffn_down.weight.lora_b") and not is_linear_gguf("blk.3.attn_norm.weight")
    assert linear_bpw(rows) == pytest.approx(1 + 8 * (2 * 32 * 256 * 2) / (256 * 256))


def test_truncated_and_corrupt_files_one_line_error(q4k_export, tmp_path, cli):
    _, exp = q4k_export
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
    with pytest.raises(LrdError, match="is neither an lrdeploy artifact"):
        inspect_path(tmp_path)


def test_linear_bpw_of_an_export_counts_the_adapter(q4k_export, cli):
    """README's bpw of the files llama.cpp loads: base linears' bytes + the adapter's L and R bytes over Σ out·in."""
    art, exp = q4k_export
    assert (exp / "adapter.gguf").is_file()
    base, adapter = gguf_tensors(exp / "model.gguf"), gguf_tensors(exp / "adapter.gguf")
    linears = [r for r in base if is_linear_gguf(r["name"])]
    weights = sum(r["shape"][0] * r["shape"][1] for r in linears)
    expected = 8 * (sum(r["bytes"] for r in linears) + sum(r["bytes"] for r in adapter)) / weights
    code, stdout, err = cli("inspect", exp, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["kind"] == "gguf export" and info["bpw_linears"] == pytest.approx(expected, rel=1e-12)
    assert info["bpw_linears"] == pytest.approx(read_manifest(art)["summary"]["bpw"], rel=1e-12)
    assert inspect_path(exp / "model.gguf")["bpw_linears"] == pytest.approx(4.5)  # the base alone: Q only
    assert info["bpw_linears"] == pytest.approx(4.5 + 8 * 32 * 2 * sum(sum(r["shape"]) for r in linears) / weights)
    # the file bpw: every byte of both files, over the model's weights (L and R are bytes, not weights)
    assert info["weights"] == inspect_path(exp / "model.gguf")["weights"]
    assert info["bpw_file"] == pytest.approx(8 * sum(r["bytes"] for r in base + adapter) / info["weights"])


def _tensor_offset(path, name):
    _, index = read_gguf_index(path)
    return index[name].offset


def test_verify_gguf_reads_the_data_and_says_what_it_checked(q4k_export, tmp_path, cli):
    _, exp = q4k_export
    code, stdout, err = cli("inspect", exp, "--verify")
    assert code == 0, err
    assert "verified: model.gguf, adapter.gguf" in stdout
    for name in ("model.gguf", "adapter.gguf"):
        line = next(ln for ln in stdout.splitlines() if ln.startswith(f"checked {name}: "))
        assert "fill the data section exactly" in line and "tensor bytes read" in line and "NaN/Inf" in line
    info = json.loads(cli("inspect", exp, "--verify", "--json")[1])
    assert info["verified"] == ["model.gguf", "adapter.gguf"] and len(info["checks"]) == 2
    n_bytes = sum(r["bytes"] for r in gguf_tensors(exp / "model.gguf"))
    assert f"{n_bytes:,} tensor bytes read" in info["checks"][0]

    data = (exp / "model.gguf").read_bytes()
    nan16 = struct.pack("<e", float("nan"))
    damaged = {  # what only reading the data finds: the header is intact in every case
        "trailing": (data + b"\0" * 64, "bytes after tensor"),
        "nan value": (None, "token_embd.weight (f16) has 1 NaN/Inf values"),
        "nan scale": (None, "blk.0.attn_q.weight (q4_k) has 1 NaN/Inf block scales"),
    }
    for what, (raw, message) in damaged.items():
        bad = tmp_path / f"{what.replace(' ', '-')}.gguf"
        if raw is None:
            name = "token_embd.weight" if what == "nan value" else "blk.0.attn_q.weight"
            at = _tensor_offset(exp / "model.gguf", name) + (2 * 7 if what == "nan value" else 144 * 3)  # d of block 3
            raw = data[:at] + nan16 + data[at + 2 :]
        bad.write_bytes(raw)
        code, _, err = cli("inspect", bad)
        assert code == 0, (what, err)  # the header alone looks fine
        code, _, err = cli("inspect", bad, "--verify")
        assert code == 2 and len(err.strip().splitlines()) == 1 and str(bad) in err, (what, err)
        assert message in err, (what, err)


def test_neither_gguf_nor_onnx_names_what_was_expected(tmp_path, cli):
    for name, data in {"notes.txt": b"hello, world\n", "foo.bin": bytes(range(256)) * 4, "empty.bin": b""}.items():
        bad = tmp_path / name
        bad.write_bytes(data)
        code, _, err = cli("inspect", bad)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert (f"{bad} is neither a GGUF file (magic 'GGUF') nor an ONNX model (.onnx) nor an lrdeploy artifact or "
                "export directory") in " ".join(err.split()), err
        assert "bad magic" not in err
