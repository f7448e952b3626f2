"""The architecture registry: gemma3 and phi3 end to end, and H collection that cannot be silently wrong.

The models are random weights on real configs' features (random_model.FAMILY, fixtures in conftest):
- gemma3_text, 6 layers: five sliding-window layers with a 32-token window, then a global one with its own RoPE
  base and linear scaling; sandwich norms, (1 + w) RMSNorm, q/k norms, GELU-tanh, √hidden embedding scale, and
  head_dim 128 ≠ hidden/heads;
- phi3: fused qkv_proj and gate_up_proj, an untied head.
Their norms are random too, so a dropped norm convention shows. The eval windows are 128 tokens, so the sliding
layers' window matters.

Tolerances are those of test_export_gguf and test_export_onnx:
- the f32 GGUF of the source model against torch: max deviation < 1e-4 of the logit std (float rounding only);
- the compressed base + adapter against the torch artifact: within the q8_K activation-rounding tolerance (RMS ≤
  3% of the logit std), with perplexity within 1%, and dropping the adapter must move the logits more;
- ONNX fp32 against the torch artifact: 1e-4·max|logit| for prefill and KV-cache decode. onnxruntime-genai loads
  the export and generates the same greedy tokens as lrdeploy's onnxruntime backend.
"""

from __future__ import annotations

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from test_export_gguf import deviation, simulated_error, torch_logits
from test_export_onnx import REL, _rel_err, _torch_logits

from lrdeploy.artifact import load_artifact
from lrdeploy.compressor import arch as archs
from lrdeploy.compressor.driver import CompressOptions, compress
from lrdeploy.compressor.hcollect import collect_h, hook_h, staged_h
from lrdeploy.compressor.model import BlockContext, layer_prefix, load_full, materialize, rotary, skeleton
from lrdeploy.compressor.sources import open_source
from lrdeploy.compressor.text import eval_windows, load_text, tokenize
from lrdeploy.errors import LrdError
from lrdeploy.exporters.gguf import arch_problem, export_gguf
from lrdeploy.exporters.onnx import export_onnx
from lrdeploy.runtime.eval import perplexity
from lrdeploy.runtime.llamacpp import open_llamacpp
from lrdeploy.runtime.onnxrt import open_onnxruntime

FAMILIES = ["tiny_gemma3", "tiny_phi3"]


@pytest.fixture(scope="module")
def windows(calib_text) -> torch.Tensor:
    tok = open_source("smollm2").tokenizer()
    return eval_windows(tokenize(tok, load_text(calib_text, "0.6:0.62")), 128, 2)


@pytest.fixture(scope="module")
def exported(request, calib_text, tmp_path_factory):
    """Per family: (source model, CALDERA q2_k + rank-32 artifact, its GGUF export, its ONNX export)."""
    cache: dict = {}

    def make(fixture: str):
        if fixture not in cache:
            model = request.getfixturevalue(fixture)
            root = tmp_path_factory.mktemp(fixture)
            opts = CompressOptions(method="caldera", q_format="q2_k", rank=32, calib=calib_text, calib_range="0:0.1",
                                   calib_tokens=1024, seq_len=128, iters=1, lplr_iters=1, device="cpu")
            compress(open_source(str(model)), opts, root / "art")
            export_gguf(str(root / "art"), root / "gguf")
            export_onnx(str(root / "art"), root / "onnx", exact=True)
            cache[fixture] = (model, root / "art", root / "gguf", root / "onnx")
        return cache[fixture]

    return make


# ---------------------------------------------------------------------------------------------------------------------
# the registry and H collection


