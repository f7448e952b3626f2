"""lrdeploy's ONNX exports against onnxruntime-genai's model builder, in one `lrdeploy bench` run per model.

    python tools/bench_onnx.py [--model smollm2|qwen2.5-coder-1.5b] [--work DIR] [--ctx 256,1024] [--runs 3]
                               [--threads 2] [--ppl-windows N] [--budget 512MiB|none] [--no-write] [--only-report]

What it does, each step cached in --work (the lrdeploy cache's bench_onnx, one folder per model besides SmolLM2)
so a rerun only measures:

1. compresses the model with the calibration of the peers section (first half of the WikiText-2 validation text),
   with the embedding and the head in q4_0 (one tensor where the model ties them) so the files come out at the
   builder's size. SmolLM2:
   `--method rtn --q-format q4_0` and `--method caldera --q-format q2_k --rank 32 --lr-format q4_0 --fallback q4_0`
   (SmolLM2's 576-wide linears hold no q2_k super-block; their fallback is q4_0, which ONNX runs at 4 bits).
   Qwen2.5-Coder-1.5B: `--method ldlq --q-format q4_0 --calib-tokens 8192` (a 2-bit backbone costs 4-bit bytes or
   more in ONNX, so the file at the builder's size is a 4-bit one);
2. exports each with the default fused graph, as `lrdeploy export --format onnx` builds it for the CPU EP (int8
   activations) and with `--exact` (float activations; SmolLM2's rtn artifact also as the plain graph);
3. writes the model as an HF directory and runs the builder on it:
   `python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu` (onnx-ir, which the builder imports, is
   installed into --work, not into the venv);
4. runs `lrdeploy bench` over all of them with the fp32 export as the baseline: load memory, prefill and decode
   at each --ctx, the longest context in --budget, and perplexity on the second half of the text (--ppl-windows
   windows of 512 tokens);
5. measures what the onnxruntime session alone holds after load in a fresh process (onnxruntime and numpy only, no
   tokenizer, no torch), and checks that onnxruntime-genai loads our fused export and generates lrdeploy's greedy
   tokens;
6. writes the model's section of docs/results.md ("onnx", "onnx-qwen15"), with the bench's report and plots in
   docs/bench-onnx/ (docs/bench-onnx-qwen15/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common import WIKITEXT, run_json, slug, update_section

from lrdeploy.exporters.onnx import META_VERSION
from lrdeploy.io import cache_root
from lrdeploy.runtime.eval import paired_difference

REPO = Path(__file__).resolve().parents[1]
CALIB = ["--calib", str(WIKITEXT), "--calib-range", "0:0.5", "--target", "gguf", "--embed-type", "q4_0",
         "--output-type", "q4_0"]


@dataclass(frozen=True)
class Setup:
    """One model's comparison: what to compress and export, where it is cached and reported, and its defaults."""

    title: str
    section: str  # of docs/results.md
    report: Path  # the bench's report and plots
    work: str  # folder under --work ("" for SmolLM2, whose cache predates the others)
    artifacts: dict[str, list[str]]
    exports: list[tuple[str, str, list[str]]]  # (label, artifact, export flags); [0] the default, [1] --exact
    ppl_windows: int
    budget: str  # "none": no context search
    note: str  # what "ours" is, for the report
    vocab: str  # how our export and the builder's hold the embedding and the head


