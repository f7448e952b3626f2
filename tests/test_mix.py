"""--mix-bpw: Q formats allocated from measured sensitivity to a whole-file size."""

from __future__ import annotations

import pytest
import torch

from lrdeploy.artifact import read_manifest
from lrdeploy.compressor import embeddings as emb
from lrdeploy.compressor import grids, mix
from lrdeploy.compressor.driver import CompressOptions, _vocab_bytes, compress
from lrdeploy.compressor.sources import open_source
from lrdeploy.errors import LrdError


def _sens(harms: dict[str, dict[str, float]]) -> dict[str, dict]:
    return {k: {"gain": 1.0, "harm": v} for k, v in harms.items()}


def test_allocate_takes_the_most_harm_per_byte_within_the_budget():
    shapes = {"a": (256, 256), "b": (256, 256), "c": (256, 512), "k": (256, 256)}
    start = {"a": "q2_k", "b": "q2_k", "c": "q2_k", "k": "q4_k"}
    sens = _sens({"a": {"q2_k": 10.0, "q3_k": 4.0, "q4_k": 1.0},
                  "b": {"q2_k": 3.0, "q3_k": 1.0, "q4_k": 0.5},
                  "c": {"q2_k": 13.0, "q3_k": 5.0, "q4_k": 2.0}})  # c: 8 removed for twice a's bytes (6)
    base = sum(mix.q_bytes(shapes[k], f) for k, f in start.items())
    up = mix.q_bytes((256, 256), "q3_k") - mix.q_bytes((256, 256), "q2_k")
    assert mix.allocate(start, shapes, sens, base) == start  # no room: nothing moves
    assert mix.allocate(start, shapes, sens, base + up)["a"] == "q3_k"  # a's step pays most per byte
    two = mix.allocate(start, shapes, sens, base + 2 * up)
    assert two["a"] == "q3_k" and two["c"] == "q2_k"  # c's step (2 up) is worth 4 per up, a's next 3, b's 2
    everything = mix.allocate(start, shapes, sens, 1e12)
    assert set(everything.values()) == {"q4_k"}
    with pytest.raises(LrdError, match="at their starting formats, over the budget"):
        mix.allocate(start, shapes, sens, base - 1)


@pytest.mark.parametrize(("args", "message"), [
    (dict(q_format="q4_0", mix_bpw=3.0), "--q-format must be q2_k or q3_k, not q4_0"),
    (dict(method="lowrank", mix_bpw=3.0), "method lowrank has no Q"),
    (dict(method="caldera", target_bpw=3.0, mix_bpw=3.0), "exclude each other"),
    (dict(mix_bpw=0.0), "--mix-bpw must be positive"),
])
def test_bad_mix_options(args, message):
    with pytest.raises(LrdError, match=message):
        CompressOptions(**args).resolved()


def test_mix_bpw_cli_error_is_one_line(cli, tmp_path):
    code, _, err = cli("compress", "smollm2", "-o", tmp_path / "a", "--mix-bpw", "3", "--q-format", "iq2_xs", "-q")
    assert code == 2 and err.count("\n") == 1 and "--mix-bpw moves linears up" in err, err
    assert not (tmp_path / "a").exists()


def test_unreachable_mix_fails_before_any_file(tiny_qwen2, calib_text, cli, tmp_path):
    out = tmp_path / "art"
    code, _, err = cli("compress", tiny_qwen2, "-o", out, "--method", "rtn", "--calib", calib_text, "--mix-bpw", "1",
                       "-q")
    assert code == 2 and err.count("\n") == 1 and "--mix-bpw 1.0 is below the smallest file" in err, err
    assert not out.exists() and not (tmp_path / "art.partial").exists()


def _opts(calib: str, bpw: float) -> CompressOptions:
    """The vocabulary as stored (rounding a 49k-row table would take most of the test's time), k_proj held at q4_k:
    a linear the mix may not move."""
    return CompressOptions(method="rtn", calib=calib, calib_range="0:0.05", calib_tokens=512, seq_len=128,
                           device="cpu", mix_bpw=bpw, preset="source", tensor_types={"k_proj": "q4_k"})


