"""llama.cpp's i-quants: our bytes decode through gguf-py to exactly the values the compressor used, block LDLQ beats
round-to-nearest on random and real layers, and the bounded codeword search finds what the exhaustive one finds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from test_decompose import correlated_h

from lrdeploy.compressor import decompose as dec
from lrdeploy.compressor import grids, lattice
from lrdeploy.compressor.hcollect import collect_h
from lrdeploy.compressor.model import BlockContext, layer_prefix, materialize, rotary, skeleton
from lrdeploy.compressor.sources import open_source
from lrdeploy.compressor.text import load_text, tokenize

LATTICES = list(lattice.LATTICES)
CODEBOOKS = [n for n, g in lattice.LATTICES.items() if g.signs != "none"]


def gguf_values(grid, raw: torch.Tensor, shape) -> np.ndarray:
    return dequantize(raw.numpy(), grid.ggml_type).reshape(shape)


def hard_matrix(seed: int) -> torch.Tensor:
    """Rows of unequal scale, plus the cases scales get wrong: all zeros, denormal-small, one huge outlier."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(24, 512, generator=g) * torch.logspace(-3, 0, 24).unsqueeze(-1)
    W[3] = 0
    W[5] *= 1e-5
    W[7, 100] = 40.0
    W[9, :256] = 0  # one whole super-block of zeros next to a live one
    return W


@pytest.mark.parametrize("fmt", LATTICES)
def test_rtn_bytes_decode_to_its_values(fmt):
    grid = grids.get_grid(fmt)
    W = hard_matrix(0)
    imp = torch.rand(512, generator=torch.Generator().manual_seed(1)) + 0.1
    values, raw = grid.quantize_rtn(W, imp)
    assert raw.dtype == torch.uint8 and raw.numel() == W.numel() // grid.super_block * grid.type_size
    assert np.array_equal(gguf_values(grid, raw, W.shape), values.numpy())
    assert torch.equal(grid.unpack(raw, W.shape), values)
    assert torch.equal(values[3], torch.zeros(512)) and torch.equal(values[9, :256], torch.zeros(256))
    assert float(values[7, 100]) > 20.0  # the outlier keeps its size: d is fitted per super-block


@pytest.mark.parametrize("fmt", LATTICES)
def test_ldlq_bytes_decode_and_beat_rtn(fmt):
    grid = grids.get_grid(fmt)
    W = torch.randn(64, 512, generator=torch.Generator().manual_seed(2)) * 0.02
    H = correlated_h(512, 3)
    fac = dec.hessian_factor(H)
    q = dec.ldlq(W, fac, grid)
    assert q.fmt == fmt
    assert np.array_equal(gguf_values(grid, q.raw, W.shape), q.values.numpy())
    e_ldlq = dec.rel_error(q.values, W, H)
    e_rtn = dec.rel_error(dec.rtn(W, grid, torch.diagonal(fac.H)).values, W, H)
    assert e_ldlq < 0.85 * e_rtn, (e_ldlq, e_rtn)


def test_ldlq_beats_rtn_on_a_real_layer():
    """SmolLM2's block-0 down_proj (576 x 1536: its rows hold whole super-blocks) with H from real text."""
    src = open_source("smollm2")
    model = skeleton(src.config)
    ids = tokenize(src.tokenizer(), load_text(None, "0:0.05"))[: 4 * 128].view(4, 128)
    x = src.tensor("model.embed_tokens.weight").float()[ids]
    ctx = BlockContext(model, x, rotary(model, torch.device("cpu")))[0]
    block = materialize(model.model.layers[0], layer_prefix(0), src.tensor, torch.device("cpu"))
    H = collect_h(block, ("mlp.down_proj",), x, ctx, 4)["mlp.down_proj"]
    W = block.mlp.down_proj.weight.detach().float()
    fac = dec.hessian_factor(H)
    for fmt in ("iq2_xxs", "iq3_xxs", "iq4_xs"):
        grid = grids.get_grid(fmt)
        e_ldlq = dec.rel_error(dec.ldlq(W, fac, grid).values, W, fac.H)
        e_rtn = dec.rel_error(dec.rtn(W, grid, torch.diagonal(fac.H)).values, W, fac.H)
        assert e_ldlq < 0.9 * e_rtn, (fmt, e_ldlq, e_rtn)


@pytest.mark.parametrize("fmt", CODEBOOKS)
def test_bounded_search_matches_exhaustive(fmt):
    """Scoring the nearest codewords of the per-coordinate rounding finds the exhaustive optimum almost always,
    and loses almost nothing where it doesn't."""
    grid = grids.get_grid(fmt)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(2048, 8, generator=g)
    a = w.abs().amax(-1) / float(lattice._book(fmt).levels[-1])
    x = torch.rand(2048, 8, generator=g) + 0.2
    near, full = lattice.round_group(grid, w, a, x), lattice.search_all(grid, w, a, x)

    def err(r):
        return float((x * (a[:, None] * r.q - w).square()).sum())

    assert err(full) <= err(near) <= 1.005 * err(full)
    assert float((near.q == full.q).all(-1).float().mean()) >= 0.85


@pytest.mark.parametrize("fmt", ["iq2_xs", "iq3_xxs", "iq2_s"])
def test_search_in_slices_rounds_each_row_as_alone(fmt):
    """The codebook search scores its targets _SCORE_ROWS at a time; rows rounded together across several slices (and
    a ragged last one) get exactly the bits they get alone."""
    grid = grids.get_grid(fmt)
    g = torch.Generator().manual_seed(6)
    rows = 2 * lattice._SCORE_ROWS * grid.vec // 16 + 37  # targets: more than two slices, the last one partial
    w = torch.randn(rows, 16, generator=g)
    a = w.abs().amax(-1) / float(lattice._book(fmt).levels[-1])
    x = torch.rand(rows, 16, generator=g) + 0.2
    whole = lattice.round_group(grid, w, a, x)
    for k in range(0, rows, 97):
        r = lattice.round_group(grid, w[k : k + 1], a[k : k + 1], x[k : k + 1])
        assert torch.equal(whole.idx[k : k + 1], r.idx) and torch.equal(whole.neg[k : k + 1], r.neg), k
    assert whole.idx.shape[0] * whole.idx.shape[1] > 2 * lattice._SCORE_ROWS


@pytest.mark.parametrize("fmt", ["iq2_xxs", "iq2_xs", "iq3_xxs"])
def test_parity_grids_keep_an_even_count_of_minus_signs(fmt):
    grid = grids.get_grid(fmt)
    w = torch.randn(512, 8, generator=torch.Generator().manual_seed(5))
    r = lattice.round_group(grid, w, w.abs().amax(-1) / 30)
    assert torch.equal(r.neg.sum(-1) % 2, torch.zeros(512, dtype=torch.int64))
    assert torch.equal(r.neg, r.q < 0)
