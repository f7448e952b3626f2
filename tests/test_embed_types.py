"""--embed-type / --output-type: the embedding and head formats through the artifact, its loader and the GGUF export.

The random models here have a 1024-token vocabulary (the calibration text is common words whose SmolLM2 ids are all
below 1024), so rounding the 1024 x 256 matrices takes a fraction of a second.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from test_export_gguf import ARGMAX_MIN, MAX_TOL, RMS_TOL, deviation, q8k_round, torch_logits

from lrdeploy.artifact import (
    QLRLinear,
    artifact_tokenizer,
    dequantize_blocks,
    load_artifact,
    read_manifest,
    validate_manifest,
)
from lrdeploy.compressor import embeddings as emb
from lrdeploy.compressor import grids
from lrdeploy.compressor.driver import CompressOptions, compress
from lrdeploy.compressor.sources import open_source, read_gguf_index
from lrdeploy.compressor.text import eval_windows, tokenize
from lrdeploy.errors import LrdError
from lrdeploy.exporters.gguf import export_gguf
from lrdeploy.runtime.llamacpp import open_llamacpp

VOCAB = 1024
WORDS = ("the of and to in is that for it as on with by at be this from or an was he we are not his her they "
         "you all one had have but which were there can their has been more also new its time than first other "
         "only").split()
SHAPE = (VOCAB, 256)


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> Path:
    """Calibration text whose every token id is below VOCAB."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" " + " ".join(rng.choice(WORDS) for _ in range(8000)) + "\n")
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """tiny_llama's shapes (tied, hidden 256) with a 1024-token vocabulary."""
    from random_model import make_random_model

    return make_random_model(tmp_path_factory.mktemp("small") / "llama", layers=2, vocab=VOCAB, tie=True)


def _compress(src: Path, out: Path, text: Path, **kw) -> dict:
    opts = CompressOptions(method="rtn", q_format="q4_k", calib=str(text), calib_tokens=1024, seq_len=128,
                           device="cpu", **kw)
    return compress(open_source(str(src)), opts, out).manifest


IMPORTANCE: list[tuple[torch.Tensor, torch.Tensor]] = []  # what the typed run weighted its head with, and a check


@pytest.fixture(scope="module")
def typed(small, words, tmp_path_factory) -> tuple[Path, Path, dict]:
    """(artifact with --embed-type q2_k --output-type q4_k, its GGUF export, the default artifact's manifest)."""
    root = tmp_path_factory.mktemp("typed")
    real = emb.input_importance

    def spy(norm, x, batch):
        IMPORTANCE.append((real(norm, x, batch), norm(x).pow(2).mean((0, 1))))
        return IMPORTANCE[-1][0]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(emb, "input_importance", spy)
        _compress(small, root / "art", words, embed_type="q2_k", output_type="q4_k")
    export_gguf(str(root / "art"), root / "gguf")
    default = _compress(small, root / "default", words)
    return root / "art", root / "gguf", default