SETUPS = {
    "smollm2": Setup(
        "SmolLM2-135M", "onnx", REPO / "docs" / "bench-onnx", "",
        {"rtn q4_0": ["--method", "rtn", "--q-format", "q4_0"],
         "caldera q2_k + r32 q4_0": ["--method", "caldera", "--q-format", "q2_k", "--rank", "32", "--lr-format",
                                     "q4_0", "--fallback", "q4_0"]},  # iq4_nl, the GGUF default, is 8-bit in ONNX
        [("lrdeploy rtn q4_0, fused (default)", "rtn q4_0", []),
         ("lrdeploy rtn q4_0, fused, --exact", "rtn q4_0", ["--exact"]),
         ("lrdeploy rtn q4_0, plain graph", "rtn q4_0", ["--graph", "plain"]),
         ("lrdeploy caldera q2_k + r32 q4_0, fused (default)", "caldera q2_k + r32 q4_0", []),
         ("lrdeploy caldera q2_k + r32 q4_0, fused, --exact", "caldera q2_k + r32 q4_0", ["--exact"])],
        40, "512MiB", "SmolLM2 compressed",
        "the embedding (= the tied head) in q4_0: GatherBlockQuantized for the lookup and MatMulNBits for the head "
        "over the same blocks; the builder holds its tied embedding the same way, in int4"),
    "qwen2.5-coder-1.5b": Setup(
        "Qwen2.5-Coder-1.5B", "onnx-qwen15", REPO / "docs" / "bench-onnx-qwen15", "qwen15",
        {"ldlq q4_0": ["--method", "ldlq", "--q-format", "q4_0", "--calib-tokens", "8192"]},
        [("lrdeploy ldlq q4_0, fused (default)", "ldlq q4_0", []),
         ("lrdeploy ldlq q4_0, fused, --exact", "ldlq q4_0", ["--exact"])],
        16, "none", "Qwen2.5-Coder-1.5B compressed by `--method ldlq --q-format q4_0 --calib-tokens 8192`",
        "the embedding and the head in q4_0 (the source stores its head apart, so both files do): GatherBlockQuantized "
        "and MatMulNBits; the builder keeps the embedding as a float32 Gather (933 MB) and the head as int4 "
        "MatMulNBits"),
}
BUILDER = "onnxruntime-genai builder int4"
PROMPTS = ("The history of the city", "In mathematics, a prime number", "She opened the door and")


def artifact(work: Path, model: str, label: str) -> Path:
    out = work / "art" / slug(label)
    if not (out / "lrdeploy.json").is_file():
        print(f"compressing {label} ...", flush=True)
        again = "--resume" if out.with_name(out.name + ".partial").is_dir() else "--force"
        run_json(["compress", model, "-o", str(out), *CALIB, *SETUPS[model].artifacts[label], again, "--json"])
    return out


def export(work: Path, label: str, art: Path, flags: list[str]) -> Path:
    out = work / "onnx" / slug(label)
    meta = out / "lrdeploy_onnx.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("version") != META_VERSION:  # made by this exporter
        run_json(["export", str(art), "--format", "onnx", "-o", str(out), *flags, "--force", "--json"])
    return out


def builder(work: Path, model: str) -> Path:
    """The builder's int4 CPU export of MODEL, from an HF directory of the source's (decoded, float32) weights."""
    out = work / "onnx" / slug(BUILDER)
    if (out / "genai_config.json").is_file():
        return out
    hf = work / f"{model}-hf"
    if not (hf / "config.json").is_file():
        from lrdeploy.compressor.model import load_full
        from lrdeploy.compressor.sources import open_source

        print(f"writing {model} as an HF directory ...", flush=True)
        src = open_source(model)
        load_full(src.config, src.tensor).save_pretrained(str(hf), safe_serialization=True)
        src.tokenizer().save_pretrained(str(hf))
    pylib = work / "pylib"
    if not (pylib / "onnx_ir").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(pylib), "onnx-ir"],
                       check=True)
    env = {**os.environ, "PYTHONPATH": str(pylib)}
    print("running onnxruntime-genai's builder ...", flush=True)
    r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache")], env=env, capture_output=True,
                       text=True)
    if r.returncode:
        raise SystemExit(f"the builder failed: {r.stderr.strip()[-1500:]}")
    return out


SESSION_RSS = """
import sys, onnxruntime as ort
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
before = rss()
so = ort.SessionOptions()
so.intra_op_num_threads = int(sys.argv[2])
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
print(rss() - before)
"""


def session_rss(path: Path, threads: int) -> int:
    """Bytes an onnxruntime session of PATH adds to a fresh process's RSS (median of 3 processes)."""
    runs = [int(subprocess.run([sys.executable, "-c", SESSION_RSS, str(path / "model.onnx"), str(threads)],
                               capture_output=True, text=True, check=True).stdout.split()[-1]) for _ in range(3)]
    return sorted(runs)[1]


