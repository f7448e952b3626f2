"""Whole-file recipes: which format each tensor gets, as llama-quantize's presets (Q2_K, Q3_K_S, ...) decide it.

A model is more than its decoder linears. Qwen2.5-Coder-1.5B stores a 151,936 × 1536 embedding and an output
matrix of the same shape: 26% of its weights. Copied as the source stores them (Q4_K and Q6_K) they cost more bytes
than all of its 2-bit linears, and no choice of Q could bring the file below 3.5 bits per weight.

A preset names a whole mix:

- the backbone format of the linears (from --q-format, which the preset does not change);
- the token embedding's format: a lookup table, read one row per token, so it takes the backbone's own grid;
- the output matrix's format: every logit goes through it, so it keeps 4 bits (rounded with its input importance);
- a few small linears one grid up: k_proj and v_proj are 256 × 1536 on a GQA model (1/6 of a q_proj), and each
  serves six query heads. Bumping them to q4_k costs 0.8% of the file (5 MB on the 1.5B).

`auto`, the default, takes the mix of a 2- or 3-bit backbone (a K-quant or an i-quant) where the hidden size holds
whole 256-weight super-blocks, and otherwise leaves the vocabulary as the source stores it (a 576-wide SmolLM2 row
holds no super-block, and a 4-bit backbone gains little from re-rounding a 4-bit source). `source` is that behaviour
everywhere. Explicit --embed-type, --output-type and --tensor-type win over the preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lrdeploy.errors import LrdError


@dataclass(frozen=True)
class Mix:
    embed: str | None  # None: as the source stores it
    output: str | None
    tensor_types: dict[str, str] = field(default_factory=dict)


SOURCE = "source"  # the --embed-type/--output-type value that keeps a tensor as stored (None once resolved)
SOURCE_MIX = Mix(None, None)
_SMALL_UP = {"k_proj": "q4_k", "v_proj": "q4_k"}
MIXES: dict[str, Mix] = {
    SOURCE: SOURCE_MIX,
    "q2": Mix("q2_k", "q4_k", _SMALL_UP),
    "q3": Mix("q3_k", "q4_k", _SMALL_UP),
}
PRESETS = ("auto", *MIXES)
# a backbone below 3 bpw takes the q2 mix, one below 4 the q3 mix (K-quant or i-quant alike, by its own bpw); at 4
# bits and up the source's own vocabulary blocks are kept
_TIERS = ((3.0, "q2"), (4.0, "q3"))
SUPER_BLOCK = 256


def check(preset: str) -> None:
    if preset not in PRESETS:
        raise LrdError(f"unknown --preset '{preset}'; choose one of {', '.join(PRESETS)}")


def resolve(preset: str, q_format: str | None, hidden: int) -> tuple[str, Mix]:
    """The mix PRESET stands for on a model of width HIDDEN with backbone Q_FORMAT: (its name, the mix)."""
    check(preset)
    if preset != "auto":
        return preset, MIXES[preset]
    name = _tier(q_format) if hidden % SUPER_BLOCK == 0 else None
    return (name, MIXES[name]) if name else (SOURCE, SOURCE_MIX)


def _tier(q_format: str | None) -> str | None:
    from lrdeploy.compressor.grids import GRIDS

    grid = GRIDS.get(q_format or "")
    return None if grid is None else next((name for below, name in _TIERS if grid.bpw < below), None)


def apply(o, hidden: int):
    """Options O with the preset's formats filled in wherever the user gave none (O is a CompressOptions)."""
    name, mix = resolve(o.preset, o.q_format, hidden)
    types = {**mix.tensor_types, **o.tensor_types} if o.q_format else dict(o.tensor_types)
    embed, output = (None if t == SOURCE else t for t in (o.embed_type or mix.embed, o.output_type or mix.output))
    return replace(o, embed_type=embed, output_type=output, tensor_types=types, preset=name)