def _raw(art: Path, name: str) -> torch.Tensor:
    with safe_open(str(art / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


def test_typed_artifact_stores_blocks_and_unties(typed, small):
    art, _, default = typed
    m = read_manifest(art)
    q2, q4 = grids.get_grid("q2_k"), grids.get_grid("q4_k")
    assert m["tensors"] == {
        emb.EMBED: {"q_format": "q2_k", "dtype": None, "shape": list(SHAPE), "bytes": VOCAB * 84},
        emb.HEAD: {"q_format": "q4_k", "dtype": None, "shape": list(SHAPE), "bytes": VOCAB * 144},
    }
    assert m["untied"] is True and m["options"]["embed_type"] == "q2_k" and m["options"]["output_type"] == "q4_k"
    assert json.loads((art / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(str(art / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert {emb.EMBED + ".q", emb.HEAD + ".q"} <= names and not {emb.EMBED, emb.HEAD} & names

    # the loader's matrices are exactly the stored blocks, decoded; the head is a matrix of its own
    model, _ = load_artifact(art)
    embed_raw, head_raw = _raw(art, emb.EMBED + ".q"), _raw(art, emb.HEAD + ".q")
    assert torch.equal(model.model.embed_tokens.weight, q2.unpack(embed_raw, SHAPE))
    assert torch.equal(model.lm_head.weight, q4.unpack(head_raw, SHAPE))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()

    # the embedding is plain RTN of the source's (no importance); the head is not (its inputs weight it)
    W = open_source(str(small)).tensor(emb.EMBED)
    assert torch.equal(embed_raw, q2.quantize_rtn(W)[1])
    assert not torch.equal(head_raw, q4.quantize_rtn(W)[1])

    s, d = m["summary"], default["summary"]
    assert s["embed_bytes"] == VOCAB * 84 and s["output_bytes"] == VOCAB * 144
    assert d["embed_bytes"] == VOCAB * 256 * 4 and d["output_bytes"] == 0  # the source's float32, tied
    assert s["bpw"] == d["bpw"]  # the linears' bpw is unchanged
    assert s["stored_bytes"] == d["stored_bytes"] - VOCAB * 256 * 4 + VOCAB * (84 + 144)
    assert s["model_weights"] == d["model_weights"] + VOCAB * 256  # the untied head counts as weights of its own
    assert s["whole_bpw"] == pytest.approx(8 * s["stored_bytes"] / s["model_weights"])
    assert s["whole_bpw"] < d["whole_bpw"]


def test_head_is_rounded_with_its_input_importance(typed, small):
    """The head's RTN is weighted by mean(norm(h)²) over the calibration tokens of the final hidden states."""
    art, _, _ = typed
    (imp, direct), = IMPORTANCE
    assert imp.shape == (256,) and torch.allclose(imp, direct, rtol=1e-5)
    W = open_source(str(small)).tensor(emb.EMBED)  # tied source: the head is made from the embedding
    assert torch.equal(_raw(art, emb.HEAD + ".q"), grids.get_grid("q4_k").quantize_rtn(W, imp)[1])


def test_gguf_export_writes_native_types(typed, words, monkeypatch):
    art, exp, _ = typed
    _, base = read_gguf_index(exp / "model.gguf")
    for gname, name, qtype in (("token_embd.weight", emb.EMBED, "Q2_K"), ("output.weight", emb.HEAD, "Q4_K")):
        t = base[gname]
        assert gguf.GGMLQuantizationType(t.qtype).name == qtype and tuple(t.shape) == SHAPE
        assert np.array_equal(np.asarray(t.raw()).reshape(-1), _raw(art, name + ".q").numpy()), gname
    assert json.loads((exp / "export.json").read_text())["vocab_tensors"] == {"token_embd.weight": "q2_k",
                                                                           "output.weight": "q4_k"}

    # llama.cpp against the torch artifact, with the tolerance of test_export_gguf; its expected deviation rounds the
    # inputs of every quantized matmul to q8_K, the head's included
    model, _ = load_artifact(art)
    llama = open_llamacpp(exp, None, 128, "cpu")
    text = tokenize(artifact_tokenizer(art), words.read_text())
    windows = eval_windows(text, 128, 2)

    def forward(self, x):
        return F.linear(q8k_round(x), self.q, self.bias)

    refs = [torch_logits(model, w) for w in windows]
    with monkeypatch.context() as mp:
        mp.setattr(QLRLinear, "forward", forward)
        mp.setattr(model.lm_head, "forward", lambda x: F.linear(q8k_round(x), model.lm_head.weight))
        expected = max(deviation(torch_logits(model, w), r)["rms"] for w, r in zip(windows, refs, strict=True))
    for w, ref in zip(windows, refs, strict=True):
        dev = deviation(llama.logits(w), ref)
        assert dev["rms"] <= RMS_TOL and dev["rms"] <= 1.5 * expected + 0.002, (dev, expected)
        assert dev["max"] <= MAX_TOL and dev["argmax"] >= ARGMAX_MIN and dev["clear_flips"] == 0, dev
    llama.close()


def test_onnx_export_uses_the_decoded_matrices(typed, tmp_path):
    """ONNX holds the embedding and the untied head as floats decoded from the blocks: same logits as torch."""
    from lrdeploy.exporters.onnx import export_onnx
    from lrdeploy.runtime.onnxrt import open_onnxruntime

    art, _, _ = typed
    export_onnx(str(art), tmp_path / "onnx", exact=True)
    model, _ = load_artifact(art)
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    ref = torch_logits(model, ids)
    got = open_onnxruntime(tmp_path / "onnx", "cpu").logits(ids)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4  # test_export_onnx's REL


def test_equal_types_stay_tied(words, tmp_path):
    """A tied qwen2 with both in q4_0 stays tied: one tensor, in the artifact and in the GGUF."""
    from random_model import make_random_model

    src = make_random_model(tmp_path / "qwen2", arch="qwen2", layers=1, vocab=VOCAB, tie=True)
    m = _compress(src, tmp_path / "art", words, embed_type="q4_0", output_type="q4_0")
    assert set(m["tensors"]) == {emb.EMBED} and "untied" not in m and m["summary"]["output_bytes"] == 0
    assert m["tensors"][emb.EMBED]["q_format"] == "q4_0" and m["summary"]["embed_bytes"] == VOCAB * 256 // 32 * 18
    assert json.loads((tmp_path / "art" / "config.json").read_text())["tie_word_embeddings"] is True
    model, _ = load_artifact(tmp_path / "art")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    export_gguf(str(tmp_path / "art"), tmp_path / "gguf")
    _, base = read_gguf_index(tmp_path / "gguf" / "model.gguf")
    assert gguf.GGMLQuantizationType(base["token_embd.weight"].qtype).name == "Q4_0" and "output.weight" not in base


def test_format_errors_are_one_line(small, words, tmp_path, cli):
    from random_model import make_random_model

    code, _, err = cli("compress", small, "-o", tmp_path / "a", "--embed-type", "q5_k", "-q")
    assert code == 2 and err.startswith("error: unknown format 'q5_k' for --embed-type; choose one of source, f16, ")
    assert len(err.strip().splitlines()) == 1
    code, _, err = cli("compress", small, "-o", tmp_path / "a", "--output-type", "bf16", "-q")
    assert code == 2 and err.startswith("error: unknown format 'bf16' for --output-type; ")

    narrow = make_random_model(tmp_path / "narrow", hidden=192, ffn=384, layers=1, vocab=VOCAB)
    code, _, err = cli("compress", narrow, "-o", tmp_path / "b", "--calib", words, "--output-type", "q2_k",
                       "--method", "rtn", "--q-format", "q4_0", "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: lm_head.weight 1024x192: row length 192 is not a multiple of 256, so "
                          "--output-type q2_k does not fit")
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()


def test_smollm2_rows_do_not_fit_k_quants(tmp_path, cli):
    code, _, err = cli("compress", "smollm2", "-o", tmp_path / "a", "--embed-type", "q2_k", "-q")
    assert code == 2 and err.startswith("error: model.embed_tokens.weight 49152x576: row length 576 is not a "
                                        "multiple of 256, so --embed-type q2_k does not fit"), err


def test_gguf_source_keeps_its_blocks():
    """SmolLM2's token_embd is Q8_0 (tied, no output.weight): 'source' keeps those bytes as they are, and the
    calibration embedding dequantizes only the rows it needs, exactly."""
    src = open_source("smollm2")
    plan = emb.plan_vocab(None, None, src.config, src.has(emb.HEAD), (49152, 576))
    assert plan == emb.VocabPlan("source", None, emb.EMBED, False, (49152, 576))
    stored = emb.encode(src, emb.EMBED, plan.embed, plan.shape)
    assert stored.entry() == {"q_format": "q8_0", "dtype": None, "shape": [49152, 576],
                              "bytes": 49152 * 576 // 32 * 34}
    _, index = read_gguf_index(src.path)
    assert np.array_equal(stored.data.numpy().reshape(-1), np.asarray(index["token_embd.weight"].raw()).reshape(-1))
    ids = torch.tensor([[0, 5, 49151], [7, 7, 1000]])
    assert torch.equal(src.rows(emb.EMBED, ids), src.tensor(emb.EMBED)[ids])
    # a ggml type outside our grids (its linears are Q4_1) decodes through gguf-py, as a copied q6_k head would
    name = "model.layers.0.mlp.down_proj.weight"
    fmt, raw = src.native(name)
    assert fmt == "q4_1" and torch.equal(dequantize_blocks(fmt, raw, (576, 1536)), src.tensor(name))
    # a different head unties it: the head is the same Q8_0 embedding, stored once more
    assert emb.plan_vocab("q4_0", None, src.config, False, (49152, 576)) == emb.VocabPlan(
        "q4_0", "source", emb.EMBED, True, (49152, 576))


def test_manifest_tensors_table_is_validated(typed):
    art, _, _ = typed
    m = read_manifest(art)
    for bad in ({"q_format": "q9_z", "shape": [4, 4], "bytes": 1}, {"q_format": None, "shape": [4], "bytes": 1},
                {"q_format": "q2_k", "shape": [0, 4], "bytes": 1}, "x"):
        broken = {**m, "tensors": {emb.EMBED: bad}}
        with pytest.raises(LrdError, match=f"^x.json: bad entry for tensor {emb.EMBED}$"):
            validate_manifest(broken, "x.json")
    with pytest.raises(LrdError, match="^x.json: bad 'tensors' table$"):
        validate_manifest({**m, "tensors": []}, "x.json")


def test_artifact_without_tensors_table_loads(typed, tmp_path):
    """Artifacts from before the table: the embedding is a plain tensor, and they load as before."""
    import shutil

    art = tmp_path / "old"
    shutil.copytree(typed[0].parent / "default", art)
    m = json.loads((art / "lrdeploy.json").read_text())
    m.pop("tensors")
    (art / "lrdeploy.json").write_text(json.dumps(m))
    model, _ = load_artifact(art)
    with safe_open(str(art / "model.safetensors"), framework="pt") as f:
        assert torch.equal(model.model.embed_tokens.weight, f.get_tensor(emb.EMBED))
