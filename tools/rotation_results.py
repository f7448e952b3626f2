"""The "rotations" section of docs/results.md: what --rotate (a randomized Hadamard folded into the weights) does to
rtn, ldlq and caldera on SmolLM2 at 2-3 bits.

    .venv/bin/python tools/rotation_results.py                 # runs the points not cached yet, writes the section
    .venv/bin/python tools/rotation_results.py --only-report

Same protocol as the compressor section (tools/results.py, whose cache it shares): --target any, calibration on the
first half of tools/data/wikitext2-valid.txt, `lrdeploy eval` (torch) on 40 windows of 512 tokens of the second
half. A rotated model is untied (its head carries the final norm), so its whole-file size grows by one head; the
table gives both the linears' bpw (what the rotation can change) and the stored bytes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import results
from common import update_section

# the rotation kinds measured: --rotate's three, and residual plus the online down_proj rotation (--rotate-down)
KINDS = ("none", "residual", "residual+head", "residual+down")
BASES: list[tuple[str, str, list[str]]] = [
    ("rtn q2_k", "rtn", ["--q-format", "q2_k"]),
    ("rtn q3_k", "rtn", ["--q-format", "q3_k"]),
    ("ldlq q2_k", "ldlq", ["--q-format", "q2_k"]),
    ("ldlq q3_k", "ldlq", ["--q-format", "q3_k"]),
    ("caldera q2_k + r32 q4_0", "caldera", ["--q-format", "q2_k", "--rank", "32", "--lr-format", "q4_0"]),
    ("caldera q3_k + r32 q4_0", "caldera", ["--q-format", "q3_k", "--rank", "32", "--lr-format", "q4_0"]),
]


def label(base: str, kind: str) -> str:
    return base if kind == "none" else f"{base}, rotate {kind}"


def kind_args(kind: str) -> list[str]:
    if kind == "none":
        return []
    if kind == "residual+down":
        return ["--rotate", "residual", "--rotate-down"]
    return ["--rotate", kind]


def findings(rows: dict[tuple[str, str], dict]) -> list[str]:
    """What the measured points say, worded from the numbers."""
    pairs = [(base, kind, rows[base, kind]["ppl"] / rows[base, "none"]["ppl"]) for base, _, _ in BASES
             for kind in KINDS[1:] if (base, kind) in rows and (base, "none") in rows]
    if not pairs:
        return []

    def listed(sel: list) -> str:
        return "; ".join(f"{b}, {k} ({100 * (r - 1):+.1f}%)" for b, k, r in sel)

    better, worse = [p for p in pairs if p[2] < 1], [p for p in pairs if p[2] >= 1]
    lines = []
    if better:
        lines.append(f"**Rotation helped** at {listed(better)}.")
    if worse:
        lines += [""] * bool(better) + [f"**Rotation hurt** at {listed(worse)}."]
    if better and any("q3_k" in b for b, _, _ in better):
        lines += ["", "At 3 bits LDLQ likely gains what QuIP# and CALDERA rotate for: no weight of a rotated row "
                  "stands out, and the error that LDLQ feeds forward lands on columns that are all alike."]
    if worse:
        lines += ["", "Likely causes of the losses, none isolated here. SmolLM2's source is a Q4_1 GGUF: "
                  "unrotated, every 32-weight run of a row already sits on a 16-level grid, and a rotation mixes each "
                  "row over all 576 columns and throws that structure away. Its residual stream also carries a few "
                  "channels of very large activations, which the rotation spreads over every channel, so the "
                  "rounding error of the writers (o_proj, down_proj) reaches all of them; the coarser the grid, the "
                  "more that costs. RTN pays most: it weighs each input channel by its own diagonal entry of H, and "
                  "after the rotation the large channels' energy lies along a dense direction of H that no diagonal "
                  "entry shows, so RTN rounds without regard to it; LDLQ and CALDERA use all of H. CALDERA and "
                  "QuIP# rotate both sides of every weight and undo it in their kernels; the residual-only form that "
                  "stock runtimes run does not get that."]
    down = [(base, rows[base, "residual+down"]["ppl"] / rows[base, "residual"]["ppl"]) for base, _, _ in BASES
            if (base, "residual+down") in rows and (base, "residual") in rows]
    if down:
        helped = [b for b, r in down if r < 1]
        verdict = ("" if not helped or len(helped) == len(down) else
                   f" It pays only with {', '.join(helped)}; elsewhere it costs, so --rotate-down stays opt-in.")
        lines += ["", "**What the online down_proj rotation adds** (residual+down against residual alone): "
                  + "; ".join(f"{b} {100 * (r - 1):+.1f}%" for b, r in down) + "." + verdict]
    lines += ["", "--rotate stays opt-in (`none` by default)."]
    return lines


SPEED_BASE = "rtn q3_k"  # the pair whose ONNX exports are timed: with and without the online down_proj rotation
SPEED = ["--ctx", "256,1024", "--gen-tokens", "64", "--runs", "3", "--threads", "2"]


def speed() -> dict | None:
    """One `lrdeploy bench` run over the ONNX exports of SPEED_BASE rotated residual, with and without
    --rotate-down (side by side, medians of 3; cached). None until both artifacts exist."""
    cache = results.WORK / "bench-rotate-down.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    arts = [results.WORK / results.slug(label(SPEED_BASE, k)) for k in ("residual", "residual+down")]
    if not all((a / "lrdeploy.json").is_file() for a in arts):
        return None
    outs = []
    for art in arts:
        out = art.with_name(art.name + "-onnx")
        if not (out / "model.onnx").is_file():
            results.run_json(["export", str(art), "--format", "onnx", "-o", str(out), "--force", "--json"])
        outs.append(str(out))
    rep = results.run_json(["bench", *outs, "--baseline", "smollm2", "--backend", "onnxruntime", *SPEED, "--json",
                            "-q"])
    cache.write_text(json.dumps(rep, indent=1))
    return rep


def speed_lines(rep: dict) -> list[str]:
    by_path = {m["path"]: m for m in rep["models"]}
    plain, down = (next(m for p, m in by_path.items() if p.endswith(results.slug(label(SPEED_BASE, k)) + "-onnx"))
                   for k in ("residual", "residual+down"))
    cells = []
    for a, b in zip(plain["ctx"], down["ctx"], strict=True):
        cells.append(f"ctx {a['ctx']}: decode {b['decode_tps']:.0f} against {a['decode_tps']:.0f} tok/s "
                     f"({b['decode_tps'] / a['decode_tps']:.2f}×), prefill {b['prefill_tps']:.0f} against "
                     f"{a['prefill_tps']:.0f} ({b['prefill_tps'] / a['prefill_tps']:.2f}×)")
    return [f"**What --rotate-down costs at run time** (onnxruntime CPU EP, the fused ONNX exports of {SPEED_BASE} "
            f"rotated residual with and without it, one `lrdeploy bench {' '.join(SPEED)}` run, medians): "
            + "; ".join(cells) + f". Files: {down['bytes'] / 1e6:.1f} against {plain['bytes'] / 1e6:.1f} MB."]


QWEN_RECORDS = Path(__file__).resolve().parents[1] / "docs" / "qwen15"


def qwen_lines() -> list[str]:
    """The 1.5B's rotated points against their unrotated twins, from tools/qwen15.py's committed records."""
    out, within = [], []
    for rec in sorted(QWEN_RECORDS.glob("ppl-*-rotate-*-c*.json")):
        twin = QWEN_RECORDS / rec.name.replace("-rotate-residual-head", "").replace("-rotate-residual", "")
        if not twin.is_file():
            continue
        point = rec.name.removeprefix("ppl-").rsplit("-c", 1)[0]
        a, b = json.loads(rec.read_text()), json.loads(twin.read_text())
        out.append(f"`{point}`: {a['ppl']:.3f} ± {a['ppl_err']:.2f} against {b['ppl']:.3f} unrotated "
                   f"({100 * (a['ppl'] / b['ppl'] - 1):+.1f}%)")
        within.append(abs(a["ppl"] - b["ppl"]) < max(a["ppl_err"], b["ppl_err"]))
    if not out:
        return []
    verdict = (" Every difference lies within llama-perplexity's own standard error: a null result there."
               if all(within) else "")
    return ["**On Qwen2.5-Coder-1.5B** (GGUF, llama-perplexity; the Qwen2.5-Coder-1.5B section has the sizes and "
            "the frontier): " + "; ".join(out) + "." + verdict]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only-report", action="store_true", help="compute nothing: report what is cached")
    p.add_argument("--bases", nargs="*", default=[b for b, _, _ in BASES], help="which methods to run")
    p.add_argument("--kinds", nargs="*", default=list(KINDS), help="which rotation kinds to run")
    a = p.parse_args()
    results.WORK.mkdir(parents=True, exist_ok=True)
    rows: dict[tuple[str, str], dict] = {}
    for base, method, args in BASES:
        for kind in KINDS:
            name = label(base, kind)
            live = not a.only_report and base in a.bases and kind in a.kinds
            row = results.point(name, method, [*args, *kind_args(kind)], live)
            if row is not None:
                rows[base, kind] = row
    ref = results.baseline(live=not a.only_report)
    lines = ["## Rotations: a randomized Hadamard folded into the weights (SmolLM2-135M; Qwen2.5-Coder-1.5B)", "",
             "Regenerate: `.venv/bin/python tools/rotation_results.py` (points cached in .cache/results, shared with "
             "the compressor section). `--target any`; calibration on the first half of "
             "tools/data/wikitext2-valid.txt, `lrdeploy eval` (torch, 40 windows of 512 tokens) on the second half.",
             "", "| method | rotate | bpw (linears) | ppl | vs no rotation |", "|---|---|---:|---:|---:|"]
    for base, _, _ in BASES:
        plain = rows.get((base, "none"))
        for kind in KINDS:
            r = rows.get((base, kind))
            if r is None:
                continue
            rel = "" if kind == "none" or plain is None else f"{100 * (r['ppl'] / plain['ppl'] - 1):+.1f}%"
            mark = " †" if r.get("restored") else ""
            lines.append(f"| {base} | {kind}{mark} | {r['bpw']:.3f} | {r['ppl']:.3f} | {rel} |")
    if any(r.get("restored") for r in rows.values()):
        lines += ["", "† measured by this command in an earlier session; its cache was not kept, so the point was "
                  "restored from this table as it stood then, not run again."]
    lines += ["", *findings(rows)]
    lines += ["", *qwen_lines()] if qwen_lines() else []
    rep = speed() if not a.only_report or (results.WORK / "bench-rotate-down.json").is_file() else None
    if rep:
        lines += ["", *speed_lines(rep)]
    missing = [label(b, k) for b, _, _ in BASES for k in KINDS if (b, k) not in rows]
    if missing:
        lines += ["", "Not measured yet: " + "; ".join(missing) + "."]
    if ref:
        lines += ["", f"Uncompressed: {ref['ppl']:.3f}."]
    section = "\n".join(lines)
    update_section("rotations", section)
    print(section)


if __name__ == "__main__":
    main()
