"""ONNX export: lossless MatMulNBits mapping, and exported decoders that reproduce the torch artifact.

Tolerances (all runs fp32 on the CPU EP):
* Q itself: the weight onnxruntime computes with (the exported linear run on the identity) equals the artifact's
  Q bit for bit with integer zero points: q4_0, q8_0, q3_k, and q2_k/q4_k with their offsets split off (the
  default). With float zero points (zero_points="float", q2_k in 2 bits) onnxruntime computes code·scale −
  fl(zp·scale), and for about 1 block in 10 no float32 zp makes fl(zp·scale) hit ggml's offset exactly: those
  weights differ by at most one ulp of the block's offset (≤ 1.2e-7 relative), asserted below.
* Logits: the weights are identical, only the float summation order differs (MLAS vs torch GEMM, fused softmax),
  so prefill and step-by-step (KV cache) logits agree to max|Δ| ≤ 1e-4·max|logit| on tiny models and SmolLM2
  (measured: ~1e-6 relative on the tiny models, ~2e-6 on SmolLM2's 30 layers); fp16 exports get 2e-2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lrdeploy.compressor import grids, lattice
from lrdeploy.errors import LrdError
from lrdeploy.exporters.onnx import export_onnx, nbits_dequant, nbits_from_ggml
from lrdeploy.runtime.onnxrt import open_onnxruntime

REL = 1e-4  # max|Δ| / max|logit|, fp32 export vs torch artifact
PROMPTS = ("The history of the city", "In mathematics, a prime number", "She opened the door and")


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def _torch_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None], use_cache=False).logits[0].float()


def _torch_greedy(model, ids: torch.Tensor, n_new: int) -> list[int]:
    """Greedy decoding through transformers' own KV cache: the reference for the ONNX cache."""
    out: list[int] = []
    x, past = ids[None], None
    with torch.no_grad():
        while len(out) < n_new:
            r = model(x, past_key_values=past, use_cache=True)
            past = r.past_key_values
            out.append(int(r.logits[0, -1].argmax()))
            x = torch.tensor([[out[-1]]])
    return out


