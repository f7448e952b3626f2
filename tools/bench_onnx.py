"""CPU benchmark of the ONNX exports of SmolLM2: prefill and decode tokens/s, split Q + L·R against fp32.

Variants, timed side by side (interleaved) in one process, medians of --runs runs after a warm-up:
  * compressed, zero points "auto" (the default): integer zero points only, so every MatMulNBits weight is
    prepacked by MLAS; the affine q2_k/q4_k blocks split off their offsets into BlockSum(x)·offsetsᵀ;
  * compressed, zero points "float": DESIGN.md's first mapping (q2_k as bits 2 with float zero points, float zero
    points on q4_0 too), the most compact, which makes onnxruntime dequantize every weight on every call;
  * compressed, integer zero points with accuracy_level 4: onnxruntime quantizes the activations to int8 inside
    MatMulNBits (its fast CPU kernels; no longer exact, so its perplexity is reported);
  * the uncompressed model exported in fp32 with plain MatMuls (the baseline).
Perplexity of each: WikiText-2 validation second half, ctx 256, the first --ppl-windows windows.
Peak memory (RSS high-water mark, as the OS reports it) comes from one short child process per variant.

    python tools/bench_onnx.py [--artifact DIR] [--work DIR] [--prompt 128] [--decode 64] [--runs 5] [--threads 2]
                               [--ppl-windows 4] [--genai-python VENV/bin/python]

Without --artifact it compresses SmolLM2 once with the test suite's cheap settings (caldera, q2_k, target gguf,
2048 calibration tokens, 1 iteration) into --work and reuses it afterwards. Writes the "onnx" section of
docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lrdeploy.io import cache_root

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO / "tools" / "data" / "wikitext2-valid.txt"
PROMPTS = ("The history of the city", "In mathematics, a prime number", "She opened the door and")


def ensure_artifact(work: Path) -> Path:
    """The SmolLM2 artifact the tests use (cheap CALDERA defaults), compressed once and cached in WORK."""
    from lrdeploy.artifact import is_artifact
    from lrdeploy.compressor.driver import CompressOptions, compress
    from lrdeploy.compressor.sources import open_source

    out = work / "smol-artifact"
    if not is_artifact(out):
        calib = str(WIKITEXT)
        opts = CompressOptions(calib=calib, calib_range="0:0.5", calib_tokens=2048, seq_len=256, iters=1,
                               lplr_iters=1, device="cpu")
        print(f"compressing SmolLM2 into {out} ...", flush=True)
        compress(open_source("smollm2"), opts, out, force=True)
    return out


def ensure_exports(artifact: Path, work: Path) -> dict[str, Path]:
    from lrdeploy.exporters.onnx import export_onnx

    variants = {
        "Q + L·R, integer zero points": (str(artifact), work / "onnx-auto", "auto", 0),
        "Q + L·R, float zero points": (str(artifact), work / "onnx-float", "float", 0),
        "Q + L·R, integer zp, int8 activations": (str(artifact), work / "onnx-int8", "auto", 4),
        "uncompressed fp32": ("smollm2", work / "onnx-fp32", "auto", 0),
    }
    out = {}
    for name, (source, path, zp, level) in variants.items():
        print(f"exporting {name} -> {path}", flush=True)
        export_onnx(source, path, dtype="fp32", force=True, zero_points=zp, accuracy_level=level)
        out[name] = path
    return out


def _prompt(tokenizer, n: int) -> np.ndarray:
    from lrdeploy.compressor.text import load_text, tokenize

    text = load_text(str(WIKITEXT), "0.5:1")
    return np.asarray(tokenize(tokenizer, text)[:n], np.int64)


def ppl(m, windows: int) -> float:
    """Perplexity on the first WINDOWS ctx-256 windows of the WikiText-2 validation second half."""
    from lrdeploy.compressor.text import eval_windows, load_text, tokenize
    from lrdeploy.runtime.eval import perplexity

    text = load_text(str(WIKITEXT), "0.5:1")
    return perplexity(m.logits, eval_windows(tokenize(m.tokenizer, text), 256, windows)).ppl


def time_once(m, ids: np.ndarray, n_decode: int) -> tuple[float, float]:
    """(prefill seconds for IDS from an empty cache, seconds for N_DECODE single-token steps after it)."""
    t0 = time.perf_counter()
    logits, cache = m.step(ids, 0, m.empty_cache())
    t1 = time.perf_counter()
    start, tok = len(ids), int(np.argmax(logits[-1]))
    for _ in range(n_decode):
        logits, cache = m.step(np.array([tok], np.int64), start, cache)
        start += 1
        tok = int(np.argmax(logits[-1]))
    return t1 - t0, time.perf_counter() - t1


RSS_SCRIPT = """
import resource, sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions()
so.intra_op_num_threads = int(sys.argv[2])
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
past = [i for i in s.get_inputs() if i.name.startswith("past_key_values.")]
n, decode = int(sys.argv[3]), int(sys.argv[4])
cache = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past}
names = [o.name for o in s.get_outputs()]
ids = np.arange(100, 100 + n, dtype=np.int64)[None]
for step in range(decode + 1):
    t = ids.shape[1]
    start = n + step - 1 if step else 0
    feed = {"input_ids": ids, "attention_mask": np.ones((1, start + t), np.int64),
            "position_ids": np.arange(start, start + t, dtype=np.int64)[None], **cache}
    out = dict(zip(names, s.run(names, feed)))
    cache = {k: out[k.replace("past_key_values", "present")] for k in cache}
    ids = np.array([[int(out["logits"][0, -1].argmax())]], np.int64)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")]  # ru_maxrss survives exec
