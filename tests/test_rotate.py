"""--rotate: a randomized Hadamard rotation folded into the weights leaves the model's function unchanged, and its
exports are ordinary models that llama.cpp and onnxruntime run."""

from __future__ import annotations

import json

import pytest
import torch

from lrdeploy.artifact import read_manifest
from lrdeploy.compressor import rotate
from lrdeploy.compressor.model import load_full
from lrdeploy.compressor.sources import open_source


@pytest.mark.parametrize("n", [64, 192, 576, 896, 1536])
def test_rotation_is_orthogonal_seeded_and_flat(n):
    Q = rotate.orthogonal(n, 0)
    torch.testing.assert_close(Q @ Q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(Q, rotate.orthogonal(n, 0)) and not torch.equal(Q, rotate.orthogonal(n, 1))
    a, b, m = rotate.factors(n)
    assert 2**a * 12**b * m == n and m % 2 == 1
    if m == 1:  # all Hadamard: every input spreads over every output with equal weight
        torch.testing.assert_close(Q.abs(), torch.full_like(Q, n**-0.5), rtol=0, atol=1e-12)


def test_paley12_is_hadamard():
    P = rotate.paley12()
    assert set(P.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(P @ P.T, 12 * torch.eye(12, dtype=torch.float64))


def _logits(config, get, ids):
    with torch.no_grad():
        return load_full(config, get).float()(ids[None]).logits[0]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_phi3", "smollm2"])
@pytest.mark.parametrize("kind", ["residual", "residual+head"])
def test_rotated_float_model_computes_the_same_logits(fixture, kind, request):
    src = open_source("smollm2" if fixture == "smollm2" else str(request.getfixturevalue(fixture)))
    rot = rotate.RotatedSource(src, kind, seed=3)
    ids = torch.randint(0, 1000, (48,), generator=torch.Generator().manual_seed(0))
    ref, got = _logits(src.config, src.tensor, ids), _logits(rot.config, rot.tensor, ids)
    assert float((got - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))
    # and the weights did change: outliers are spread, norms folded
    W, Wr = src.tensor("model.layers.0.mlp.down_proj.weight"), rot.tensor("model.layers.0.mlp.down_proj.weight")
    assert not torch.allclose(W, Wr)
    assert torch.equal(rot.tensor("model.layers.0.input_layernorm.weight"),  # phi3: its fused qkv reads it
                       torch.ones_like(src.tensor("model.layers.0.input_layernorm.weight")))
    assert rot.config.tie_word_embeddings is False and rot.has("lm_head.weight")


@pytest.fixture(scope="module")
def rotated(tiny_llama, calib_text, tmp_path_factory):
    from lrdeploy.compressor.driver import CompressOptions, compress

    root = tmp_path_factory.mktemp("rot")
    o = CompressOptions(method="rtn", q_format="q4_k", calib=calib_text, calib_tokens=1024, seq_len=128,
                        device="cpu", rotate="residual+head", rotate_seed=5)
    compress(open_source(str(tiny_llama)), o, root / "art")
    return root, o


def test_rotated_artifact_records_its_rotation_and_unties(rotated):
    root, _ = rotated
    m = read_manifest(root / "art")
    assert m["options"]["rotate"] == "residual+head" and m["options"]["rotate_seed"] == 5
    assert m["untied"] is True and m["summary"]["output_bytes"] > 0
    assert json.loads((root / "art" / "config.json").read_text())["tie_word_embeddings"] is False


@pytest.mark.parametrize(("fmt", "backend", "rel"), [("gguf", "llamacpp", 0.01), ("onnx", "onnxruntime", 0.005)])
def test_rotated_exports_reproduce_torch(rotated, calib_text, cli, fmt, backend, rel):
    root, _ = rotated
    out = root / fmt
    if not out.exists():
        code, _, err = cli("export", root / "art", "--format", fmt, "-o", out)
        assert code == 0, err
    args = ["--text", calib_text, "--text-range", "0.6:0.62", "--ctx", "128", "--windows", "2", "--json"]
    code, ref, err = cli("eval", root / "art", "--backend", "torch", *args)
    assert code == 0, err
    code, got, err = cli("eval", out, "--backend", backend, *args)
    assert code == 0, err
    assert json.loads(got)["ppl"] == pytest.approx(json.loads(ref)["ppl"], rel=rel)


@pytest.mark.parametrize("run", ["rotated", "down_rotated"])
def test_rotated_resume_is_byte_identical(run, tiny_llama, tmp_path, request):
    from lrdeploy.compressor.driver import compress

    root, o = request.getfixturevalue(run)
    src = open_source(str(tiny_llama))
    with pytest.raises(KeyboardInterrupt):
        compress(src, o, tmp_path / "part", stop_after=1)
    compress(src, o, tmp_path / "part", resume=True)
    assert (tmp_path / "part" / "model.safetensors").read_bytes() == (root / "art" / "model.safetensors").read_bytes()


def test_unknown_rotation_is_one_line(cli, tmp_path):
    code, _, err = cli("compress", "smollm2", "-o", tmp_path / "a", "--rotate", "full", "-q")
    assert code == 2 and err == "error: unknown --rotate 'full'; choose one of none, residual, residual+head\n", err


def test_sandwich_norms_refuse_rotation(tiny_gemma3, tmp_path, cli):
    """gemma3's post-norms sit between o/down and the residual: nothing folds, so --rotate is one clear error."""
    code, _, err = cli("compress", str(tiny_gemma3), "-o", tmp_path / "out", "--rotate", "residual", "--method",
                       "rtn", "--q-format", "q8_0", "--device", "cpu", "-q")
    assert code != 0 and "--rotate is not supported for gemma3_text" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# --rotate-down: an online rotation of down_proj's input, for runtimes that can apply it (torch, onnxruntime)


@pytest.mark.parametrize(("width", "block"), [(1536, 256), (8960, 256), (512, 256), (96, 32)])
def test_input_rotation_is_exact_on_weights_and_h(width, block):
    rot = rotate.InputRotation.for_width(width, seed=7)
    assert rot.block == block
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(24, width, generator=g, dtype=torch.float64), torch.randn(5, width, generator=g,
                                                                                  dtype=torch.float64)
    torch.testing.assert_close(rot.apply(x) @ rot.weight(W).T, x @ W.T, rtol=0, atol=1e-10)
    B = torch.block_diag(*[rot.matrix] * (width // block))
    torch.testing.assert_close(rot.apply(x), x @ B, rtol=0, atol=1e-12)
    X = torch.randn(64, width, generator=g, dtype=torch.float64)
    H = X.T @ X / 64
    torch.testing.assert_close(rot.h(H), B.T @ H @ B, rtol=0, atol=1e-9)  # the H of the rotated inputs
    assert rotate.InputRotation.from_record(rot.record()) == rot


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "smollm2"])
def test_down_rotated_float_model_computes_the_same_logits(fixture, request):
    src = open_source("smollm2" if fixture == "smollm2" else str(request.getfixturevalue(fixture)))
    base = rotate.RotatedSource(src, "residual", seed=3)
    rot = rotate.InputRotation.for_width(src.config.intermediate_size, seed=5)
    down = rotate.DownRotatedSource(base, rot)
    ids = torch.randint(0, 1000, (48,), generator=torch.Generator().manual_seed(0))
    ref = _logits(src.config, src.tensor, ids)
    with torch.no_grad():
        got = load_full(base.config, down.tensor, replace=lambda m: rotate.install_down(m, rot))(ids[None]).logits[0]
    assert float((got - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(down.tensor(name), base.tensor(name))


def test_h_collection_sees_the_rotated_input(tiny_llama):
    """Every H path (hooks on the teacher, the staged student path) records what down_proj's weight multiplies."""
    from lrdeploy.compressor.hcollect import collect_h, run_block, staged_h
    from lrdeploy.compressor.model import BlockContext, materialize, rotary, skeleton

    src = open_source(str(tiny_llama))
    rot = rotate.InputRotation.for_width(src.config.intermediate_size, seed=1)
    model = skeleton(src.config)
    block = materialize(model.model.layers[0], "model.layers.0.", src.tensor, "cpu")
    x = torch.randn(2, 32, src.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ctx = BlockContext(model, x, rotary(model, "cpu"))[0]
    plain = collect_h(block, ("mlp.down_proj",), x, ctx, 2)["mlp.down_proj"]
    rotate.install_down(model, rot)
    rblock = materialize(model.model.layers[0], "model.layers.0.", rotate.DownRotatedSource(src, rot).tensor, "cpu")
    hooked = collect_h(rblock, ("mlp.down_proj",), x, ctx, 2)["mlp.down_proj"]
    torch.testing.assert_close(hooked, rot.h(plain), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(list(staged_h(rblock, x, ctx, 2))[-1], hooked, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # and the rotated block computes what the original does
        torch.testing.assert_close(run_block(rblock, x, ctx, 2), run_block(block, x, ctx, 2), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def down_rotated(tiny_llama, calib_text, tmp_path_factory):
    from lrdeploy.compressor.driver import CompressOptions, compress

    root = tmp_path_factory.mktemp("rotdown")
    o = CompressOptions(method="caldera", q_format="q3_k", rank=32, calib=calib_text, calib_tokens=1024, seq_len=128,
                        device="cpu", target="any", rotate="residual", rotate_down=True, rotate_seed=5)
    compress(open_source(str(tiny_llama)), o, root / "art")
    return root, o


def test_down_rotated_artifact_runs_in_torch_and_onnx(down_rotated, calib_text, cli):
    root, _ = down_rotated
    m = read_manifest(root / "art")
    assert m["rotate_down"] == {"block": 256, "seed": 7} and m["options"]["rotate_down"] is True
    code, shown, err = cli("inspect", root / "art", "--json")
    assert code == 0, err
    assert any("down_proj's input rotated online (randomized Hadamard in blocks of 256, seed 7)" in n
               for n in json.loads(shown)["notes"]), shown
    code, _, err = cli("export", root / "art", "--format", "onnx", "-o", root / "onnx", "--exact")
    assert code == 0, err
    args = ["--text", calib_text, "--text-range", "0.6:0.62", "--ctx", "128", "--windows", "2", "--json"]
    code, ref, err = cli("eval", root / "art", "--backend", "torch", *args)
    assert code == 0, err
    code, got, err = cli("eval", root / "onnx", "--backend", "onnxruntime", *args)
    assert code == 0, err
    assert json.loads(got)["ppl"] == pytest.approx(json.loads(ref)["ppl"], rel=0.005)
    # the rotation is part of the function: the same artifact without it computes other logits
    from lrdeploy.artifact import load_artifact

    model, _ = load_artifact(root / "art")
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    downs = [layer.mlp.down_proj for layer in model.model.layers]
    assert all(d.in_rotation == rotate.InputRotation(256, 7) for d in downs)
    with torch.no_grad():
        ref_logits = model(ids).logits
        for d in downs:
            d.in_rotation = None
        plain = model(ids).logits
    assert float((plain - ref_logits).abs().max()) > 0.1 * float(ref_logits.abs().max())


def test_rotate_down_refuses_llama_cpp(down_rotated, cli, tmp_path):
    root, _ = down_rotated
    code, _, err = cli("export", root / "art", "--format", "gguf", "-o", tmp_path / "g")
    assert code == 2 and "--rotate-down" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "g").exists()
    code, _, err = cli("compress", "smollm2", "-o", tmp_path / "a", "--rotate-down", "-q")
    assert code == 2 and "--rotate-down needs a runtime" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()


def test_broken_rotate_down_record_is_one_line(down_rotated, cli, tmp_path):
    import shutil

    root, _ = down_rotated
    art = tmp_path / "art"
    shutil.copytree(root / "art", art)
    m = json.loads((art / "lrdeploy.json").read_text())
    m["rotate_down"] = {"block": 100, "seed": 7}
    (art / "lrdeploy.json").write_text(json.dumps(m))
    code, _, err = cli("eval", art, "--backend", "torch", "--ctx", "64", "--windows", "1")
    assert code == 2 and "bad 'rotate_down' record" in err and len(err.strip().splitlines()) == 1, err


def test_rotated_gguf_from_a_gguf_source_keeps_its_own_norms(calib_text, cli, tmp_path):
    """SmolLM2's source is a GGUF, whose untouched tensors the exporter copies byte for byte; a rotated artifact's
    norms (ones) and biases are its own, and copying the source's there broke the file (Qwen2.5-1.5B: ppl 1e22)."""
    import gguf
    import numpy as np

    from lrdeploy.artifact import ArtifactTensors

    art, out = tmp_path / "art", tmp_path / "gguf"
    code, _, err = cli("compress", "smollm2", "-o", art, "--method", "rtn", "--q-format", "q8_0", "--calib",
                       calib_text, "--calib-tokens", "512", "--seq-len", "128", "--rotate", "residual", "-q")
    assert code == 0, err
    code, _, err = cli("export", art, "--format", "gguf", "-o", out)
    assert code == 0, err
    tensors = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    own = ArtifactTensors(art, read_manifest(art))
    for gguf_name, hf_name in (("output_norm.weight", "model.norm.weight"),
                               ("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight")):
        assert np.array_equal(np.asarray(tensors[gguf_name].data), np.ones(576, dtype=np.float32))
        assert torch.equal(own(hf_name), torch.ones(576))
    assert not torch.equal(open_source("smollm2").tensor("model.norm.weight"), torch.ones(576))  # it did change
    args = ["--text", calib_text, "--text-range", "0.6:0.65", "--ctx", "256", "--windows", "2", "--json"]
    code, ref, err = cli("eval", art, "--backend", "torch", *args)
    assert code == 0, err
    code, got, err = cli("eval", out, "--backend", "llamacpp", *args)
    assert code == 0, err
    assert json.loads(got)["ppl"] == pytest.approx(json.loads(ref)["ppl"], rel=0.01)