GENAI = """
import json, sys
import onnxruntime_genai as og
model = og.Model(sys.argv[1])
out = {}
for prompt, ids in json.loads(sys.argv[2]).items():
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 32, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    new = []
    while not gen.is_done():
        gen.generate_next_token()
        new.append(int(gen.get_next_tokens()[0]))
    out[prompt] = new
print(json.dumps({"genai": og.__version__, "new": out}))
"""


def genai_check(path: Path) -> str:
    import torch

    from lrdeploy.runtime.onnxrt import open_onnxruntime

    m = open_onnxruntime(path, "cpu")
    ids = {p: list(m.tokenizer(p)["input_ids"]) for p in PROMPTS}
    r = subprocess.run([sys.executable, "-c", GENAI, str(path), json.dumps(ids)], capture_output=True, text=True)
    if r.returncode:
        return f"onnxruntime-genai could not run {path.name}: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    got = json.loads(r.stdout.strip().splitlines()[-1])
    same = [p for p in PROMPTS if got["new"][p] == m.generate(torch.tensor(ids[p]), 32)]
    return (f"onnxruntime-genai {got['genai']} loads the fused export and generates lrdeploy's greedy tokens for "
            f"{len(same)} of {len(PROMPTS)} prompts (32 new tokens each)")


def _mb(n: float | None) -> str:
    return "–" if n is None else f"{n / 1e6:.1f}"


def report(bench: dict, labels: dict[str, str], a: argparse.Namespace, genai: str, sessions: dict[str, int]) -> str:
    setup = SETUPS[a.model]
    ctxs = bench["ctx"]
    models = bench["models"]
    base = next(m for m in models if m["role"] == "baseline")
    peer = next(m for m in models if m["path"] == labels[BUILDER])
    name = {v: k for k, v in labels.items()}
    mach = bench["machine"]
    budget = a.budget != "none"
    model_flag = "" if a.model == "smollm2" else f" --model {a.model}"
    lines = [
        f"## ONNX Runtime (CPU EP): lrdeploy's exports against onnxruntime-genai's builder ({setup.title})",
        "",
        f"`python tools/bench_onnx.py{model_flag} --ctx {a.ctx} --runs {a.runs} --threads {a.threads} --ppl-windows "
        f"{a.ppl_windows} --budget {a.budget}` (one `lrdeploy bench` run over every row; its report and plots are in "
        f"{setup.report.relative_to(REPO)}/). onnxruntime {mach['onnxruntime']}, {a.threads} threads, {mach['cpu']}, "
        f"{mach['cores']} cores, load average {mach['load_average']:.1f} at the end.",
        "",
        f"- Ours: {setup.note} on the first half of the WikiText-2 validation text, exported with the default fused "
        "graph (GroupQueryAttention with one shared KV buffer per layer, SkipSimplifiedLayerNormalization, RoPE inside "
        "the attention, L and R as q4_0 MatMulNBits, and `logits_to_keep`, so prefill runs the head for its last "
        f"position only). Vocabulary: {setup.vocab}. \"default\" is what `lrdeploy export --format onnx` builds "
        "on a machine without a GPU (`--ep cpu`): MatMulNBits quantizes its activations to int8 (accuracy_level 4, "
        "as the builder uses); `--exact` keeps them in float32, and the export reproduces the artifact's logits. "
        "The plain-graph row is built with the default too.",
        "- The builder: `python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p int4 -e cpu` on the same "
        "source weights written as an HF directory: symmetric int4 RTN in blocks of 32 with accuracy_level 4. Its "
        "graph computes every position's logits in prefill.",
        f"- The baseline: `lrdeploy export {a.model} --format onnx` (fp32, fused graph).",
        f"- ppl: `lrdeploy bench`'s, second half of the same text, {a.ppl_windows} windows of 512 tokens. load MiB: "
        "`lrdeploy bench`'s RSS growth from opening the model (the onnxruntime session and the tokenizer); session "
        "MiB: what the onnxruntime session alone adds to a fresh process (onnxruntime and numpy only); × file: over "
        "the file bytes." + (" Longest context: the most tokens whose peak (what the model adds to the process, as "
                             f"the bench counts memory) stays in {a.budget}, found by real runs." if budget else "")
        + f" Speeds are medians of {a.runs} runs; × builder compares decode with its row.",
        "",
        "| export | file MB | ppl | load MiB | session MiB | × file | " + " | ".join(
            f"prefill {c} tok/s | decode {c} tok/s | × builder" for c in ctxs)
        + (f" | ctx in {a.budget} |" if budget else " |"),
        "|---|---:|---:|---:|---:|---:|" + "---:|---:|---:|" * len(ctxs) + ("---:|" if budget else ""),
    ]
    for m in models:
        label = "uncompressed fp32 (lrdeploy export)" if m is base else name.get(m["path"], m["label"])
        cells = []
        for i, c in enumerate(m["ctx"]):
            ratio = c["decode_tps"] / peer["ctx"][i]["decode_tps"]
            cells += [f"{c['prefill_tps']:.0f}", f"{c['decode_tps']:.1f}", f"{ratio:.2f}"]
        ppl = m.get("ppl", {}).get("ppl") if isinstance(m.get("ppl"), dict) else m.get("ppl")
        max_ctx = (m.get("max_ctx") or {}).get("tokens")
        sess = sessions.get(m["path"])
        sess_cells = "– | –" if sess is None else f"{sess / 2**20:.0f} | {sess / m['bytes']:.2f}"
        lines.append(f"| {label} | {_mb(m['bytes'])} | {'–' if ppl is None else f'{ppl:.2f}'} | "
                     f"{m['rss_after_load'] / 2**20:.0f} | {sess_cells} | " + " | ".join(cells)
                     + (f" | {'–' if max_ctx is None else f'{max_ctx:,}'} |" if budget else " |"))
    lines += ["", genai + ".", "", *goals(models, base, peer, labels, sessions, a)]
    return "\n".join(lines) + "\n"


