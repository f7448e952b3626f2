"""The streaming compressor end to end on tiny random models: artifact, loader, resume, errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from interrupt import signal_after_first_block

from lrdeploy.artifact import QLRLinear, load_artifact, read_manifest
from lrdeploy.compressor import grids
from lrdeploy.compressor.arch import LLAMA
from lrdeploy.compressor.driver import CompressOptions, compress
from lrdeploy.compressor.sources import open_source
from lrdeploy.errors import LrdError

FAST = ["--calib-tokens", "2048", "--seq-len", "128", "--iters", "2", "--lplr-iters", "1", "-q"]


def test_compress_caldera_artifact_roundtrip(tiny_llama, calib_text, tmp_path, cli):
    out = tmp_path / "art"
    code, stdout, stderr = cli("compress", tiny_llama, "-o", out, "--calib", calib_text, *FAST, "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    m = read_manifest(out)
    assert m["method"] == "caldera" and m["options"]["q_format"] == "q2_k"
    assert len(m["linears"]) == 2 * 7
    e = m["linears"]["model.layers.0.mlp.down_proj"]
    assert e["q_format"] == "q2_k" and e["rank"] == 32 and e["lr_format"] == "q4_0" and e["fallback"] is None
    # the default preset on a 256-wide model is q2: k_proj and v_proj one grid up (q4_k), the rest q2_k
    assert m["options"]["preset"] == "q2"
    assert {k: v["q_format"] for k, v in m["linears"].items() if "layers.0." in k} == {
        f"model.layers.0.{n}": "q4_k" if n in ("self_attn.k_proj", "self_attn.v_proj") else "q2_k"
        for n in LLAMA.linears}
    # bpw is recomputed from the stored bytes: Q (q2_k: 84 bytes per 256, q4_k: 144) + L, R (q4_0), scales included
    params = sum(v["shape"][0] * v["shape"][1] for v in m["linears"].values())
    expected_bytes = 0
    for v in m["linears"].values():
        out_, in_ = v["shape"]
        q_bytes = out_ * in_ * (144 if v["q_format"] == "q4_k" else 84) // 256
        expected_bytes += q_bytes + (out_ * 32 + 32 * in_) * 18 // 32
    assert m["summary"]["linear_bytes"] == expected_bytes
    assert summary["bpw"] == pytest.approx(8 * expected_bytes / params)
    assert all(0 <= v["error"] < 0.5 for v in m["linears"].values())
    assert m["files"]["model.safetensors"]["sha256"]
    assert not (tmp_path / "art.partial").exists()
    stages = m["timings"]["stages"]  # where the time went, per stage and per linear type
    assert set(stages["decompose"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert stages["decompose"]["down_proj"] == pytest.approx(
        sum(v["seconds"] for k, v in m["linears"].items() if k.endswith("down_proj")), abs=0.01)
    assert stages["h_collection"] > 0 and stages["student_forward"] > 0 and "distill" not in stages
    peak = m["timings"]["peak_rss"]  # where the run's memory peaked: a stage of a block, or the vocab/merge steps
    assert peak["mib"] > 50 and ("model.layers." in peak["at"] or peak["at"] in (
        "embedding and head", "head with its input importance", "merging the shards"))

    model, _ = load_artifact(out)
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, QLRLinear)
    src = open_source(str(tiny_llama))
    W = src.tensor("model.layers.1.mlp.down_proj.weight")
    W_hat = layer.q + layer.lora_l @ layer.lora_r
    rel = ((W_hat - W).norm() / W.norm()).item()
    assert rel < 0.5
    ids = torch.randint(0, 1000, (1, 16))
    logits = model(ids).logits
    assert torch.isfinite(logits).all()


def test_qlr_forward_is_q_plus_lr(tiny_llama, calib_text, tmp_path):
    out = tmp_path / "art"
    compress(open_source(str(tiny_llama)), CompressOptions(calib=calib_text, calib_tokens=1024, seq_len=128,
                                                          iters=1, lplr_iters=1), out)
    model, manifest = load_artifact(out)
    m = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 256)
    assert torch.allclose(m(x), x @ m.q.T + (x @ m.lora_r.T) @ m.lora_l.T, atol=1e-5)
    # the dense Q is exactly the ggml blocks decoded by gguf-py
    import gguf

    from lrdeploy.artifact import ArtifactTensors

    raw = ArtifactTensors(out, manifest).raw("model.layers.0.self_attn.q_proj.q")
    ref = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType.Q2_K).reshape(256, 256)
    assert torch.equal(torch.from_numpy(ref), m.q)


@pytest.mark.parametrize("method,extra", [("rtn", []), ("ldlq", ["--q-format", "q3_k"]),
                                          ("lowrank", ["--rank", "64"])])
def test_methods_and_qwen2_bias(tiny_qwen2, calib_text, tmp_path, cli, method, extra):
    out = tmp_path / method
    code, _, err = cli("compress", tiny_qwen2, "-o", out, "--method", method, "--calib", calib_text, *FAST, *extra)
    assert code == 0, err
    model, m = load_artifact(out)
    q = model.model.layers[0].self_attn.q_proj
    assert q.bias is not None and torch.equal(
        q.bias, open_source(str(tiny_qwen2)).tensor("model.layers.0.self_attn.q_proj.bias"))
    if method == "lowrank":
        assert q.q is None and q.rank == 64
    else:
        assert q.rank == 0 and q.q is not None


def test_tensor_rank_puts_lr_only_where_asked(tiny_llama, calib_text, tmp_path, cli):
    """--tensor-rank self_attn=0: attention is plain LDLQ (block 0's Q byte-identical to an ldlq run, whose H is the
    same), the MLP keeps rank 32, bpw counts only what is stored, and the GGUF adapter holds only MLP tensors."""
    import gguf

    from lrdeploy.artifact import ArtifactTensors
    from lrdeploy.exporters.gguf import ADAPTER, export_gguf

    runs = {"caldera": ["--tensor-rank", "self_attn=0"], "ldlq": ["--method", "ldlq"]}
    for name, extra in runs.items():
        code, _, err = cli("compress", tiny_llama, "-o", tmp_path / name, "--calib", calib_text, *FAST, *extra)
        assert code == 0, err
    m = read_manifest(tmp_path / "caldera")
    ranks = {k: v["rank"] for k, v in m["linears"].items()}
    assert all(r == (0 if ".self_attn." in k else 32) for k, r in ranks.items()), ranks
    ref = read_manifest(tmp_path / "ldlq")
    ours, theirs = ArtifactTensors(tmp_path / "caldera", m), ArtifactTensors(tmp_path / "ldlq", ref)
    for lin in ("q_proj", "k_proj", "v_proj", "o_proj"):
        key = f"model.layers.0.self_attn.{lin}.q"
        assert torch.equal(ours.raw(key), theirs.raw(key)), key
    lr_bytes = sum((v["shape"][0] + v["shape"][1]) * 32 * 18 // 32 for k, v in m["linears"].items() if ranks[k])
    assert m["summary"]["linear_bytes"] == ref["summary"]["linear_bytes"] + lr_bytes

    export_gguf(str(tmp_path / "caldera"), tmp_path / "gguf")
    names = [t.name for t in gguf.GGUFReader(tmp_path / "gguf" / ADAPTER).tensors]
    assert names and all(".ffn_" in n for n in names), names


def test_ldlq_beats_rtn_on_model(tiny_llama, calib_text, tmp_path):
    errs = {}
    for method in ("rtn", "ldlq"):
        o = CompressOptions(method=method, calib=calib_text, calib_tokens=2048, seq_len=128)
        errs[method] = compress(open_source(str(tiny_llama)), o, tmp_path / method).manifest["linears"]
    for name in errs["rtn"]:
        assert errs["ldlq"][name]["error"] <= errs["rtn"][name]["error"] * 1.001, name


def _tensors_bytes(path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def test_resume_after_sigkill_is_byte_identical(tmp_path, calib_text):
    """Kill a real `lrdeploy compress` after its first finished block, resume it, compare every tensor byte."""
    from random_model import make_random_model

    model = make_random_model(tmp_path / "m", layers=5)
    args = ["compress", str(model), "--calib", calib_text, "--calib-tokens", "2048", "--seq-len", "128",
            "--iters", "1", "--lplr-iters", "1", "-q", "--device", "cpu"]
    exe = [sys.executable, "-m", "lrdeploy.cli"]
    subprocess.run(exe + args + ["-o", str(tmp_path / "full")], check=True, capture_output=True)

    out = tmp_path / "killed"
    signal_after_first_block(exe + args + ["-o", str(out)], out, signal.SIGKILL).wait()
    state = out.with_name("killed.partial") / "state.json"
    done = json.loads(state.read_text())["layers_done"]
    assert 1 <= done < 5 and not out.exists()

    again = subprocess.run(exe + args + ["-o", str(out)], capture_output=True, text=True)
    assert again.returncode != 0 and "--resume" in again.stderr  # refuses to clobber unfinished work
    subprocess.run(exe + args + ["-o", str(out), "--resume"], check=True, capture_output=True)
    assert _tensors_bytes(out) == _tensors_bytes(tmp_path / "full")


def test_interrupt_then_resume_in_process(tiny_llama, calib_text, tmp_path):
    o = CompressOptions(calib=calib_text, calib_tokens=1024, seq_len=128, iters=1, lplr_iters=1, device="cpu")
    src = open_source(str(tiny_llama))
    compress(src, o, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        compress(src, o, tmp_path / "part", stop_after=1)
    compress(src, o, tmp_path / "part", resume=True)
    assert _tensors_bytes(tmp_path / "part") == _tensors_bytes(tmp_path / "full")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--rank", "256"], "is not below min(out, in)"),
        (["--rank", "0"], "--rank must be positive"),
        (["--q-format", "q9_k"], "unknown format 'q9_k'"),
        (["--lr-format", "q4_0", "--rank", "40"], "multiple of 32"),
        (["--method", "svd"], "unknown method 'svd'"),
        (["--calib", "/nonexistent/calib.txt"], "no such file"),
    ],
)
def test_bad_options_one_line_error(tiny_llama, tmp_path, cli, args, message):
    code, _, err = cli("compress", tiny_llama, "-o", tmp_path / "o", "--calib-tokens", "1024", *args)
    assert code != 0
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_bad_sources(tmp_path, cli):
    code, _, err = cli("compress", tmp_path / "nope", "-o", tmp_path / "o")
    assert code != 0 and "no such file" in err
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = cli("compress", tmp_path / "gpt2", "-o", tmp_path / "o")
    assert code != 0 and "unsupported architecture 'gpt2'" in err
    (tmp_path / "empty").mkdir()
    code, _, err = cli("eval", tmp_path / "empty")
    assert code != 0 and "not a model directory" in err
    code, _, err = cli("compress", "someorg/somemodel", "-o", tmp_path / "o")  # HF_HUB_OFFLINE=1 in tests
    assert code != 0 and "cannot fetch 'someorg/somemodel' from the hub" in err
    assert len(err.strip().splitlines()) == 1


def test_existing_output_is_refused_and_untouched(tiny_llama, tmp_path, cli):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli("compress", tiny_llama, "-o", out)
    assert code != 0 and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_empty_calibration_text(tiny_llama, tmp_path, cli):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = cli("compress", tiny_llama, "-o", tmp_path / "o", "--calib", empty)
    assert code != 0 and "is empty" in err
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    code, _, err = cli("compress", tiny_llama, "-o", tmp_path / "o", "--calib", short)
    assert code != 0 and "too short" in err


def test_gguf_target_falls_back_per_tensor():
    from lrdeploy.compressor.driver import plan_linear

    o = CompressOptions().resolved()
    p = plan_linear("x", (1536, 576), o)
    assert p.q_format == "iq4_nl" and p.fallback == "row length 576 is not a multiple of 256 (gguf): q2_k -> iq4_nl"
    assert plan_linear("x", (576, 1536), o).q_format == "q2_k"
    assert plan_linear("x", (1536, 576), CompressOptions(fallback="q4_0").resolved()).q_format == "q4_0"
    assert plan_linear("x", (1536, 576), CompressOptions(q_format="iq2_xs").resolved()).q_format == "iq4_nl"
    o_any = CompressOptions(target="any").resolved()
    assert plan_linear("x", (1536, 576), o_any).q_format == "q2_k"
    o_onnx = CompressOptions(q_format="iq2_xs", target="onnx").resolved()
    assert plan_linear("x", (1536, 576), o_onnx).q_format == "q4_0"
    with pytest.raises(LrdError, match="unknown --fallback 'q5_0'; choose one of auto, iq4_nl, q4_0, q8_0"):
        CompressOptions(fallback="q5_0").resolved()
    assert grids.get_grid("q2_k").fits((1536, 576), per_row=False) is None


def test_teacher_inputs_give_their_own_h(tiny_llama, calib_text, tmp_path):
    """--inputs teacher takes H from the original model's hidden states: a different, still valid artifact."""
    src = open_source(str(tiny_llama))
    base = dict(method="ldlq", calib=calib_text, calib_tokens=1024, seq_len=128)
    student = compress(src, CompressOptions(**base), tmp_path / "s").manifest["linears"]
    teacher = compress(src, CompressOptions(inputs="teacher", **base), tmp_path / "t").manifest["linears"]
    first = "model.layers.0.self_attn.q_proj"  # block 0 sees the same inputs either way
    assert teacher[first]["error"] == pytest.approx(student[first]["error"], rel=1e-4)
    later = "model.layers.1.mlp.down_proj"
    assert teacher[later]["error"] != student[later]["error"]
