"""`lrdeploy bench` on a tiny random model: report structure, KV growth, the context search, impossible budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lrdeploy.errors import LrdError
from lrdeploy.runtime.backends import open_backend
from lrdeploy.runtime.bench import BenchOptions, parse_bytes, parse_ctx
from lrdeploy.runtime.bench_report import write_report
from lrdeploy.runtime.ctxsearch import bracket_max_ctx
from lrdeploy.runtime.onnxrt import open_onnxruntime

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_exports(tiny_llama, tmp_path_factory, calib_text):
    """The tiny model compressed (rtn, fast) and exported to GGUF and ONNX."""
    from lrdeploy.compressor.driver import CompressOptions, compress
    from lrdeploy.compressor.sources import open_source
    from lrdeploy.exporters.gguf import export_gguf
    from lrdeploy.exporters.onnx import export_onnx

    root = tmp_path_factory.mktemp("bench")
    art = root / "artifact"
    compress(open_source(str(tiny_llama)), CompressOptions(method="rtn", calib=calib_text, calib_tokens=256,
                                                           seq_len=64, device="cpu"), art)
    export_gguf(str(art), root / "gguf")
    export_onnx(str(art), root / "onnx", exact=True)
    return {"artifact": art, "gguf": root / "gguf", "onnx": root / "onnx", "root": root}


@pytest.fixture(scope="module")
def report(tiny_llama, tiny_exports, tmp_path_factory):
    """One real bench run: GGUF and ONNX targets, the tiny model as baseline, a budget, a report directory."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("report")
    cache = tiny_exports["root"] / "baselines"
    code = (
        "import sys, json; from pathlib import Path; "
        "from lrdeploy.runtime.bench import BenchOptions, bench, resolve_targets; "
        "from lrdeploy.runtime.bench_report import write_report; "
        f"o = BenchOptions(ctx=[32, 96], gen_tokens=4, runs=1, memory_budget={1 << 30}, threads=1, "
        f"cache=Path({str(cache)!r})); "
        f"r = bench(resolve_targets([{str(tiny_exports['gguf'])!r}, {str(tiny_exports['onnx'])!r}], 'auto'), "
        f"{str(tiny_llama)!r}, o); write_report(r, Path({str(out)!r}), 'lrdeploy bench ...')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_report_files_and_fields(report):
    data = json.loads((report / "report.json").read_text())
    assert data["ctx"] == [32, 96] and data["runs"] == 1 and data["memory_budget"] == 1 << 30
    by_role = {(m["backend"], m["role"]) for m in data["models"]}
    assert by_role == {("llamacpp", "target"), ("llamacpp", "baseline"), ("onnxruntime", "target"),
                       ("onnxruntime", "baseline")}
    for m in data["models"]:
        assert m["bytes"] > 0 and m["load_s"] > 0 and m["rss_after_load"] > 0 and m["kv_per_token"] > 0
        assert [row["ctx"] for row in m["ctx"]] == [32, 96]
        for row in m["ctx"]:
            assert row["prefill_tps"] > 0 and row["decode_tps"] > 0 and row["peak"] >= m["rss_after_load"] * 0.5
        mc = m["max_ctx"]
        assert mc["tokens"] > 0 and mc["checks"]
        for c in mc["checks"]:  # every length tried above the answer was over budget; every one below it fit
            over = "peak" not in c or c["peak"] > data["memory_budget"]
            assert over == (c["tokens"] > mc["tokens"]), (m["label"], mc)
        assert mc["tokens"] == m["max_positions"] or mc["limited_by"] == "memory"
        if m["role"] == "baseline":
            assert m["vs_baseline"]["bytes"] == 1.0 and m["vs_baseline"]["decode_tps"] == [1.0, 1.0]
    target = next(m for m in data["models"] if m["backend"] == "llamacpp" and m["role"] == "target")
    base = next(m for m in data["models"] if m["backend"] == "llamacpp" and m["role"] == "baseline")
    assert target["bytes"] < base["bytes"] and target["vs_baseline"]["bytes"] < 1  # 2.6-bit Q against F16
    md = (report / "report.md").read_text()
    for heading in ("## Size, memory and context", "## Throughput and peak memory by context",
                    "## How the maximum context was found"):
        assert heading in md
    from lrdeploy.runtime.llamacpp import amx_in_build

    assert data["machine"]["llama_cpp_amx"] is amx_in_build()  # llama.cpp rows say when they ran without repacking
    assert ("plain CPU buffers, without repacking" in md) is amx_in_build()
    for png in ("throughput-vs-ctx.png", "memory-vs-ctx.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in md


@pytest.mark.parametrize("kind", ["artifact", "gguf", "onnx"])
def test_every_backend_speaks_the_stream_protocol(kind, tiny_exports):
    """The one factory bench and eval share opens each backend with every member of the protocol, and each
    one runs it: logits for every position, a cache sized by reset, a prefill, greedy decoding, the KV it holds."""
    from lrdeploy.runtime.stream import Stream

    b = open_backend(str(tiny_exports[kind]), "auto", "cpu", n_ctx=None, threads=1)
    assert isinstance(b, Stream), type(b)
    elem = 2 if kind == "gguf" else 4  # llama.cpp keeps an f16 cache; torch and this fp32 ONNX export float32
    assert b.kv_per_token == 2 * 2 * 2 * 64 * elem and b.max_positions and b.bpw
    ids = list(range(10, 50))
    logits = b.logits(torch.tensor(ids))
    assert logits.shape[0] == len(ids) and logits.shape[1] >= len(b.tokenizer) and torch.isfinite(logits).all()
    b.reset(64)
    b.prefill(ids)
    b.decode(3)
    b.sync()
    assert b.kv_bytes(43) >= 43 * b.kv_per_token  # onnxruntime's cache is allocated for reset's 64 up front
    b.close()


@pytest.mark.parametrize("runner_kind", ["torch", "onnxruntime"])
def test_kv_bytes_grow_linearly_with_ctx(runner_kind, tiny_exports):
    """The cache really held (tensor bytes) is kv_per_token × tokens at every length."""
    runner = (open_backend(str(tiny_exports["artifact"]), "torch", "cpu") if runner_kind == "torch"
              else open_onnxruntime(tiny_exports["onnx"], "cpu", threads=1))
    sizes = []
    for n in (7, 40, 129, 600):
        runner.reset(n)
        runner.prefill(list(range(10, 10 + n)))
        sizes.append(runner.kv_bytes(n))
        assert sizes[-1] == runner.kv_per_token * n
    runner.close()
    assert runner.kv_per_token == 2 * 2 * 2 * 64 * 4  # K and V, 2 layers, 2 KV heads, head_dim 64, float32


def test_context_search_agrees_with_the_analytic_answer(tiny_exports):
    """Over real prefills (weights + the cache actually held), the search lands within 1% below
    (budget − weights) / kv_per_token, in a few runs, and never past it."""
    runner = open_backend(str(tiny_exports["artifact"]), "torch", "cpu")
    weights = sum(b.numel() * b.element_size() for b in runner.model.buffers()) + sum(
        p.numel() * p.element_size() for p in runner.model.parameters())
    budget = weights + 1000 * runner.kv_per_token + runner.kv_per_token // 2

    def peak_at(n: int) -> float:
        runner.reset(n)
        runner.prefill([5] * n)
        return weights + runner.kv_bytes(n)

    found, runs = bracket_max_ctx(peak_at, [(32, peak_at(32))], budget, runner.kv_per_token, None)
    assert 990 <= found <= 1000 and len(runs) <= 4  # the line through real peaks is nearly exact here
    assert all((p <= budget) == (n <= found) for n, p in runs)


def test_context_search_goes_past_a_first_fit(tiny_exports):
    """A guess that fits with room to spare is not the answer: the search climbs until it brackets the budget.

    The peak is the weights plus the cache really held plus a workspace that stops growing after 512 tokens (the
    prefill chunk), so the slope of two short timed runs overstates the cost of a long context, as in real runs.
    """
    runner = open_backend(str(tiny_exports["artifact"]), "torch", "cpu")
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv = runner.kv_per_token
    budget = weights + 3000 * kv + 64 * kv

    def peak_at(n: int) -> float:
        runner.reset(n)
        runner.prefill([5] * n)
        return weights + runner.kv_bytes(n) + 64 * kv * min(n, 512) / 512

    known = [(64, peak_at(64)), (256, peak_at(256))]  # slope 1.25 kv per token: a first guess far too short
    tokens, runs = bracket_max_ctx(peak_at, known, budget, kv, None)
    assert runs[0][0] < 2900 and runs[0][1] <= budget  # the first guess fit ...
    assert 2970 <= tokens <= 3000 and len(runs) <= 8  # ... and the answer lies within 1% of the true 3000
    assert all((p <= budget) == (n <= tokens) for n, p in runs)
    capped, _ = bracket_max_ctx(peak_at, known, budget, kv, 1024)
    assert capped == 1024  # the model's own context ends first
    none, tried = bracket_max_ctx(peak_at, [(64, budget * 2)], budget, kv, None)
    assert none == 0 and not tried  # the line through the only peak says nothing fits: no run is wasted


def test_impossible_budget_is_a_clear_error(cli, tiny_llama, tiny_exports):
    code, out, err = cli("bench", str(tiny_exports["onnx"]), "--baseline", str(tiny_llama), "--ctx", "16",
                         "--gen-tokens", "2", "--runs", "1", "--memory-budget", "1MiB", "--threads", "1", "-q")
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--memory-budget 1 MiB is too small" in lines[0], err
    assert "Traceback" not in err


def test_parsers():
    assert parse_bytes("4GiB") == 4 << 30 and parse_bytes("512 MiB") == 512 << 20 and parse_bytes("2GB") == 2 * 10**9
    assert parse_ctx("2048,512,512") == [512, 2048]
    for bad in ("lots", "-1GiB", "4XB"):
        with pytest.raises(LrdError, match="cannot read the size"):
            parse_bytes(bad)
    with pytest.raises(LrdError, match="--ctx"):
        parse_ctx("512,abc")


def test_unrunnable_target_is_a_clear_error(cli, tiny_llama, tmp_path):
    code, _, err = cli("bench", str(tmp_path), "--baseline", str(tiny_llama), "-q")
    assert code == 2 and "is not an artifact, a GGUF export or an ONNX export" in err


def test_baseline_cache_honours_lrdeploy_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LRDEPLOY_CACHE", str(tmp_path / "cache"))
    assert BenchOptions().cache == tmp_path / "cache" / "bench-baselines"
    monkeypatch.delenv("LRDEPLOY_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert BenchOptions().cache == tmp_path / "home" / ".cache" / "lrdeploy" / "bench-baselines"


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def test_report_records_no_absolute_paths(monkeypatch, tmp_path):
    """A result whose paths are absolute, under the working directory and under the cache, is written with paths
    relative to the working directory, '<cache>/…', and the exported baselines named by source and form."""
    result = json.loads((REPO / "docs" / "bench" / "report.json").read_text())  # a real report's shape and numbers
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("LRDEPLOY_CACHE", str(cache))
    for m in result["models"]:
        baseline = m["role"] == "baseline"
        folder = cache / "bench-baselines" / f"key-{m['backend']}" if baseline else work / "out" / m["label"]
        m["path"] = str(folder)
        m["files"] = [str(folder / Path(f).name) for f in m["files"]]
    result["ppl"]["text"] = str(work / "data" / "text.txt")
    command = f"lrdeploy bench {work / 'out' / 'a'} --baseline smollm2 --ppl-text {work / 'data' / 'text.txt'}"
    write_report(result, work / "report", command)

    data = json.loads((work / "report" / "report.json").read_text())
    md = (work / "report" / "report.md").read_text()
    assert not [s for s in _strings(data) if s.startswith("/") or str(tmp_path) in s]
    assert str(tmp_path) not in md
    models = {m["label"]: m for m in data["models"]}
    assert models["uncompressed (llamacpp)"]["path"] == "smollm2 (F16 GGUF, cached)"
    assert models["uncompressed (onnxruntime)"]["path"] == "smollm2 (fp32 ONNX, cached)"
    assert models["uncompressed (llamacpp)"]["files"] == ["<cache>/bench-baselines/key-llamacpp/model.gguf"]
    assert models["smollm2-gguf"]["path"] == "out/smollm2-gguf"
    assert models["smollm2-gguf"]["files"] == ["out/smollm2-gguf/model.gguf", "out/smollm2-gguf/adapter.gguf"]
    assert data["ppl"]["text"] == "data/text.txt"
    assert "Command: `lrdeploy bench out/a --baseline smollm2 --ppl-text data/text.txt`" in md
    assert result["models"][0]["path"].startswith(str(cache))  # the result itself (bench --json) is left as it is
    numbers = {k: v for k, v in result.items() if k not in ("models", "ppl")}
    assert {k: v for k, v in data.items() if k not in ("models", "ppl")} == numbers
