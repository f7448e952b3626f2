"""The fallback format for rows that hold no 256-weight super-block, chosen from numbers: iq4_nl against q4_0 on
SmolLM2 (576-wide rows), the "Fallback format" section of docs/results.md.

    .venv/bin/python tools/fallback_results.py

Both formats take 4.5 bits per weight (an fp16 scale and 32 4-bit codes per block); q4_0's 16 levels are uniform,
iq4_nl's are llama.cpp's non-uniform ones. Every linear of SmolLM2 is compressed in each format (`--q-format` itself,
`--target gguf`), with rtn and ldlq, calibrated on the first half of the WikiText-2 validation text, and scored on
the second half by `lrdeploy eval` (torch, ctx 512, 40 windows), beside the uncompressed model. Each point is cached
under .cache/results/fallback/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import WIKITEXT, cached, run_json, update_section

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".cache" / "results" / "fallback"
CALIB = ["--calib", str(WIKITEXT), "--calib-range", "0:0.5"]
EVAL = ["--text", str(WIKITEXT), "--text-range", "0.5:1", "--ctx", "512", "--windows", "40"]
POINTS = [(m, f) for m in ("rtn", "ldlq") for f in ("q4_0", "iq4_nl")]


def point(method: str, fmt: str) -> dict:
    art = WORK / f"{method}-{fmt}"
    comp = cached(WORK / f"compress-{method}-{fmt}.json", lambda: run_json(
        ["compress", "smollm2", "-o", str(art), "--method", method, "--q-format", fmt, "--preset", "source",
         "--target", "gguf", *CALIB, "--device", "cpu", "--force", "-q", "--json"]))
    ev = cached(WORK / f"eval-{method}-{fmt}.json", lambda: run_json(["eval", str(art), *EVAL, "-q", "--json"]))
    return {"method": method, "format": fmt, "bpw": comp["bpw"], "ppl": ev["ppl"]}


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    base = cached(WORK / "eval-uncompressed.json", lambda: run_json(["eval", "smollm2", *EVAL, "-q", "--json"]))["ppl"]
    rows = [point(m, f) for m, f in POINTS]
    lines = [
        "## Fallback format: iq4_nl against q4_0 (SmolLM2)",
        "",
        "Regenerate: `.venv/bin/python tools/fallback_results.py` (ran on this machine, 2 CPU cores).",
        "",
        "Where a tensor's rows hold no 256-weight super-block (SmolLM2's 576-wide rows), `--target gguf` puts it on a "
        "32-weight format instead. q4_0 and iq4_nl cost the same 4.5 bits per weight; iq4_nl's 16 levels are "
        "non-uniform. Here every linear takes the format itself (`--q-format`, `--preset source`), calibrated on the "
        "first half of the WikiText-2 validation text; perplexity is `lrdeploy eval` (torch, ctx 512, 40 windows) "
        "on the second half.",
        "",
        "| method | format | bpw | ppl | vs uncompressed |",
        "|---|---|---:|---:|---:|",
        f"| uncompressed | – | – | {base:.2f} | – |",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['format']} | {r['bpw']:.3f} | {r['ppl']:.2f} | "
                     f"{100 * (r['ppl'] / base - 1):+.1f}% |")
    by = {(r["method"], r["format"]): r["ppl"] for r in rows}
    wins = all(by[(m, "iq4_nl")] < by[(m, "q4_0")] for m in ("rtn", "ldlq"))
    lines += ["", ("iq4_nl is better under both methods, so `--fallback auto` takes it for `--target gguf` (as "
                   "llama-quantize does). ONNX would hold it at 8 bits (exact, but twice the bytes), so the other "
                   "targets keep q4_0.") if wins else
              "iq4_nl is not better under both methods here; `--fallback auto` should be revisited.", ""]
    update_section("fallback", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