print(int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def child_rss(path: Path, prompt: int, decode: int, threads: int) -> float:
    """Peak RSS (MiB) of a fresh process (onnxruntime and numpy only) that prefills PROMPT tokens, decodes DECODE."""
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path / "model.onnx"), str(threads), str(prompt),
                        str(decode)], capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


GENAI_SCRIPT = """
import json, sys
import onnxruntime_genai as og
model = og.Model(sys.argv[1])
params = og.GeneratorParams(model)
ids = json.loads(sys.argv[2])
params.set_search_options(max_length=len(ids) + int(sys.argv[3]), do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens(ids)
out = []
while not gen.is_done():
    gen.generate_next_token()
    out.append(int(gen.get_next_tokens()[0]))
print(json.dumps({"genai": og.__version__, "new_ids": out}))
"""


def genai_check(python: str, path: Path, m, prompts: list[str], n_new: int) -> str:
    """Greedy tokens from onnxruntime-genai (its own interpreter: it pins the CPU onnxruntime) vs ours."""
    import torch

    lines = []
    for prompt in prompts:
        ids = list(m.tokenizer(prompt)["input_ids"])
        r = subprocess.run([python, "-c", GENAI_SCRIPT, str(path), json.dumps(ids), str(n_new)],
                           capture_output=True, text=True)
        if r.returncode:
            return f"onnxruntime-genai could not run {path}: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
        got = json.loads(r.stdout.strip().splitlines()[-1])
        ours = m.generate(torch.tensor(ids), n_new)
        lines.append(f"{prompt!r}: {'same' if got['new_ids'] == ours else 'DIFFERENT'} {n_new} tokens")
    return f"onnxruntime-genai {got['genai']} loads the export and its greedy output vs lrdeploy's: " + "; ".join(lines)