def _linear_session(w, tmp_path):
    """The exporter's own subgraph for one linear (MatMulNBits, plus the offset MatMul of split affine formats)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnx.external_data_helper import load_external_data_for_model

    from lrdeploy.exporters.onnx.graph import Graph, linear
    from lrdeploy.exporters.onnx.model import LinearWeights

    g = Graph(tmp_path / "model.onnx.data", np.float32)
    y = linear(g, "A", LinearWeights(q=w), "lin")
    g.close()
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, None, w.k])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, None, w.n])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    load_external_data_for_model(model, str(tmp_path))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda a: session.run(None, {"A": a[None]})[0][0]


def _zero_scale_block(fmt: str, raw: torch.Tensor) -> torch.Tensor:
    """Force sub-block 0 to scale 0 with a non-zero min (a constant block): zp = offset/scale cannot express it."""
    raw = raw.clone()
    if fmt == "q2_k":
        raw[0] = 0x50  # sub-scale 0, sub-min 5
    elif fmt == "q4_k":
        raw[4] = raw[4] & 0xC0  # 6-bit sub-scale 0
        raw[8] = (raw[8] & 0xC0) | 5  # 6-bit sub-min 5
    return raw


@pytest.mark.parametrize("zero_points", ["auto", "uint8", "float"])
@pytest.mark.parametrize("fmt", ["q2_k", "q3_k", "q4_k", "q4_0", "q8_0"])
def test_matmulnbits_reproduces_q(fmt, zero_points, tmp_path):
    """Run one exported linear on the identity: its output is the weight onnxruntime uses, compared with ggml's."""
    grid = grids.get_grid(fmt)
    n, k = 48, 576  # 576 % 256 != 0: K-quant super-blocks straddle rows (the flattened layout of --target any)
    torch.manual_seed(0)
    _, raw = grid.quantize_rtn(torch.randn(n, k) * 0.02)
    raw = _zero_scale_block(fmt, raw)
    Q = grid.unpack(raw, (n, k)).numpy()
    w = nbits_from_ggml(fmt, raw, (n, k), zero_points)
    run = _linear_session(w, tmp_path)
    got = run(np.eye(k, dtype=np.float32)).T
    np.testing.assert_array_equal(got, nbits_dequant(w))  # our model of the kernel is the kernel
    assert (w.offsets is not None) == (fmt in ("q2_k", "q4_k") and zero_points != "float")
    if w.zero_points is None or w.zero_points.dtype == np.uint8:
        np.testing.assert_array_equal(got, Q)
    else:
        _, _, offset = grids.parse_blocks(grid, raw)
        ulp = np.spacing(np.abs(offset.numpy().reshape(n, -1, 1)).astype(np.float32))
        diff = np.abs(got - Q).reshape(n, -1, grid.block)
        assert (diff <= ulp).all(), float((diff - ulp).max())
        assert (got == Q).mean() > 0.8
    if fmt in ("q2_k", "q4_k"):
        assert got[0, :16].tolist() == [Q[0, 0]] * 16 and Q[0, 0] < 0  # the constant block survived
    x = np.random.default_rng(0).standard_normal((1, k)).astype(np.float32)  # the M = 1 (decode) kernel too
    y = run(x)
    np.testing.assert_allclose(y, x @ Q.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("zero_points", ["auto", "uint8"])
@pytest.mark.parametrize("fmt", list(lattice.LATTICES))
def test_matmulnbits_reproduces_iquants(fmt, zero_points, tmp_path):
    """An i-quant's codebook (or iq4 level) times its sub-scale is an int8 level times a float: 8-bit MatMulNBits
    with zero point 128 runs exactly ggml's values."""
    grid = grids.get_grid(fmt)
    n, k = 48, 512
    _, raw = grid.quantize_rtn(torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02)
    Q = grid.unpack(raw, (n, k)).numpy()
    w = nbits_from_ggml(fmt, raw, (n, k), zero_points)
    assert (w.bits, w.block_size, w.offsets) == (8, grid.block, None)
    got = _linear_session(w, tmp_path)(np.eye(k, dtype=np.float32)).T
    np.testing.assert_array_equal(got, nbits_dequant(w))
    np.testing.assert_array_equal(got, Q)


@pytest.fixture(scope="module")
def tiny_artifacts(tiny_llama, tiny_qwen2, calib_text, tmp_path_factory):
    """Cheap artifacts: CALDERA q2_k (+ L·R in q4_0) on llama, RTN q4_0 on qwen2 (q/k/v biases; its embedding in
    q4_k, affine with zero points and offsets, which unties the head: float), LDLQ iq2_xs."""
    from lrdeploy.compressor.driver import CompressOptions, compress
    from lrdeploy.compressor.sources import open_source

    root = tmp_path_factory.mktemp("onnx_tiny")
    out = {}
    for key, src, method, fmt, embed in (("llama_q2_k", tiny_llama, "caldera", "q2_k", None),
                                         ("qwen2_q4_0", tiny_qwen2, "rtn", "q4_0", "q4_k"),
                                         ("llama_iq2_xs", tiny_llama, "ldlq", "iq2_xs", None)):
        opts = CompressOptions(method=method, q_format=fmt, calib=calib_text, calib_tokens=1024, seq_len=128,
                               iters=1, lplr_iters=1, target="any", device="cpu", embed_type=embed)
        compress(open_source(str(src)), opts, root / key)
        out[key] = root / key
    return out


@pytest.mark.parametrize("key", ["llama_q2_k", "qwen2_q4_0", "llama_iq2_xs"])
def test_tiny_export_matches_torch(tiny_artifacts, key, tmp_path):
    from lrdeploy.artifact import load_artifact, read_manifest

    art = tiny_artifacts[key]
    summary = export_onnx(str(art), tmp_path / "onnx", exact=True)
    assert summary["linears"]["matmulnbits"] == 14 and "MatMulNBits" in summary["message"]
    assert summary["linears"]["lowrank"] == (14 if key == "llama_q2_k" else 0)
    tables = read_manifest(art)["tensors"]
    for role, name in (("embed", "model.embed_tokens.weight"), ("head", "lm_head.weight")):
        entry = tables.get(name)  # no head entry: tied
        want = ("tied to the embedding" if entry is None else f"{entry['q_format']} as " if entry["q_format"]
                else "float32 matrix")
        assert summary["vocab"][role].startswith(want), (role, summary["vocab"][role])
    if key == "qwen2_q4_0":  # q4_k: zero points and offsets in the lookup; the head untied, in floats
        assert summary["vocab"] == {"embed": "q4_k as 4-bit GatherBlockQuantized", "head": "float32 matrix"}
    iquants = sum(e["q_format"].startswith("iq") for e in read_manifest(art)["linears"].values())
    assert summary["linears"]["iquant_8bit"] == iquants == (10 if key == "llama_iq2_xs" else 0)  # q2 mix: k/v q4_k
    for name in ("model.onnx", "genai_config.json", "tokenizer.json", "lrdeploy_onnx.json"):
        assert (tmp_path / "onnx" / name).is_file(), name
    model, manifest = load_artifact(art)
    m = open_onnxruntime(tmp_path / "onnx", "cpu")
    assert m.bpw == pytest.approx(manifest["summary"]["bpw"])
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    ref = _torch_logits(model, ids)
    assert _rel_err(m.logits(ids), ref) < REL
    assert _rel_err(m.step_logits(ids, prefill=24), ref) < REL  # 16 decode steps through the KV cache
    assert m.generate(ids[:8], 6) == _torch_greedy(model, ids[:8], 6)


def test_tiny_fp16_float_zp_and_unfused_variants(tiny_artifacts, tmp_path):
    """The other export variants of the q2_k artifact: fp16, DESIGN.md's float zero points, unfused linears."""
    from lrdeploy.artifact import load_artifact

    art = tiny_artifacts["llama_q2_k"]
    model, _ = load_artifact(art)
    ids = torch.arange(5, 45)
    ref = _torch_logits(model, ids)
    for name, kwargs, tol in (("fp16", {"dtype": "fp16"}, 2e-2), ("float", {"zero_points": "float"}, REL),
                              ("unfused", {"fuse": False}, REL), ("plain", {"graph": "plain"}, REL),
                              ("plain-fp16", {"graph": "plain", "dtype": "fp16"}, 2e-2)):
        export_onnx(str(art), tmp_path / name, exact=True, **kwargs)
        m = open_onnxruntime(tmp_path / name, "cpu")
        assert _rel_err(m.logits(ids), ref) < tol, name
        assert _rel_err(m.step_logits(ids, prefill=30), ref) < tol, name
    meta = json.loads((tmp_path / "float" / "lrdeploy_onnx.json").read_text())
    assert meta["zero_points"] == "float" and meta["dtype"] == "fp32"


def test_fused_graph_ops_cache_and_quantized_vocab(tiny_artifacts, tmp_path):
    """The default graph: onnxruntime's fused ops, one shared KV buffer per layer, the embedding and head kept in
    their stored blocks (GatherBlockQuantized + MatMulNBits), L and R as MatMulNBits; prefill in chunks through the
    shared buffer equals one pass, and both equal the torch artifact."""
    import onnx

    from lrdeploy.artifact import load_artifact, read_manifest

    art = tiny_artifacts["llama_q2_k"]
    summary = export_onnx(str(art), tmp_path / "onnx", exact=True)
    assert summary["graph"] == "fused" and summary["kv_cache"] == "shared buffer"
    tables = read_manifest(art)["tensors"]
    embed = tables["model.embed_tokens.weight"]["q_format"]
    assert summary["vocab"]["embed"] == f"{embed} as 4-bit GatherBlockQuantized"
    assert summary["linears"]["lowrank_nbits"] == summary["linears"]["lowrank"] == 14
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "GatherBlockQuantized"} <= ops
    assert not ops & {"Softmax", "Concat", "ReduceMean"}  # no hand-built attention, cache copy or RMSNorm
    assert "position_ids" not in {i.name for i in graph.input}
    genai = json.loads((tmp_path / "onnx" / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    model, _ = load_artifact(art)
    m = open_onnxruntime(tmp_path / "onnx", "cpu")
    assert m.shared
    ids = torch.randint(0, model.config.vocab_size, (48,), generator=torch.Generator().manual_seed(3))
    ref = _torch_logits(model, ids)
    one = m.logits(ids)
    assert _rel_err(one, ref) < REL
    chunked = m.step_logits(ids, prefill=[7, 1, 16, 8])  # then 16 single steps
    assert _rel_err(chunked, one) < REL
    assert m.kv_bytes(48) == m.kv_per_token * 48  # one buffer of the asked capacity, filled in place
    with pytest.raises(LrdError, match="KV buffer holds 48 positions"):
        m.decode(1)


@pytest.mark.parametrize("graph", ["fused", "plain"])
def test_logits_to_keep(tiny_artifacts, tmp_path, graph):
    """The optional input logits_to_keep: K > 0 gives the last K positions' logits alone, equal to those rows of
    the full pass; 0 and the default (not fed, as onnxruntime-genai runs the graph) give every position's. The
    runtime's prefill asks for one row, and generation still matches torch."""
    from lrdeploy.artifact import load_artifact

    art = tiny_artifacts["llama_q2_k"]
    export_onnx(str(art), tmp_path / graph, exact=True, graph=graph)
    m = open_onnxruntime(tmp_path / graph, "cpu")
    assert "logits_to_keep" in {i.name for i in m.session.get_overridable_initializers()}
    ids = torch.arange(3, 40)
    full = m.logits(ids).numpy()
    assert full.shape[0] == 37
    feed = {**m._feed(ids.numpy(), 0), **m.empty_cache()}
    for k, rows in ((1, 1), (5, 5), (0, 37), (99, 37)):
        (out,) = m.session.run(["logits"], {**feed, "logits_to_keep": np.array(k, np.int64)})
        assert out.shape == (1, rows, full.shape[1]), k
        np.testing.assert_allclose(out[0], full[-rows:], rtol=0, atol=1e-5 * np.abs(full).max())
    m.reset(45)
    m.prefill(ids.tolist())
    np.testing.assert_allclose(m._last, full[-1], rtol=0, atol=1e-5 * np.abs(full).max())
    model, _ = load_artifact(art)
    assert m.generate(ids[:9], 5) == _torch_greedy(model, ids[:9], 5)


def test_source_blocks_decode_as_ggml(tmp_path):
    """A source's q4_1 and q6_k embedding/head map onto MatMulNBits exactly: the values onnxruntime computes with
    equal gguf-py's dequantization bit for bit; a type without an exact form is left to floats."""
    import gguf

    from lrdeploy.exporters.onnx import nbits_from_blocks

    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 512)).astype(np.float32)
    q41 = gguf.quants.quantize(W, gguf.GGMLQuantizationType.Q4_1)
    q6k = rng.integers(0, 256, (8, 2, 210), dtype=np.uint8)  # gguf-py has no q6_k quantizer: random blocks
    q6k[..., 208:210] = (rng.standard_normal((8, 2, 1)) * 0.01).astype(np.float16).view(np.uint8)
    for fmt, raw in (("q4_1", q41), ("q6_k", q6k.reshape(8, -1))):
        ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt.upper()])
        w = nbits_from_blocks(fmt, raw, (8, 512))
        np.testing.assert_array_equal(nbits_dequant(w), ref)
        (tmp_path / fmt).mkdir()
        y = _linear_session(w, tmp_path / fmt)(np.eye(512, dtype=np.float32))  # the identity returns Wᵀ
        np.testing.assert_array_equal(y.T, ref)
    assert nbits_from_blocks("q5_0", gguf.quants.quantize(W, gguf.GGMLQuantizationType.Q5_0), (8, 512)) is None


