"""`lrdeploy bench`: memory, maximum context and throughput of compressed models against the uncompressed one.

Every measurement runs in a fresh child process (`python -m lrdeploy.runtime.bench_worker SPEC_JSON`), so load time,
resident memory and peaks belong to one model alone. Targets and baseline alternate (A B A B) across runs, and each
child warms up before it times. Prefill goes in chunks of 512 tokens on every backend (llama.cpp's default batch),
so its workspace does not grow with the prompt, and only the last position's logits are computed where the backend
allows it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lrdeploy.errors import LrdError
from lrdeploy.files import ONNX_MODEL
from lrdeploy.io import cache_root
from lrdeploy.runtime.ctxsearch import bracket_max_ctx

MIB = 1 << 20


# ----------------------------------------------------------------------------------------------------------- models


@dataclass
class BenchModel:
    """One thing to measure: PATH opened on BACKEND."""

    label: str
    path: str
    backend: str
    role: str  # "target" or "baseline"


def resolve_targets(paths: list[str], backend: str) -> list[BenchModel]:
    from lrdeploy.runtime.backends import check_backend, detect_backend

    check_backend(backend)

    models = []
    for path in paths:
        if not Path(path).exists():
            raise LrdError(f"no such target: {path}")
        found = detect_backend(path, files=False) or ("llamacpp" if path.endswith(".gguf") else None)
        if found is None:
            raise LrdError(f"{path} is not an artifact, a GGUF export or an ONNX export")
        if backend != "auto" and backend != found:
            raise LrdError(f"{path} runs on {found}, not on --backend {backend}")
        models.append(BenchModel(_label(path, models), path, found, "target"))
    return models


def _label(path: str, taken: list[BenchModel]) -> str:
    p = Path(path).resolve()
    label = p.name if p.is_dir() else p.stem
    names = {m.label for m in taken}
    return label if label not in names else f"{p.parent.name}/{label}"


BASELINE_FORMS = {"llamacpp": "F16 GGUF", "onnxruntime": "fp32 ONNX"}  # what a baseline is exported to, per backend


def baseline_cache() -> Path:
    """Where exported baselines are kept: bench-baselines in the lrdeploy cache ($LRDEPLOY_CACHE)."""
    return cache_root() / "bench-baselines"


def baseline_for(source: str, backend: str, cache: Path) -> BenchModel:
    """The uncompressed SOURCE on BACKEND: used as it is where it runs there, else exported once into CACHE.

    llama.cpp gets an F16 GGUF (what llama.cpp users run unquantized), onnxruntime an fp32 graph (fp16 on CPU is
    slower than fp32 in onnxruntime), torch the model itself in float32.
    """
    from lrdeploy.runtime.backends import detect_backend

    own = detect_backend(source, files=False)
    if own == backend or (own is None and backend == "torch"):
        return BenchModel(f"uncompressed ({backend})", source, backend, "baseline")
    if own is not None:
        raise LrdError(f"the baseline {source} runs on {own}; give a model source (e.g. smollm2) to compare on "
                       f"{backend}")
    from lrdeploy.compressor.sources import open_source

    src = open_source(source)  # fails clearly on a bad source before anything is exported
    key = f"{Path(src.path).stem}-{src.digest()[:12]}"
    if backend == "llamacpp":
        from lrdeploy.exporters.gguf import export_gguf

        out = cache / f"{key}-gguf-f16"
        if not (out / "export.json").is_file():
            export_gguf(source, out, dtype="f16", force=True)
    else:
        from lrdeploy.exporters.onnx import META_VERSION, export_onnx

        out = cache / f"{key}-onnx-fp32"
        meta = out / "lrdeploy_onnx.json"
        if not meta.is_file() or json.loads(meta.read_text()).get("version") != META_VERSION:  # this exporter's graph
            export_onnx(source, out, exact=True, force=True)
    return BenchModel(f"uncompressed ({backend})", str(out), backend, "baseline")


def file_bpw(m: BenchModel, run: dict) -> float | None:
    """bpw over the linears as the target's files store them. An ONNX export's own record is its artifact's bpw
    (q2_k counted at 2.625 though the graph holds 4-bit codes), so it is read from the graph, here in the parent:
    parsing the protobuf in a measured child would add to its load time and memory."""
    if m.backend != "onnxruntime":
        return run["bpw"]
    from lrdeploy.runtime.inspect import onnx_linear_bpw, onnx_tensors

    model = Path(m.path) / ONNX_MODEL if Path(m.path).is_dir() else Path(m.path)
    return onnx_linear_bpw(onnx_tensors(model)) or run["bpw"]


def model_files(m: BenchModel) -> list[Path]:
    """The files that hold M's weights (what a user copies to a device)."""
    p = Path(m.path)
    if m.backend == "llamacpp":
        from lrdeploy.runtime.llamacpp import resolve

        model, adapter, _ = resolve(p, None)
        return [model] + ([adapter] if adapter else [])
    if m.backend == "onnxruntime":
        return sorted(f for f in p.iterdir() if f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data"))
    if p.is_dir():
        return sorted(p.glob("*.safetensors")) + sorted(p.glob("*.gguf"))
    from lrdeploy.compressor.sources import open_source

    path = Path(open_source(m.path).path)
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------- the pure parts


def parse_bytes(text: str) -> int:
    """'4GiB', '512MiB', '2GB', '1000000' → bytes."""
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
             "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "tb": 1000**4}
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise LrdError(f"cannot read the size '{text}'; write e.g. 4GiB, 512MiB or 2GB") from None
    if unit not in units or value <= 0:
        raise LrdError(f"cannot read the size '{text}'; write e.g. 4GiB, 512MiB or 2GB")
    return int(value * units[unit])


def parse_ctx(text: str) -> list[int]:
    try:
        ctxs = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise LrdError(f"--ctx expects comma-separated token counts, got '{text}'") from None
    if not ctxs or ctxs[0] < 1:
        raise LrdError(f"--ctx expects positive token counts, got '{text}'")
    return ctxs


# ------------------------------------------------------------------------------------------------- the driver


@dataclass
class BenchOptions:
    ctx: list[int] = field(default_factory=lambda: [512, 2048])
    gen_tokens: int = 32
    memory_budget: int | None = None
    runs: int = 3
    device: str = "auto"
    threads: int | None = None
    text: str | None = None
    ppl_text: str | None = None
    ppl_range: str | None = None
    ppl_ctx: int = 512
    ppl_windows: int = 8
    cache: Path = field(default_factory=baseline_cache)


def run_child(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter; its failure becomes one clear line."""
    cmd = [sys.executable, "-m", "lrdeploy.runtime.bench_worker", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {res.returncode}"
        if res.returncode < 0:
            why = f"killed by signal {-res.returncode} (out of memory?)"
        raise ChildFailed(f"{spec['path']} ({spec['backend']}, {spec['mode']}): {why}")
    return json.loads(res.stdout.strip().splitlines()[-1])


class ChildFailed(LrdError):
    pass


def _median_rows(runs: list[dict]) -> list[dict]:
    out = []
    for i, row in enumerate(runs[0]["ctx"]):
        vals = [r["ctx"][i] for r in runs]
        out.append({"ctx": row["ctx"], "kv_bytes": row["kv_bytes"],
                    **{k: statistics.median(v[k] for v in vals) for k in ("prefill_tps", "decode_tps", "peak")}})
    return out


def bench(targets: list[BenchModel], baseline: str, opts: BenchOptions,
          progress: Callable[[str], None] | None = None, total: Callable[[int], None] | None = None) -> dict:
    """Measure TARGETS and the uncompressed BASELINE on each target's backend; returns the report as a dict."""
    if opts.runs < 1:
        raise LrdError("--runs must be at least 1")
    if opts.gen_tokens < 1:
        raise LrdError("--gen-tokens must be at least 1")
    backends = list(dict.fromkeys(t.backend for t in targets))
    baselines = {b: baseline_for(baseline, b, opts.cache) for b in backends}
    order = [m for b in backends for m in (baselines[b], *[t for t in targets if t.backend == b])]
    n_children = len(order) * (opts.runs + (1 if opts.ppl_text else 0)) + (len(order) if opts.memory_budget else 0)
    if total:
        total(n_children)
    step = progress or (lambda _d: None)

    def spec(m: BenchModel, mode: str, **kw: Any) -> dict:
        return {"path": m.path, "backend": m.backend, "device": opts.device, "threads": opts.threads, "mode": mode,
                "text": opts.text, "gen": opts.gen_tokens, **kw}

    results: dict[str, dict] = {m.label: {**asdict(m), "runs": []} for m in order}
    for m in order:
        files = model_files(m)
        results[m.label]["files"] = [str(f) for f in files]
        results[m.label]["bytes"] = sum(f.stat().st_size for f in files)
    if opts.ppl_text:
        for m in order:
            r = run_child(spec(m, "ppl", text=opts.ppl_text, text_range=opts.ppl_range, ppl_ctx=opts.ppl_ctx,
                               ppl_windows=opts.ppl_windows))
            results[m.label]["ppl"] = r["ppl"]
            results[m.label]["window_nll"] = r["window_nll"]  # per window, for paired comparisons
            step(f"perplexity {m.label}")
    for i in range(opts.runs):  # A B A B: every round measures every model once
        for m in order:
            results[m.label]["runs"].append(run_child(spec(m, "run", ctx=opts.ctx)))
            step(f"run {i + 1}/{opts.runs} {m.label}")
    for m in order:
        r = results[m.label]
        first = r["runs"][0]
        r.update(kv_per_token=first["kv_per_token"], max_positions=first["max_positions"], bpw=file_bpw(m, first),
                 load_s=statistics.median(x["load_s"] for x in r["runs"]),
                 rss_after_load=statistics.median(x["rss_after_load"] for x in r["runs"]),
                 ctx=_median_rows(r["runs"]))
    if opts.memory_budget:
        for m in order:
            results[m.label]["max_ctx"] = max_context(m, results[m.label], opts, spec, step)
        if all(results[m.label]["max_ctx"]["tokens"] == 0 for m in order):
            need = min(results[m.label]["max_ctx"]["fixed"] for m in order)
            raise LrdError(f"--memory-budget {opts.memory_budget / MIB:.0f} MiB is too small for any model here "
                           f"(the smallest needs {need / MIB:.0f} MiB before any context); raise it")
    for m in order:
        add_ratios(results[m.label], results[baselines[m.backend].label])
    ppl = {"text": opts.ppl_text, "range": opts.ppl_range, "ctx": opts.ppl_ctx, "windows": opts.ppl_windows}
    return {"ctx": opts.ctx, "gen_tokens": opts.gen_tokens, "runs": opts.runs, "device": opts.device,
            "memory_budget": opts.memory_budget, "baseline": baseline, "machine": machine(),
            "ppl": ppl if opts.ppl_text else None, "models": list(results.values())}


def max_context(m: BenchModel, r: dict, opts: BenchOptions, spec, step) -> dict:
    """The longest context whose whole peak stays in --memory-budget, found by real runs (bracket_max_ctx).

    The first guess extends the timed runs' peaks along the KV cache's slope (or steeper, where the peaks rose
    faster); each run holds n tokens and reports its peak, and the bracket closes from both sides.
    """
    budget, kv = opts.memory_budget, r["kv_per_token"]
    last = r["ctx"][-1]
    fixed = last["peak"] - kv * (last["ctx"] + opts.gen_tokens)
    known = [(c["ctx"] + opts.gen_tokens, c["peak"]) for c in r["ctx"]]
    errors: dict[int, str] = {}

    def peak_at(n: int) -> float | None:
        try:
            return run_child(spec(m, "check", tokens=n))["peak"]
        except ChildFailed as e:
            errors[n] = str(e)
            return None

    tokens, runs = bracket_max_ctx(peak_at, known, budget, kv, r["max_positions"])
    step(f"max context {m.label}")
    checks = [{"tokens": n, "error": errors[n]} if peak is None else {"tokens": n, "peak": peak} for n, peak in runs]
    limited = "model" if r["max_positions"] and tokens == r["max_positions"] else "memory"
    return {"budget": budget, "fixed": fixed, "per_token": kv, "checks": checks, "tokens": tokens,
            "limited_by": limited, "checked": any("peak" in c and c["peak"] <= budget for c in checks)}


def add_ratios(r: dict, base: dict) -> None:
    """Ratios against the uncompressed model on the same backend (>1 = more than the baseline)."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if not a or not b else a / b

    r["vs_baseline"] = {
        "bytes": ratio(r["bytes"], base["bytes"]),
        "rss_after_load": ratio(r["rss_after_load"], base["rss_after_load"]),
        "peak": [ratio(a["peak"], b["peak"]) for a, b in zip(r["ctx"], base["ctx"], strict=True)],
        "prefill_tps": [ratio(a["prefill_tps"], b["prefill_tps"]) for a, b in zip(r["ctx"], base["ctx"], strict=True)],
        "decode_tps": [ratio(a["decode_tps"], b["decode_tps"]) for a, b in zip(r["ctx"], base["ctx"], strict=True)],
        "max_ctx": ratio(r.get("max_ctx", {}).get("tokens"), base.get("max_ctx", {}).get("tokens")),
        "ppl": ratio(r.get("ppl"), base.get("ppl")),
    }


def machine() -> dict:
    import platform

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    for pkg in ("onnxruntime", "llama_cpp"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            pass
    if "llama_cpp" in info:
        from lrdeploy.runtime.llamacpp import amx_in_build

        info["llama_cpp_amx"] = amx_in_build()  # then llama.cpp rows ran on plain CPU buffers, no repacking
    info["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return info