def run(args: argparse.Namespace) -> str:
    from lrdeploy.runtime.onnxrt import open_onnxruntime

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    artifact = Path(args.artifact) if args.artifact else ensure_artifact(work)
    paths = ensure_exports(artifact, work)
    models = {}
    for name, path in paths.items():
        t0 = time.perf_counter()
        models[name] = open_onnxruntime(path, "cpu", threads=args.threads)
        models[name].load_s = time.perf_counter() - t0
    ids = _prompt(next(iter(models.values())).tokenizer, args.prompt)
    for m in models.values():  # warm-up
        time_once(m, ids, 4)
    pre: dict[str, list[float]] = {k: [] for k in models}
    dec: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.runs):
        for name, m in models.items():
            p, d = time_once(m, ids, args.decode)
            pre[name].append(len(ids) / p)
            dec[name].append(args.decode / d)
    base = "uncompressed fp32"
    rows = []
    for name, path in paths.items():
        meta = json.loads((path / "lrdeploy_onnx.json").read_text())
        rss = child_rss(path, args.prompt, 8, args.threads)
        p, d = statistics.median(pre[name]), statistics.median(dec[name])
        rows.append((name, meta, p, d, rss, models[name].load_s, ppl(models[name], args.ppl_windows)))
    ref_p = next(r[2] for r in rows if r[0] == base)
    ref_d = next(r[3] for r in rows if r[0] == base)
    man = json.loads((artifact / "lrdeploy.json").read_text())
    o = man["options"]
    lines = [
        "## ONNX Runtime (CPU EP): SmolLM2-135M, split Q + L·R vs fp32",
        "",
        f"`python tools/bench_onnx.py --artifact ART --prompt {args.prompt} --decode {args.decode} --runs {args.runs} "
        f"--threads {args.threads} --ppl-windows {args.ppl_windows}`, ART = {man['method']} {o['q_format']} rank "
        f"{o['rank']} L/R {o['lr_format']}, target {o['target']}, {man['calibration']['tokens']} calibration tokens "
        f"(bpw {man['summary']['bpw']:.3f}; {man['summary']['fallbacks']} of {man['summary']['linears']} linears fell "
        f"back from {o['q_format']}). onnxruntime {_ort_version()}, {args.threads} intra-op threads, "
        f"{platform.machine()}, a {_cores()}-core machine shared with other jobs.",
        "",
        f"Prefill: one {len(ids)}-token prompt from an empty cache; decode: {args.decode} single-token steps with the "
        f"KV cache after it. Medians of {args.runs} interleaved runs after a warm-up; ratios against the fp32 export "
        "in the same run. Peak RSS: VmHWM of a fresh process (onnxruntime + numpy) that loads the model, prefills "
        f"and decodes 8 tokens. ppl: WikiText-2 validation second half, {args.ppl_windows} windows of 256 tokens.",
        "",
        "| variant | model bytes | ppl | prefill tok/s | × fp32 | decode tok/s | × fp32 | peak RSS MiB | load s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, meta, p, d, rss, load, pp in rows:
        lines.append(f"| {name} | {meta['model_bytes'] / 1e6:.1f} MB | {pp:.3f} | {p:.0f} | {p / ref_p:.2f} | "
                     f"{d:.1f} | {d / ref_d:.2f} | {rss:.0f} | {load:.1f} |")
    lines += [
        "",
        "Each compressed linear is `MatMulNBits(Q) + MatMul(MatMul(x, Rᵀ), Lᵀ)` (q/k/v and gate/up fused into one "
        "wider linear each); L and R are fp32 MatMuls. Integer zero points: q4_0 uses the op's default zero point 8 "
        "(ggml's own), q2_k is stored as 4-bit codes + 8 with its offsets subtracted as BlockSum(x)·offsetsᵀ; "
        "onnxruntime prepacks all of them. Float zero points: q2_k as 2-bit codes with zp = offset/scale, q4_0 with "
        "zp 8.0; onnxruntime's CPU kernel takes no prepacked path with float zero points and dequantizes each "
        "weight on every call.",
    ]
    if args.genai_python:
        name = "Q + L·R, integer zero points"
        lines += ["", genai_check(args.genai_python, paths[name], models[name], list(PROMPTS), 32) + "."]
    return "\n".join(lines)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default=None, help="SmolLM2 artifact to export (default: compress one into --work)")
    p.add_argument("--work", default=str(cache_root() / "bench_onnx"), help="where the artifact and exports are "
                   "kept (default: bench_onnx in the lrdeploy cache, $LRDEPLOY_CACHE)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--genai-python", default=None, help="a Python with onnxruntime-genai installed (kept apart: it "
                   "pins the CPU onnxruntime); checks that genai loads the export and generates the same tokens")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/results.md alone")
    args = p.parse_args()
    if args.runs < 3:
        p.error("--runs must be at least 3 (medians of >= 3 runs)")
    text = run(args)
    print(text)
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from report_sections import update_section

        update_section("onnx", text)


if __name__ == "__main__":
    main()
