"""Shared by the results tools: docs/results.md is assembled from sections, each tool rewriting only its own between
marker comments; every measured point comes from an `lrdeploy ... --json` run and is kept as a JSON record, so an
interrupted run resumes where it stopped. tests/test_tools.py holds these helpers to that."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
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


def slug(label: str, squeeze: bool = False) -> str:
    """LABEL as a file name: every character but letters and digits becomes a dash, none at either end. SQUEEZE
    folds runs of dashes into one (the peers' and the 1.5B's record names; the others keep theirs, so that their
    work folders and report rows stay what they are)."""
    name = "".join(c if c.isalnum() else "-" for c in label)
    return (re.sub(r"-+", "-", name) if squeeze else name).strip("-")


def cached(path: Path, make: Callable[[], dict], live: bool = True) -> dict | None:
    """The JSON record at PATH: read back where it exists, else MAKE's dict with its wall time added as "seconds",
    written atomically (an interrupted run leaves no half record). Where it does not exist and LIVE is False (a
    report-only run), None: nothing is measured."""
    if path.is_file():
        return json.loads(path.read_text())
    if not live:
        return None
    t0 = time.perf_counter()
    row = make()
    row["seconds"] = round(time.perf_counter() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(path)
    return row
