"""Perplexity protocol, text sources and the eval command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lrdeploy.compressor.text import calibration_ids, eval_windows, load_text, parse_range
from lrdeploy.errors import LrdError
from lrdeploy.runtime.eval import paired_difference, perplexity


def test_perplexity_matches_hand_computation():
    vocab = 5
    windows = torch.tensor([[0, 1, 2], [3, 4, 0]])
    table = torch.randn(vocab, vocab)

    def logits_fn(ids):
        return table[ids]

    res = perplexity(logits_fn, windows)
    nll = 0.0
    for w in windows:
        for a, b in zip(w[:-1], w[1:], strict=False):
            nll -= torch.log_softmax(table[a], -1)[b].item()
    assert res.tokens == 4 and res.windows == 2 and res.ctx == 3
    assert res.ppl == pytest.approx(math.exp(nll / 4), rel=1e-6)
    per = [-sum(torch.log_softmax(table[a], -1)[b].item() for a, b in zip(w[:-1], w[1:], strict=True)) / 2
           for w in windows]
    assert res.window_nll == pytest.approx(per, rel=1e-6)


def test_paired_difference_is_mean_and_standard_error_of_window_differences():
    mean, se = paired_difference([2.0, 3.0, 5.0], [1.0, 1.0, 1.0])  # differences 1, 2, 4
    assert mean == pytest.approx(7 / 3)
    assert se == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2 / 3))
    assert paired_difference([1.0, 2.0], [1.0, 2.0]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="two equal lists"):
        paired_difference([1.0, 2.0], [1.0])


def test_windows_and_ranges(tmp_path):
    ids = torch.arange(10)
    assert eval_windows(ids, 4, None).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert eval_windows(ids, 4, 1).shape == (1, 4)
    with pytest.raises(LrdError, match="shorter than one window"):
        eval_windows(ids, 11, None)
    assert parse_range("0:0.5") == (0.0, 0.5) and parse_range(":") == (0.0, 1.0)
    with pytest.raises(LrdError):
        parse_range("0.7:0.2")
    f = tmp_path / "t.txt"
    f.write_text("".join(f"line {i}\n" for i in range(10)))
    first, second = load_text(str(f), "0:0.5"), load_text(str(f), "0.5:1")
    assert first + second == f.read_text() and "line 4" in first and "line 5" in second


def test_calibration_sample_is_seeded_and_disjoint():
    ids = torch.arange(1000)
    a = calibration_ids(ids, 300, 100, seed=1)
    b = calibration_ids(ids, 300, 100, seed=1)
    assert torch.equal(a, b) and a.shape == (3, 100)
    assert len(set(a.flatten().tolist())) == 300


def test_jsonl_and_default_text(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"text": "world"}) + "\n")
    assert load_text(str(f)) == "hello\n\nworld"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(LrdError, match="bad.jsonl:1"):
        load_text(str(bad))
    assert len(load_text(None)) > 100_000  # CPython's pydoc topics, on every machine


def test_eval_json_model_and_artifact(tiny_llama, calib_text, tmp_path, cli):
    code, stdout, err = cli("eval", tiny_llama, "--text", calib_text, "--ctx", "128", "--windows", "2", "--json")
    assert code == 0, err
    row = json.loads(stdout)
    assert row["windows"] == 2 and row["ctx"] == 128 and row["tokens"] == 2 * 127 and row["bpw"] is None
    assert row["ppl"] > 1000  # random weights: near-uniform over 49k tokens
    art = tmp_path / "a"
    code, _, err = cli("compress", tiny_llama, "-o", art, "--calib", calib_text, "--calib-tokens", "1024",
                       "--seq-len", "128", "--method", "ldlq", "--preset", "source", "-q")
    assert code == 0, err
    code, stdout, _ = cli("eval", art, "--text", calib_text, "--ctx", "128", "--windows", "2", "--json")
    assert code == 0 and json.loads(stdout)["bpw"] == pytest.approx(2.625)


def test_eval_text_too_short(tiny_llama, tmp_path, cli):
    f = tmp_path / "s.txt"
    f.write_text("a few words only")
    code, _, err = cli("eval", tiny_llama, "--text", f, "--ctx", "512")
    assert code != 0 and "shorter than one window" in err
