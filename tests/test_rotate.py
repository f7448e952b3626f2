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


def test_rotated_resume_is_byte_identical(rotated, tiny_llama, tmp_path):
    from lrdeploy.compressor.driver import compress

    root, o = rotated
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
