"""The token embedding and the output matrix (lm_head): their formats, like llama-quantize's --token-embedding-type
and --output-tensor-type.

A format is `source` (the tensor as the source stores it: a GGUF's ggml blocks untouched, an HF checkpoint's dtype),
`f16` (a cast), or one of our grids (RTN; the head weighted by the mean square of its inputs, the embedding
unweighted). Block-quantized tensors go into the artifact as `NAME.q` (raw ggml blocks, uint8), every other one under
its own name; the manifest's `tensors` table records each (format, shape, bytes).

A tied model stays tied when both resolve to the same format, and is stored once. Different formats untie it: the
head is stored on its own and config.json says tie_word_embeddings = false.

The math here is pure (`quantize_rows`, `input_importance`); reading the source happens in `encode`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lrdeploy.compressor import grids
from lrdeploy.errors import LrdError

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
SOURCE = "source"
FORMATS = (SOURCE, "f16", *grids.GRIDS)
CHUNK_ROWS = 4096  # rows quantized per step: bounds the float32 copy of a 150k-row vocabulary


def check_format(fmt: str | None, flag: str) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise LrdError(f"unknown format '{fmt}' for {flag}; choose one of {', '.join(FORMATS)}")


@dataclass(frozen=True)
class VocabPlan:
    """How the artifact stores the embedding and the head, decided before any work starts."""

    embed: str  # format of model.embed_tokens.weight
    head: str | None  # format of a separately stored lm_head.weight; None: tied, the embedding serves as the head
    head_from: str  # the source tensor the head is made from: lm_head.weight, or a tied model's embedding
    untie: bool  # the source ties them and the artifact does not
    shape: tuple[int, int]  # vocab x hidden

    @property
    def head_needs_inputs(self) -> bool:
        """A grid head is rounded with its input importance, known only once the calibration reached the top."""
        return self.head in grids.GRIDS


def plan_vocab(embed_type: str | None, output_type: str | None, config, has_head: bool,
               shape: tuple[int, int]) -> VocabPlan:
    """Resolve the two formats against the model: tying, and whether each grid's blocks fit the rows."""
    embed, head = embed_type or SOURCE, output_type or SOURCE
    tied = bool(getattr(config, "tie_word_embeddings", False))
    untie = tied and head != embed
    stored_head: str | None = head
    if tied and not untie and not (head == SOURCE and has_head):
        stored_head = None  # one tensor serves both (a source that stores its tied head anyway keeps it, as before)
    for name, fmt, flag in ((EMBED, embed, "--embed-type"), (HEAD, stored_head, "--output-type")):
        if fmt in grids.GRIDS:
            reason = grids.get_grid(fmt).fits(shape, per_row=True)
            if reason is not None:
                raise LrdError(f"{name} {shape[0]}x{shape[1]}: {reason}, so {flag} {fmt} does not fit; choose a "
                               "format whose blocks fit the rows (q4_0/q8_0/iq4_nl: rows % 32, K- and i-quants: "
                               "rows % 256), f16 or source")
    return VocabPlan(embed, stored_head, HEAD if has_head or not tied else EMBED, untie, shape)


@dataclass(frozen=True)
class Stored:
    """One tensor as the artifact stores it: raw ggml blocks (`NAME.q`) when q_format is set, else a float tensor."""

    data: Tensor
    q_format: str | None  # ggml type name (q2_k, q6_k, ...) of the blocks
    shape: tuple[int, ...]

    def tensors(self, name: str) -> dict[str, Tensor]:
        return {f"{name}.q" if self.q_format else name: self.data.contiguous()}

    def entry(self) -> dict:
        """The manifest's record of it."""
        dtype = None if self.q_format else str(self.data.dtype).removeprefix("torch.")
        return {"q_format": self.q_format, "dtype": dtype, "shape": list(self.shape),
                "bytes": self.data.numel() * self.data.element_size()}


def quantize_rows(grid: grids.Grid, chunks: Iterable[Tensor], importance: Tensor | None = None) -> Tensor:
    """RTN bytes of a matrix given as row chunks; each row holds whole super-blocks, so this equals one call."""
    return torch.cat([grid.quantize_rtn(w, importance)[1] for w in chunks])


def input_importance(norm: nn.Module, x: Tensor, batch: int) -> Tensor:
    """mean(norm(x)²) per channel over all calibration tokens: the diagonal of the head's H."""
    total = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            total += norm(x[i : i + batch]).float().pow(2).reshape(-1, x.shape[-1]).sum(0)
    return total / (x.shape[0] * x.shape[1])


def encode(source, name: str, fmt: str, shape: tuple[int, int], importance: Tensor | None = None) -> Stored:
    """Source tensor NAME in format FMT (see the module docstring)."""
    if fmt == SOURCE:
        q_format, data = source.native(name)
        return Stored(data, q_format, tuple(data.shape) if q_format is None else shape)
    chunks = source.row_chunks(name, CHUNK_ROWS)
    if fmt == "f16":
        return Stored(torch.cat([c.half() for c in chunks]), None, shape)
    grid = grids.get_grid(fmt)
    return Stored(quantize_rows(grid, chunks, importance), fmt, shape)


def untie_config(path: Path) -> None:
    """config.json with tie_word_embeddings = false, so loaders build a head of its own."""
    from lrdeploy.io import atomic_write_json

    config = json.loads(path.read_text())
    config["tie_word_embeddings"] = False
    atomic_write_json(path, config)


def stored_weights(model_weights: int, tensors: dict, tied: bool) -> int:
    """Weights of the stored model: the source's (a tied embedding once), plus a head the artifact stores apart."""
    head = tensors.get(HEAD)
    if tied and head is not None:
        rows, cols = head["shape"]
        return model_weights + rows * cols
    return model_weights
