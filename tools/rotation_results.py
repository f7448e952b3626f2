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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402
from report_sections import update_section  # noqa: E402

KINDS = ("none", "residual", "residual+head")
BASES: list[tuple[str, str, list[str]]] = [
    ("rtn q2_k", "rtn", ["--q-format", "q2_k"]),
    ("ldlq q2_k", "ldlq", ["--q-format", "q2_k"]),
    ("ldlq q3_k", "ldlq", ["--q-format", "q3_k"]),
    ("caldera q2_k + r32 q4_0", "caldera", ["--q-format", "q2_k", "--rank", "32", "--lr-format", "q4_0"]),
]


def label(base: str, kind: str) -> str:
    return base if kind == "none" else f"{base}, rotate {kind}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only-report", action="store_true", help="compute nothing: report what is cached")
    p.add_argument("--bases", nargs="*", default=[b for b, _, _ in BASES], help="which methods to run")
    a = p.parse_args()
    results.WORK.mkdir(parents=True, exist_ok=True)
    rows: dict[tuple[str, str], dict] = {}
    for base, method, args in BASES:
        for kind in KINDS:
            name = label(base, kind)
            cache = results.WORK / f"{results.slug(name)}.json"
            if cache.is_file():
                rows[base, kind] = json.loads(cache.read_text())
            elif not a.only_report and base in a.bases:
                extra = args if kind == "none" else [*args, "--rotate", kind]
                rows[base, kind] = results.point(name, method, extra)
    ref = results.baseline() if not a.only_report or (results.WORK / "baseline.json").is_file() else None
    lines = ["## Rotations: a randomized Hadamard folded into the weights (SmolLM2-135M)", "",
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
            lines.append(f"| {base} | {kind} | {r['bpw']:.3f} | {r['ppl']:.3f} | {rel} |")
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