def test_fused_graph_refusal_and_fallback(tiny_phi3, tmp_path, cli):
    """A rotary width GroupQueryAttention cannot take: --graph fused refuses in one line, auto falls back to the
    plain graph and says why."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_phi3))
    config.rope_parameters["partial_rotary_factor"] = 0.375  # 24 of 64 dims
    src = tmp_path / "phi3-partial"
    config.save_pretrained(str(src))
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (src / f).symlink_to(tiny_phi3 / f)
    code, _, err = cli("export", src, "--format", "onnx", "-o", tmp_path / "fused", "--graph", "fused")
    assert code == 2 and "rotary dims in multiples of 16" in err and "--graph plain" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "fused").exists()
    code, out, err = cli("export", src, "--format", "onnx", "-o", tmp_path / "auto", "--json")
    assert code == 0, err
    row = json.loads(out)
    assert row["graph"] == "plain" and "rotates 24" in row["plain_because"]


def test_tiny_batch_with_left_padding(tiny_artifacts, tmp_path):
    """attention_mask zeros hide pad tokens: a left-padded row of the plain graph gives the logits of the same
    sequence alone (the fused graph's GroupQueryAttention takes right padding only)."""
    export_onnx(str(tiny_artifacts["llama_q2_k"]), tmp_path / "onnx", exact=True, graph="plain")
    m = open_onnxruntime(tmp_path / "onnx", "cpu")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 1000, 12), rng.integers(0, 1000, 7)
    pad = 12 - len(b)
    feed = {"input_ids": np.stack([a, np.concatenate([np.zeros(pad, np.int64), b])]).astype(np.int64),
            "attention_mask": np.stack([np.ones(12), np.r_[np.zeros(pad), np.ones(len(b))]]).astype(np.int64),
            "position_ids": np.stack([np.arange(12), np.r_[np.zeros(pad), np.arange(len(b))]]).astype(np.int64)}
    cache = {k: np.concatenate([v, v]) for k, v in m.empty_cache().items()}
    logits = m.session.run(["logits"], {**feed, **cache})[0]
    assert np.isfinite(logits).all()
    for row, seq, start in ((0, a, 0), (1, b, pad)):
        alone = m.logits(torch.from_numpy(seq)).numpy()
        np.testing.assert_allclose(logits[row, start:], alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_uncompressed_export_fp32_and_fp16(tiny_llama, tmp_path, cli):
    from lrdeploy.compressor.model import load_full
    from lrdeploy.compressor.sources import open_source

    src = open_source(str(tiny_llama))
    model = load_full(src.config, src.tensor)
    ids = torch.arange(3, 35)
    ref = _torch_logits(model, ids)
    code, out, err = cli("export", tiny_llama, "--format", "onnx", "-o", tmp_path / "fp32", "--exact", "--json")
    assert code == 0, err
    row = json.loads(out)
    assert row["kind"] == "uncompressed" and row["bpw"] is None and row["linears"]["dense"] == 14
    m = open_onnxruntime(tmp_path / "fp32", "cpu")
    assert m.bpw is None
    assert _rel_err(m.logits(ids), ref) < REL
    assert _rel_err(m.step_logits(ids, prefill=20), ref) < REL
    export_onnx(str(tiny_llama), tmp_path / "fp16", exact=True, dtype="fp16")
    m16 = open_onnxruntime(tmp_path / "fp16", "cpu")
    assert m16.io.dtype == np.float16
    assert _rel_err(m16.logits(ids), ref) < 2e-2
    assert _rel_err(m16.step_logits(ids, prefill=20), ref) < 2e-2


def test_cli_export_eval_and_refusals(tiny_artifacts, tmp_path, cli, calib_text):
    art, out = tiny_artifacts["qwen2_q4_0"], tmp_path / "onnx"
    code, stdout, err = cli("export", art, "--format", "onnx", "-o", out, "--exact")
    assert code == 0, err
    said = " ".join(stdout.split())  # the console wraps long lines
    assert "MatMulNBits" in said and "artifact bpw 4.500" in said
    assert "note:" not in err  # q4_0 runs on the fast 4-bit kernels: nothing to warn about
    code, _, err8 = cli("export", tiny_artifacts["llama_iq2_xs"], "--format", "onnx", "-o", tmp_path / "iq",
                        "--exact")
    assert code == 0, err8
    notes = [line for line in err8.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "8-bit MatMulNBits" in notes[0] and "--exact keeps them float" in " ".join(err8.split())
    code, _, err8 = cli("export", tiny_artifacts["llama_iq2_xs"], "--format", "onnx", "-o", tmp_path / "iq8")
    assert code == 0 and "note:" not in err8, err8  # the default CPU export: int8 activations, the fast kernels
    code, _, err = cli("export", art, "--format", "onnx", "-o", out, "--exact")
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("export", art, "--format", "onnx", "-o", out, "--force", "--dtype", "bf16")
    assert code == 2 and "fp32 or fp16" in err
    assert (out / "model.onnx").is_file() and not (tmp_path / "onnx.partial").exists()
    code, stdout, err = cli("eval", out, "--backend", "onnxruntime", "--text", calib_text, "--ctx", "64",
                            "--windows", "2", "--json", "--device", "cpu")
    assert code == 0, err
    onnx_row = json.loads(stdout)
    code, stdout, err = cli("eval", art, "--text", calib_text, "--ctx", "64", "--windows", "2", "--json")
    assert code == 0, err
    torch_row = json.loads(stdout)
    assert onnx_row["bpw"] == pytest.approx(4.5) and onnx_row["tokens"] == torch_row["tokens"]
    assert onnx_row["ppl"] == pytest.approx(torch_row["ppl"], rel=1e-4)


def test_export_is_built_for_its_execution_provider(tiny_artifacts, tmp_path, cli):
    """--ep cpu (the default without a GPU): int8 activations on every MatMulNBits, close to the exact export's
    logits but not equal to them; --ep cuda: the fp16 graph with float activations and a CUDA genai_config; both
    say what they were built for in the export's record and in inspect. Careless flags are one line and exit 2."""
    import onnx

    from lrdeploy.artifact import load_artifact

    art = tiny_artifacts["qwen2_q4_0"]
    model, _ = load_artifact(art)
    ids = torch.arange(3, 43)
    ref = _torch_logits(model, ids)
    outs = {}
    for name, flags in (("default", []), ("cpu", ["--ep", "cpu"]), ("cuda", ["--ep", "cuda"]), ("exact", ["--exact"])):
        code, shown, err = cli("export", art, "--format", "onnx", "-o", tmp_path / name, *flags, "--json")
        assert code == 0, err
        outs[name] = json.loads(shown)
        graph = onnx.load(str(tmp_path / name / "model.onnx"), load_external_data=False).graph
        levels = {next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
                  for n in graph.node if n.op_type == "MatMulNBits"}
        assert levels == {4 if name in ("default", "cpu") else 0}, name
        code, shown, err = cli("inspect", tmp_path / name, "--json")
        assert code == 0, err
        assert json.loads(shown)["notes"][0] == outs[name]["built_for"], name
    assert {k: (v["ep"], v["dtype"], v["exact"]) for k, v in outs.items()} == {
        "default": ("cpu", "fp32", False), "cpu": ("cpu", "fp32", False), "cuda": ("cuda", "fp16", False),
        "exact": ("cpu", "fp32", True)}
    assert "int8" in outs["cpu"]["built_for"] and "CUDA" in outs["cuda"]["built_for"]
    assert "reproduces the artifact's logits" in outs["exact"]["built_for"]
    genai = json.loads((tmp_path / "cuda" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    assert json.loads((tmp_path / "cpu" / "genai_config.json").read_text())["model"]["decoder"][
        "session_options"]["provider_options"] == []
    exact = open_onnxruntime(tmp_path / "exact", "cpu").logits(ids)
    fast = open_onnxruntime(tmp_path / "cpu", "cpu").logits(ids)
    assert _rel_err(exact, ref) < REL
    assert REL < _rel_err(fast, ref) < 5e-2  # int8 activations: no longer bit-exact, still the same model
    half = open_onnxruntime(tmp_path / "cuda", "cpu")  # the fp16 graph runs on the CPU EP too
    assert half.io.dtype == np.float16 and _rel_err(half.logits(ids), ref) < 2e-2
    for flags, needle in ((["--ep", "tpu"], "unknown execution provider 'tpu'"),
                          (["--ep", "cuda", "--exact"], "drop --ep cuda"),
                          (["--ep"], "requires an argument")):
        code, _, err = cli("export", art, "--format", "onnx", "-o", tmp_path / "bad", *flags)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (flags, err)
    code, _, err = cli("export", art, "--format", "gguf", "-o", tmp_path / "g", "--ep", "cpu")
    assert code == 2 and "--ep and --exact apply to --format onnx only" in err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "g").exists()


def test_wrong_inputs_is_one_line_error(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(LrdError, match="not a decoder with a KV cache") as e:
        open_onnxruntime(tmp_path, "cpu")
    assert "\n" not in str(e.value) and "input_ids" in str(e.value)
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(LrdError, match="cannot load"):
        open_onnxruntime(tmp_path, "cpu")
    with pytest.raises(LrdError, match="no ONNX model"):
        open_onnxruntime(tmp_path / "missing", "cpu")


# ----------------------------------------------------------------------------------------------------------------------
# SmolLM2 (caldera defaults, target gguf: q2_k on down_proj, q4_0 where 576-wide rows don't fit K-quants)


@pytest.fixture(scope="module")
def smol(smol_artifact, tmp_path_factory):
    from lrdeploy.artifact import load_artifact

    out = tmp_path_factory.mktemp("smol_onnx") / "onnx"
    export_onnx(str(smol_artifact), out, exact=True)
    model, _ = load_artifact(smol_artifact)
    return model, open_onnxruntime(out, "cpu")


def test_smol_prefill_and_decode_logits(smol, calib_text):
    from lrdeploy.compressor.text import load_text, tokenize

    model, m = smol
    ids = tokenize(m.tokenizer, load_text(calib_text, "0.5:1"))[:48]
    ref = _torch_logits(model, ids)
    assert _rel_err(m.logits(ids), ref) < REL
    assert _rel_err(m.step_logits(ids, prefill=32), ref) < REL


def test_smol_perplexity_within_half_percent(smol, calib_text):
    from lrdeploy.compressor.text import eval_windows, load_text, tokenize
    from lrdeploy.runtime.eval import perplexity

    model, m = smol
    wins = eval_windows(tokenize(m.tokenizer, load_text(calib_text, "0.5:1")), 256, 4)
    ppl_onnx = perplexity(m.logits, wins).ppl
    ppl_torch = perplexity(lambda w: _torch_logits(model, w), wins).ppl
    print(f"SmolLM2 ctx 256, 4 windows: ppl onnx {ppl_onnx:.4f} torch {ppl_torch:.4f}")
    assert abs(ppl_onnx / ppl_torch - 1) < 0.005


def test_smol_greedy_generation_matches_torch(smol):
    model, m = smol
    for prompt in PROMPTS:
        ids = torch.tensor(m.tokenizer(prompt)["input_ids"])
        assert m.generate(ids, 32) == _torch_greedy(model, ids, 32), prompt
