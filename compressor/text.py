"""Text sources for calibration and evaluation: a .txt or .jsonl file, a `datasets` name, or the embedded default."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lrdeploy.errors import LrdError

DEFAULT_TEXT = "pydoc"  # CPython's own documentation topics: installed on every machine that has Python


def parse_range(spec: str | None) -> tuple[float, float]:
    """'a:b' fractions of the text (either side may be empty): '0:0.5' is the first half."""
    if not spec:
        return 0.0, 1.0
    try:
        a, b = spec.split(":")
        lo, hi = float(a or 0), float(b or 1)
    except ValueError:
        raise LrdError(f"bad range '{spec}': expected 'a:b' with fractions, e.g. 0:0.5") from None
    if not 0 <= lo < hi <= 1:
        raise LrdError(f"bad range '{spec}': need 0 <= a < b <= 1")
    return lo, hi


def load_text(spec: str | None, range_: str | None = None) -> str:
    """Read SPEC and cut it to RANGE at line boundaries, so calibration and eval can use disjoint parts."""
    text = _read(spec or DEFAULT_TEXT)
    lo, hi = parse_range(range_)
    if (lo, hi) != (0.0, 1.0):
        lines = text.splitlines(keepends=True)
        text = "".join(lines[int(lo * len(lines)) : int(hi * len(lines))])
    if not text.strip():
        raise LrdError(f"text '{spec or DEFAULT_TEXT}' is empty" + (f" in range {range_}" if range_ else ""))
    return text


def _read(spec: str) -> str:
    if spec == DEFAULT_TEXT:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            raw = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise LrdError(f"cannot read {path}: {e.strerror}") from None
        if path.suffix == ".jsonl":
            return _jsonl_text(raw, path)
        return raw
    if path.exists():
        raise LrdError(f"{path} is not a text file")
    if path.suffix in (".txt", ".jsonl", ".json") or "/" in spec and Path(spec).parent.exists():
        raise LrdError(f"no such file: {path}")
    return _dataset_text(spec)


def _jsonl_text(raw: str, path: Path) -> str:
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise LrdError(f"{path}:{n}: not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise LrdError(f"{path}:{n}: expected an object with a string 'text' field")
        texts.append(row["text"])
    return "\n\n".join(texts)


def _dataset_text(spec: str) -> str:
    """NAME[:CONFIG[:SPLIT]] from the `datasets` hub; only when online and installed."""
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        import datasets
    except ImportError:
        raise LrdError(f"no such file: {spec} (and the `datasets` package is not installed to fetch it)") from None
    try:
        ds = datasets.load_dataset(name, config, split=split or "validation")
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LrdError(f"cannot load dataset '{spec}' (offline or unknown): {first}") from None
    return "\n".join(ds["text"])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D id tensor (no special tokens inserted between pieces)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_ids(ids: torch.Tensor, n_tokens: int, seq_len: int, seed: int) -> torch.Tensor:
    """n_tokens // seq_len non-overlapping windows of seq_len tokens, drawn at random with SEED."""
    if seq_len < 2:
        raise LrdError("--seq-len must be at least 2")
    available = len(ids) // seq_len
    if available == 0:
        raise LrdError(f"calibration text is too short: {len(ids)} tokens, need at least --seq-len {seq_len}")
    want = max(1, n_tokens // seq_len)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(available, generator=g)[: min(want, available)].sort().values
    return torch.stack([ids[i * seq_len : (i + 1) * seq_len] for i in pick.tolist()])


def eval_windows(ids: torch.Tensor, ctx: int, windows: int | None) -> torch.Tensor:
    """Non-overlapping windows of ctx tokens from the start (the DESIGN.md perplexity protocol)."""
    n = len(ids) // ctx
    if n == 0:
        raise LrdError(f"eval text is shorter than one window: {len(ids)} tokens < --ctx {ctx}")
    if windows is not None:
        if windows < 1:
            raise LrdError("--windows must be at least 1")
        n = min(n, windows)
    return ids[: n * ctx].reshape(n, ctx)
