"""--preset: the whole-file mix a compress run resolves to, and what it stores."""

from __future__ import annotations

import pytest

from lrdeploy.artifact import read_manifest
from lrdeploy.compressor import embeddings as emb
from lrdeploy.compressor import recipe
from lrdeploy.compressor.driver import CompressOptions


@pytest.mark.parametrize(("preset", "q_format", "hidden", "name"), [
    ("auto", "q2_k", 1536, "q2"), ("auto", "q3_k", 1536, "q3"), ("auto", "q4_k", 1536, "source"),
    ("auto", "q2_k", 576, "source"),  # SmolLM2's rows hold no 256-weight super-block
    ("q2", "q3_k", 576, "q2"),  # a named preset is taken as named (its grids are checked against the rows later)
])
def test_preset_resolves_by_backbone_and_width(preset, q_format, hidden, name):
    assert recipe.resolve(preset, q_format, hidden)[0] == name


def test_explicit_formats_win_over_the_preset():
    o = CompressOptions(q_format="q2_k", embed_type="source", tensor_types={"v_proj": "q3_k"}).resolved()
    applied = recipe.apply(o, 1536)
    assert applied.preset == "q2" and applied.embed_type is None and applied.output_type == "q4_k"
    assert applied.tensor_types == {"k_proj": "q4_k", "v_proj": "q3_k"}
    assert recipe.apply(CompressOptions(method="lowrank").resolved(), 1536).tensor_types == {}  # no Q, no bumps


def test_default_compress_of_a_wide_model_takes_the_q2_mix(tiny_qwen2, calib_text, cli, tmp_path):
    """hidden 256: the default run stores a q2_k embedding, a q4_k head of its own and q4_k k/v_proj."""
    out = tmp_path / "art"
    code, _, err = cli("compress", tiny_qwen2, "-o", out, "--method", "rtn", "--calib", calib_text,
                       "--calib-tokens", "512", "--seq-len", "128", "-q")
    assert code == 0, err
    m = read_manifest(out)
    assert m["options"]["preset"] == "q2" and m["untied"] is True
    assert {k: v["q_format"] for k, v in m["tensors"].items()} == {emb.EMBED: "q2_k", emb.HEAD: "q4_k"}
    types = {k.split(".")[-1]: v["q_format"] for k, v in m["linears"].items()}
    assert types == {"q_proj": "q2_k", "k_proj": "q4_k", "v_proj": "q4_k", "o_proj": "q2_k", "gate_proj": "q2_k",
                     "up_proj": "q2_k", "down_proj": "q2_k"}

    src = tmp_path / "src"
    code, _, err = cli("compress", tiny_qwen2, "-o", src, "--method", "rtn", "--calib", calib_text,
                       "--calib-tokens", "512", "--seq-len", "128", "--preset", "source", "-q")
    assert code == 0, err
    s = read_manifest(src)
    assert "preset" not in s["options"] and s["tensors"][emb.EMBED]["q_format"] is None and not s.get("untied")
    assert m["summary"]["whole_bpw"] < s["summary"]["whole_bpw"] / 2  # the vocabulary dominates this tiny model


def test_unknown_preset_is_one_line(cli, tmp_path):
    code, _, err = cli("compress", "smollm2", "-o", tmp_path / "a", "--preset", "q1", "-q")
    assert code == 2 and err == "error: unknown --preset 'q1'; choose one of auto, source, q2, q3\n", err