def goals(models: list[dict], base: dict, peer: dict, labels: dict[str, str], sessions: dict[str, int],
          a: argparse.Namespace) -> list[str]:
    """The goals, each met or not with its number, for the first two exports (the default and --exact, the ones at
    the builder's size)."""
    exports = SETUPS[a.model].exports
    by = {m["path"]: m for m in models}
    default, exact = by[labels[exports[0][0]]], by[labels[exports[1][0]]]

    def ppl(m: dict) -> float:
        return m["ppl"]["ppl"] if isinstance(m.get("ppl"), dict) else m["ppl"]

    def ratio(m: dict, key: str, ref: dict) -> str:
        return ", ".join(f"{c[key] / r[key]:.2f}× at {c['ctx']}" for c, r in zip(m["ctx"], ref["ctx"], strict=True))

    def tokens(m: dict) -> int:
        return (m.get("max_ctx") or {}).get("tokens") or 0

    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    def at_least(m: dict, ref: dict, key: str, factor: float) -> bool:
        return all(c[key] >= factor * r[key] for c, r in zip(m["ctx"], ref["ctx"], strict=True))

    sess = sessions[default["path"]] / default["bytes"]
    cost = 100 * (ppl(default) / ppl(exact) - 1)
    diff, se = paired_difference(default["window_nll"], exact["window_nll"])
    noise = "within" if abs(diff) <= 2 * se else "beyond"
    out = [
        f"**The goals** ({exports[0][0].removeprefix('lrdeploy ')}; the builder's row is the reference):",
        f"- size and quality: {mark(default['bytes'] <= peer['bytes'] and ppl(default) < ppl(peer))}: "
        f"{default['bytes'] / 1e6:.1f} MB against {peer['bytes'] / 1e6:.1f} MB, ppl {ppl(default):.2f} against "
        f"{ppl(peer):.2f} ({100 * (ppl(default) / ppl(peer) - 1):+.1f}%); int8 activations change perplexity by "
        f"{cost:+.2f}% against `--exact` ({ppl(exact):.2f}): a paired NLL difference of {diff:+.4f} ± {se:.4f} over "
        f"{len(exact['window_nll'])} windows, {noise} two standard errors;",
        f"- decode ≥ the builder's: {mark(at_least(default, peer, 'decode_tps', 1))} with the default export "
        f"({ratio(default, 'decode_tps', peer)}); with `--exact` {ratio(exact, 'decode_tps', peer)};",
        f"- decode ≥ 2× lrdeploy's fp32 export: {mark(at_least(default, base, 'decode_tps', 2))} "
        f"({ratio(default, 'decode_tps', base)});",
        f"- prefill ≥ 0.9× the builder's: {mark(at_least(default, peer, 'prefill_tps', 0.9))} "
        f"({ratio(default, 'prefill_tps', peer)});",
        f"- memory after load ≤ 1.3× the file: {mark(sess <= 1.3)} for the session alone ({sess:.2f}×; the builder's "
        f"{sessions[peer['path']] / peer['bytes']:.2f}×; `--exact` {sessions[exact['path']] / exact['bytes']:.2f}×); "
        f"with the tokenizer, as `lrdeploy bench` counts it, {default['rss_after_load'] / default['bytes']:.2f}× "
        f"(the builder's {peer['rss_after_load'] / peer['bytes']:.2f}×). With int8 activations, on x86 onnxruntime's "
        "kernel packs each MatMulNBits' codes with their float32 block scales and block sums (24 bytes per 32 "
        "weights, the file's 20), and keeps the scales initializer too (its PrePack copies the scales but reports "
        "them unpacked)" + (";" if a.budget != "none" else "."),
    ]
    if a.budget != "none":
        out.append(f"- longest context in {a.budget} ≥ the builder's: {mark(tokens(default) >= tokens(peer))} "
                   f"({tokens(default):,} against {tokens(peer):,} tokens; with `--exact` {tokens(exact):,}).")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", choices=list(SETUPS))
    p.add_argument("--work", default=str(cache_root() / "bench_onnx"))
    p.add_argument("--ctx", default="256,1024")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-windows", type=int, default=None, help="default: 40 (SmolLM2), 16 (the 1.5B)")
    p.add_argument("--budget", default=None, help="memory budget for the longest context, or none "
                                                  "(default: 512MiB for SmolLM2, none for the 1.5B)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/results.md alone")
    p.add_argument("--only-report", action="store_true", help="rewrite the section from the last run's bench.json")
    a = p.parse_args()
    setup = SETUPS[a.model]
    a.ppl_windows = a.ppl_windows or setup.ppl_windows
    a.budget = a.budget or setup.budget
    work = Path(a.work) / setup.work
    work.mkdir(parents=True, exist_ok=True)
    arts = {label: artifact(work, a.model, label) for label in setup.artifacts}
    labels = {label: str(export(work, label, arts[art], flags)) for label, art, flags in setup.exports}
    labels[BUILDER] = str(builder(work, a.model))
    genai = genai_check(Path(labels[setup.exports[0][0]]))
    if a.only_report:
        bench = json.loads((work / "bench.json").read_text())
    else:
        print("benchmarking ...", flush=True)
        budget = [] if a.budget == "none" else ["--memory-budget", a.budget]
        bench = run_json(["bench", *labels.values(), "--baseline", a.model, "--backend", "onnxruntime", "--ctx",
                          a.ctx, "--runs", str(a.runs), "--threads", str(a.threads), *budget,
                          "--ppl-text", str(WIKITEXT), "--ppl-range", "0.5:1", "--ppl-windows", str(a.ppl_windows),
                          "--report", str(setup.report), "--json", "-q"])
        (work / "bench.json").write_text(json.dumps(bench, indent=1))
    sessions = {m["path"]: session_rss(Path(m["path"]), a.threads) for m in bench["models"]}
    text = report(bench, labels, a, genai, sessions)
    print(text)
    if not a.no_write:
        update_section(setup.section, text)


if __name__ == "__main__":
    main()