def test_vocab_bytes_are_the_grid_bytes():
    """The budget counts a rounded embedding or head at exactly the bytes its blocks take."""
    table = torch.randn(512, 256)
    for fmt in ("q2_k", "q4_k", "q8_0"):
        raw = emb.quantize_rows(grids.get_grid(fmt), [table])
        assert _vocab_bytes(None, fmt, emb.EMBED, (512, 256)) == raw.numel()
    assert _vocab_bytes(None, "f16", emb.EMBED, (512, 256)) == 512 * 256 * 2  # (the fixture's runs check source)


@pytest.fixture(scope="module")
def mixed(tiny_qwen2, calib_text, tmp_path_factory):
    """Mixes of a random qwen2 (hidden 256, biases) with room for everything (all q4_k), and at a third and two
    thirds of the way there from the all-q2_k size. The vocabulary dominates so small a model, so the targets are
    placed from the first run's record: {name: (target bpw, artifact)}."""
    root = tmp_path_factory.mktemp("mix")
    src = open_source(str(tiny_qwen2))
    compress(src, _opts(calib_text, 100.0), root / "top")
    top = read_manifest(root / "top")["mix"]
    shapes = {k: tuple(v["shape"]) for k, v in read_manifest(root / "top")["linears"].items()}
    span = sum(mix.q_bytes(shapes[k], "q4_k") - mix.q_bytes(shapes[k], "q2_k") for k in top["sensitivity"])
    runs = {"top": (100.0, root / "top")}
    for name, f in (("low", 1 / 3), ("high", 2 / 3)):
        bpw = 8 * (top["predicted_bytes"] - (1 - f) * span) / top["model_weights"]
        compress(src, _opts(calib_text, bpw), root / name)
        runs[name] = (bpw, root / name)
    return runs


def test_mix_meets_its_size_and_predicts_the_bytes(mixed):
    for bpw, art in mixed.values():
        m = read_manifest(art)
        s, plan = m["summary"], m["mix"]
        assert plan["predicted_bytes"] == s["stored_bytes"]  # the budget counts every byte the artifact stores
        assert plan["model_weights"] == s["model_weights"]
        assert s["whole_bpw"] <= bpw
        assert {k: v["q_format"] for k, v in m["linears"].items()} == plan["formats"]
    top, low, high = (read_manifest(mixed[k][1])["mix"] for k in ("top", "low", "high"))
    assert set(top["counts"]) == {"q4_k"} and not any("k_proj" in k for k in top["sensitivity"])
    assert 0 < len(low["moved"]) < len(top["moved"]) == len(top["sensitivity"])
    assert low["predicted_harm"] > high["predicted_harm"] > top["predicted_harm"]


def test_down_proj_gain_is_one(mixed):
    """down_proj writes the residual stream directly, so all of its output error reaches the block's output."""
    sens = read_manifest(mixed["low"][1])["mix"]["sensitivity"]
    downs = [v["gain"] for k, v in sens.items() if k.endswith("down_proj")]
    assert downs and all(g == pytest.approx(1.0, rel=1e-3) for g in downs)
    assert all(v["harm"]["q2_k"] > v["harm"]["q3_k"] > v["harm"]["q4_k"] > 0 for v in sens.values())


def test_mix_resumes_byte_identical(tiny_qwen2, calib_text, mixed, tmp_path):
    bpw, art = mixed["low"]
    src = open_source(str(tiny_qwen2))
    with pytest.raises(KeyboardInterrupt):
        compress(src, _opts(calib_text, bpw), tmp_path / "part", stop_after=1)
    compress(src, _opts(calib_text, bpw), tmp_path / "part", resume=True)
    assert (tmp_path / "part" / "model.safetensors").read_bytes() == (art / "model.safetensors").read_bytes()


def test_inspect_says_what_the_mix_did(mixed, cli):
    bpw, art = mixed["low"]
    m = read_manifest(art)["mix"]
    code, out, err = cli("inspect", art)
    assert code == 0, err
    assert f"note: sensitivity mix for {bpw} bpw:" in out and f"({len(m['moved'])} linears moved up;" in out
