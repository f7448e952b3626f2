"""Shared by the results tools: docs/results.md is assembled from sections, each tool rewriting only its own between
marker comments, and every measured point comes from an `lrdeploy ... --json` run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
# WikiText-2 validation split (CC BY-SA 3.0, see tools/data/README.md): calibration and evaluation text of the docs
WIKITEXT = Path(__file__).resolve().parent / "data" / "wikitext2-valid.txt"


def update_section(name: str, text: str, path: Path = RESULTS) -> None:
    """Replace the section NAME (or append it) and leave every other section as it was."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    body = path.read_text() if path.is_file() else "# lrdeploy results\n\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in body and end in body:
        head, rest = body.split(begin, 1)
        _, tail = rest.split(end, 1)
        body = head + block + tail
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(body)
    tmp.replace(path)


def run_json(args: list[str], prefix: tuple[str, ...] = ()) -> dict:
    """`lrdeploy ARGS` (ARGS ending in --json) in a child, after PREFIX (e.g. nice): its last stdout line, parsed."""
    res = subprocess.run([*prefix, sys.executable, "-m", "lrdeploy.cli", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"failed: lrdeploy {' '.join(args)}\n{res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
