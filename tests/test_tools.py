"""tools/common.py, the helpers every results tool shares: record names, resumable JSON records, report sections and
the `lrdeploy --json` runner."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("common", TOOLS / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slug_names_records(common):
    label = "caldera q2_k + r32 (q4_0)"
    assert common.slug(label) == "caldera-q2-k---r32--q4-0"
    assert common.slug(label, squeeze=True) == "caldera-q2-k-r32-q4-0"
    assert common.slug("--rotate residual+down") == "rotate-residual-down"


def test_cached_measures_once_and_resumes(common, tmp_path):
    calls = []

    def make():
        calls.append(1)
        return {"ppl": 12.5}

    path = tmp_path / "records" / "eval-x.json"
    assert common.cached(path, make, live=False) is None  # a report-only run measures nothing
    assert calls == [] and not path.exists()
    row = common.cached(path, make)
    assert row["ppl"] == 12.5 and row["seconds"] >= 0 and calls == [1]
    assert json.loads(path.read_text()) == row
    assert [p.name for p in path.parent.iterdir()] == ["eval-x.json"]  # no temporary file left behind
    assert common.cached(path, make) == row and common.cached(path, make, live=False) == row
    assert calls == [1]  # read back, never re-measured


def test_cached_keeps_nothing_from_a_failed_measurement(common, tmp_path):
    def fail():
        raise RuntimeError("interrupted")

    path = tmp_path / "eval-y.json"
    with pytest.raises(RuntimeError):
        common.cached(path, fail)
    assert list(tmp_path.iterdir()) == []


def test_update_section_rewrites_only_its_own(common, tmp_path):
    doc = tmp_path / "results.md"
    common.update_section("a", "first", doc)
    common.update_section("b", "second\n", doc)
    common.update_section("a", "first, again", doc)
    text = doc.read_text()
    assert text == ("# lrdeploy results\n\n<!-- BEGIN a -->\nfirst, again\n<!-- END a -->\n\n"
                    "<!-- BEGIN b -->\nsecond\n<!-- END b -->\n")
    assert not (tmp_path / "results.md.tmp").exists()


def test_run_json_reads_the_last_line_and_stops_on_failure(common, tiny_llama, tmp_path):
    out = tmp_path / "rtn"
    row = common.run_json(["compress", str(tiny_llama), "-o", str(out), "--method", "rtn", "--q-format", "q8_0",
                           "--rank", "0", "--device", "cpu", "--json"])  # progress lines first, the JSON last
    assert row["output"] == str(out) and row["bpw"] == 8.5
    with pytest.raises(SystemExit, match="failed: lrdeploy inspect /no/such/thing --json\nerror: no such file"):
        common.run_json(["inspect", "/no/such/thing", "--json"])
