"""docs/results.md is assembled from sections; each tool rewrites only its own, between marker comments."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.md"


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