def test_every_place_asks_the_registry(cli, tmp_path):
    from lrdeploy.compressor.model import skeleton as sk
    from lrdeploy.exporters.gguf import gguf_arch

    assert {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"} <= set(archs.SUPPORTED)
    assert gguf_arch("mistral") == "llama" and gguf_arch("gemma3_text") == "gemma3" and gguf_arch("phi3") == "phi3"
    with pytest.raises(LrdError, match="unsupported architecture 'gpt2'; supported: llama, mistral, qwen2, qwen3, "
                                       "gemma3_text, phi3"):
        archs.get_type("gpt2")
    # every registered linear exists in its family's block, and the groups cover the block's linears exactly
    from transformers import AutoConfig

    for name, arch in archs.ARCHS.items():
        config = AutoConfig.for_model(name, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=50000, head_dim=32)
        block = sk(config).model.layers[0]
        linears = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linears == set(arch.linears), name
        norms = {n for n, m in block.named_modules() if "norm" in type(m).__name__.lower()}
        declared = {arch.attn_norm, arch.mlp_norm, arch.post_attn_norm, arch.post_mlp_norm} - {None}
        assert declared <= norms, name


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"])
def test_hook_h_is_what_the_linears_see_and_staged_h_only_where_it_holds(arch, tmp_path):
    """hook_h (the reference, one group at a time) equals collect_h (every linear hooked in one pass); the staged
    fast path equals it on every architecture the registry allows it for, and is wrong on gemma3, which it isn't."""
    from random_model import make_random_model

    layers = 6 if arch == "gemma3_text" else 2
    src = open_source(str(make_random_model(tmp_path / arch, arch=arch, layers=layers, hidden=256, ffn=512)))
    family = archs.get(src.config)
    model = skeleton(src.config)
    x = torch.randn(6, 48, src.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ctx = BlockContext(model, x[:4], rotary(model, torch.device("cpu")))[1]
    block = materialize(model.model.layers[1], layer_prefix(1), src.tensor, torch.device("cpu"))
    firsts = tuple(g[0] for g in family.groups)
    hooked = collect_h(block, firsts, x, ctx, 4)  # batches of 4 and 2: the last batch is a short one
    for name, H in zip(firsts, hook_h(block, family.groups, x, ctx, 4), strict=True):
        torch.testing.assert_close(H, hooked[name], rtol=1e-5, atol=1e-6)
        assert H.shape == (block.get_submodule(name).in_features,) * 2
    if family.staged_h:
        staged = list(staged_h(block, x, ctx, 4))
        for name, H in zip(firsts, staged, strict=True):
            torch.testing.assert_close(H, hooked[name], rtol=1e-5, atol=1e-6)
    elif arch == "gemma3_text":  # llama's layout read into a sandwich block: the MLP's H would be silently wrong
        staged = list(staged_h(block, x, ctx, 4))
        assert not torch.allclose(staged[2], hooked[firsts[2]], rtol=1e-3, atol=1e-4)


def test_block_context_per_layer_kind(tiny_gemma3):
    """gemma3's sliding layers get the windowed mask and the local RoPE, its global layer the causal one."""
    src = open_source(str(tiny_gemma3))
    model = skeleton(src.config)
    x = torch.zeros(1, 64, src.config.hidden_size)
    ctxs = BlockContext(model, x, rotary(model, torch.device("cpu")))
    assert ctxs.types == ["sliding_attention"] * 5 + ["full_attention"]
    local, full = ctxs[0], ctxs[5]
    cos_l, cos_f = local["position_embeddings"][0], full["position_embeddings"][0]
    assert not torch.allclose(cos_l, cos_f)

    assert full["attention_mask"] is None  # sdpa's own causal path: every earlier token
    mask = local["attention_mask"]
    allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0
    assert not bool(allowed[63, 63 - 32]) and bool(allowed[63, 63 - 31]) and not bool(allowed[10, 11])


# ---------------------------------------------------------------------------------------------------------------------
# end to end: torch, llama.cpp, onnxruntime, onnxruntime-genai


class _Fp16Table(torch.nn.Module):
    """An activation evaluated as ggml's CPU GELU does: a table indexed by the input rounded to fp16, fp16 out."""

    def __init__(self, act: torch.nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x.half().float()).half().float()


@pytest.mark.parametrize("fixture", FAMILIES)
def test_uncompressed_f32_gguf_matches_torch(fixture, request, windows, tmp_path):
    """Norm conventions, windows, RoPE bases and the fused layouts are exact in llama.cpp: f32 agrees to rounding.

    ggml's CPU GELU reads a table of fp16 outputs at the input rounded to fp16: that alone moves gemma3's logits by
    3.8e-4 of their std (RMS; 2.7e-3 at most), and the same rounding in torch gives the same numbers. The torch
    reference rounds that way too, which leaves 1.3e-4 RMS and 1.5e-3 at most (inputs a float ulp apart can round
    to neighbouring fp16 values), so gemma3 is held to 5e-3. That still catches a wrong feature by far: unscaled
    global RoPE gives 0.06 RMS, no sliding window 0.9, 1/√256 for the attention scale 0.3."""
    src = open_source(str(request.getfixturevalue(fixture)))
    s = export_gguf(str(src.path), tmp_path / "f32", dtype="f32")
    assert s["architecture"] == archs.get(src.config).gguf
    model = load_full(src.config, src.tensor)
    tol = 1e-4
    if archs.get(src.config).activation == "gelu_tanh":
        for layer in model.model.layers:
            layer.mlp.act_fn = _Fp16Table(layer.mlp.act_fn)
        tol = 5e-3
    llama = open_llamacpp(tmp_path / "f32", None, 128, "cpu", type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    for w in windows:
        dev = deviation(llama.logits(w), torch_logits(model, w))
        assert dev["max"] < tol and dev["argmax"] == 1.0, dev
    llama.close()
    # and the GGUF reads back as a source: config and weights (gemma's norms shifted back) give the same model
    back = open_source(str(tmp_path / "f32" / "model.gguf"))
    assert archs.get(back.config) is archs.get(src.config)
    assert archs.layer_types(back.config) == archs.layer_types(src.config)
    assert archs.rope_for(back.config, "full_attention") == archs.rope_for(src.config, "full_attention")
    assert archs.attention_scale(back.config) == archs.attention_scale(src.config)
    ref, got = load_full(src.config, src.tensor), load_full(back.config, back.tensor)
    for w in windows:
        assert deviation(torch_logits(got, w), torch_logits(ref, w))["max"] < 1e-5


@pytest.mark.parametrize("fixture", FAMILIES)
def test_compressed_gguf_matches_the_artifact(fixture, exported, windows, monkeypatch):
    """Within what llama.cpp's rounding of activations (q8_K before each K-quant matmul, and gemma3's fp16 GELU
    table) does to the torch artifact when simulated in torch: gemma3's 6 layers round more often than the 2-layer
    llama of test_export_gguf (gemma3: measured 2.8-3.1% RMS, simulated 3.0%; phi3: 1.4%, simulated 1.2%)."""
    _, art, exp, _ = exported(fixture)
    model, manifest = load_artifact(art)
    if archs.get(model.config).activation == "gelu_tanh":
        for layer in model.model.layers:
            layer.mlp.act_fn = _Fp16Table(layer.mlp.act_fn)
    expected = simulated_error(model, windows, monkeypatch)
    llama = open_llamacpp(exp, None, 128, "cpu")
    base_only = open_llamacpp(exp / "model.gguf", None, 128, "cpu")
    for w in windows:
        ref = torch_logits(model, w)
        dev = deviation(llama.logits(w), ref)
        assert dev["rms"] <= 1.5 * expected + 0.002 and dev["argmax"] >= 0.9, (dev, expected)
        assert deviation(base_only.logits(w), ref)["rms"] > 3 * dev["rms"]  # the tolerance would catch no adapter
    p_torch = perplexity(lambda ids: torch_logits(model, ids), windows)
    p_llama = perplexity(llama.logits, windows)
    assert abs(p_llama.ppl / p_torch.ppl - 1) < 0.01, (p_llama.ppl, p_torch.ppl)
    assert llama.bpw == pytest.approx(manifest["summary"]["bpw"], rel=1e-12)
    llama.close()
    base_only.close()


def test_gguf_layouts_are_llama_cpps(exported, tiny_gemma3, tiny_phi3):
    """phi3 keeps its fused attn_qkv and ffn_up (gate then up); gemma3 stores its norms as 1 + w, with its window,
    head size and the global layers' RoPE in the metadata."""
    _, _, exp, _ = exported("tiny_phi3")
    r = gguf.GGUFReader(exp / "model.gguf")
    names = {t.name: t for t in r.tensors}
    assert "blk.0.attn_qkv.weight" in names and "blk.0.attn_q.weight" not in names
    assert "blk.0.ffn_gate.weight" not in names and tuple(names["blk.0.ffn_up.weight"].shape)[1] == 2 * 512
    adapter = {t.name for t in gguf.GGUFReader(exp / "adapter.gguf").tensors}
    assert {"blk.0.attn_qkv.weight.lora_a", "blk.1.ffn_up.weight.lora_b"} <= adapter

    _, _, exp, _ = exported("tiny_gemma3")
    r = gguf.GGUFReader(exp / "model.gguf")
    names = {t.name: t for t in r.tensors}
    src = open_source(str(tiny_gemma3))
    for hf, g in (("model.layers.0.post_attention_layernorm.weight", "blk.0.post_attention_norm.weight"),
                  ("model.layers.5.pre_feedforward_layernorm.weight", "blk.5.ffn_norm.weight"),
                  ("model.layers.2.self_attn.q_norm.weight", "blk.2.attn_q_norm.weight"),
                  ("model.norm.weight", "output_norm.weight")):
        np.testing.assert_array_equal(np.asarray(names[g].data), (src.tensor(hf) + 1.0).numpy())

    def field(key):
        return r.fields[key].contents()

    assert field("gemma3.attention.sliding_window") == 32 and field("gemma3.attention.key_length") == 128
    assert field("gemma3.rope.freq_base") == 1e6 and field("gemma3.rope.scaling.factor") == 8.0


def test_gemma3_configs_llama_cpp_cannot_run_are_refused(tiny_gemma3, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_gemma3))
    assert arch_problem(config) is None
    config.query_pre_attn_scalar = 256
    assert "1/√head_dim" in arch_problem(config)
    config = AutoConfig.from_pretrained(str(tiny_gemma3))
    config.layer_types = ["full_attention"] * 6
    assert "every sixth layer" in arch_problem(config)
    config.save_pretrained(str(tmp_path))
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).symlink_to(tiny_gemma3 / f)
    with pytest.raises(LrdError, match="GGUF export: llama.cpp's gemma3 makes every sixth layer global"):
        export_gguf(str(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fixture", FAMILIES)
def test_onnx_matches_the_artifact_and_genai_runs_it(fixture, exported):
    import onnxruntime_genai as og

    _, art, _, onnx_dir = exported(fixture)
    model, _ = load_artifact(art)
    m = open_onnxruntime(onnx_dir, "cpu")
    ids = torch.randint(0, model.config.vocab_size, (72,), generator=torch.Generator().manual_seed(1))
    ref = _torch_logits(model, ids)
    assert _rel_err(m.logits(ids), ref) < REL  # 72 tokens: past gemma3's 32-token window
    assert _rel_err(m.step_logits(ids, prefill=56), ref) < REL  # 16 decode steps through the KV cache
    ours = m.generate(ids[:40], 8)
    gm = og.Model(str(onnx_dir))
    params = og.GeneratorParams(gm)
    params.set_search_options(max_length=48, do_sample=False)
    gen = og.Generator(gm, params)
    gen.append_tokens(ids[:40].numpy().astype(np.int32))
    theirs = []
    while not gen.is_done():
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    assert theirs == ours


@pytest.mark.parametrize("fixture", FAMILIES)
def test_eval_and_bench_run_on_every_backend(fixture, exported, cli, calib_text):
    import json

    _, art, exp, onnx_dir = exported(fixture)
    ppl = {}
    for backend, path in (("torch", art), ("llamacpp", exp), ("onnxruntime", onnx_dir)):
        code, out, err = cli("eval", path, "--backend", backend, "--text", calib_text, "--text-range", "0.5:0.51",
                             "--ctx", "128", "--windows", "2", "--json", "-q")
        assert code == 0, err
        ppl[backend] = json.loads(out)["ppl"]
    assert ppl["llamacpp"] == pytest.approx(ppl["torch"], rel=0.01)
    assert ppl["onnxruntime"] == pytest.approx(ppl["torch"], rel=1e-4)


@pytest.mark.parametrize("fixture", FAMILIES)
def test_bench_runs_and_counts_the_cache(fixture, exported, cli):
    import json

    from transformers import AutoConfig

    from lrdeploy.runtime.backends import TorchBackend, open_backend

    model, art, exp, onnx_dir = exported(fixture)
    c = AutoConfig.from_pretrained(str(art))
    per_layer = 2 * c.num_key_value_heads * archs.head_dim(c) * 4  # K and V of one token in one layer, float32
    types = archs.layer_types(c)
    for runner in (open_backend(str(art), "torch", "cpu"), open_onnxruntime(onnx_dir, "cpu", threads=1)):
        assert runner.kv_per_token == per_layer * c.num_hidden_layers
        for n in (7, 40):  # gemma3: past its 32-token window
            runner.reset(n)
            runner.prefill(list(range(10, 10 + n)))
            held = runner.kv_per_token * n  # the ONNX graph (like llama.cpp here) keeps every layer's whole cache
            if isinstance(runner, TorchBackend) and fixture == "tiny_gemma3":  # transformers keeps window - 1 tokens
                held = per_layer * sum(n if t == "full_attention" else min(n, c.sliding_window - 1) for t in types)
            assert runner.kv_bytes(n) == held, type(runner).__name__
        runner.close()
    code, out, err = cli("bench", exp, "--baseline", model, "--ctx", "48", "--gen-tokens", "2", "--runs", "1",
                         "--json", "-q")
    assert code == 0, err
    models = {m["role"]: m for m in json.loads(out)["models"]}
    assert models["target"]["ctx"][0]["decode_tps"] > 0 and models["target"]["bytes"] < models["baseline"]["bytes"]


@pytest.mark.parametrize("d", [512, 3 * 1536 + 100])
def test_gram_panels_equal_the_full_product(d):
    """H collection's symmetric panel update (upper panels, then mirrored) equals xᵀx over several batches, and is
    exactly symmetric; widths above two panels take the panel path."""
    from lrdeploy.compressor.hcollect import gram_add, gram_done

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, d, generator=g) for _ in range(3)]
    total = None
    for x in xs:
        total = gram_add(total, x)
    H = gram_done(total)
    X = torch.cat(xs)
    assert torch.equal(H, H.T)
    assert torch.allclose(H, X.T @ X, rtol=1e-5, atol=1e-3)
