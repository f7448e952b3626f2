"""Tests for lrdeploy.compressor.grids: bit-exactness against gguf-py, layout rules, and quantizer quality."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lrdeploy.compressor import grids

K_QUANTS = ["q2_k", "q3_k", "q4_k"]
ALL = [*K_QUANTS, "q4_0", "q8_0"]
SHAPES = {
    "q2_k": [(8, 512), (4, 576)],
    "q3_k": [(8, 512), (4, 576)],
    "q4_k": [(8, 512), (4, 576)],
    "q4_0": [(8, 96), (8, 512)],
    "q8_0": [(8, 96), (8, 512)],
}
# measured rtn relative error on Gaussian 16x1024 (seeds 0-3): 0.261-0.264 / 0.143-0.144 / 0.070-0.071 /
# 0.080-0.082 / 0.0047-0.0049; the bounds leave a few percent of room.
REL_BOUND = {"q2_k": 0.275, "q3_k": 0.150, "q4_k": 0.074, "q4_0": 0.085, "q8_0": 0.0051}
BPW = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q4_0": 4.5, "q8_0": 8.5}


def _gauss(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _bits(a: np.ndarray | torch.Tensor) -> np.ndarray:
    """float32 bit patterns, so -0.0 and +0.0 count as different (stricter than np.array_equal)."""
    arr = a.numpy() if isinstance(a, torch.Tensor) else a
    return np.ascontiguousarray(arr, dtype=np.float32).view(np.int32)


def _assert_exact(grid: grids.Grid, values: torch.Tensor, raw: torch.Tensor) -> None:
    shape = tuple(values.shape)
    n_super = values.numel() // grid.super_block
    assert raw.dtype == torch.uint8 and raw.dim() == 1
    assert raw.numel() == n_super * grid.type_size
    ref = gguf.quants.dequantize(raw.numpy(), grid.ggml_type).reshape(shape)
    np.testing.assert_array_equal(_bits(ref), _bits(values))
    np.testing.assert_array_equal(_bits(grid.unpack(raw, shape)), _bits(values))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ALL)
def test_rtn_bit_exact_against_gguf(name: str) -> None:
    grid = grids.get_grid(name)
    for i, shape in enumerate(SHAPES[name]):
        W = _gauss(shape, seed=i) * 0.02
        values, raw = grid.quantize_rtn(W)
        assert values.dtype == torch.float32 and values.shape == W.shape
        _assert_exact(grid, values, raw)


@pytest.mark.parametrize("name", ALL)
def test_table(name: str) -> None:
    grid = grids.GRIDS[name]
    assert grid.name == name
    assert grid.bpw == BPW[name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[grid.ggml_type]
    assert (block_size, type_size) == (grid.super_block, grid.type_size)
    assert grid.super_block % grid.block == 0


@pytest.mark.parametrize("name", ALL)
def test_quality(name: str) -> None:
    grid = grids.get_grid(name)
    W = _gauss((16, 1024))  # small tensors keep torch's CPU ops single-threaded and fast
    values, _ = grid.quantize_rtn(W)
    assert _rel(values, W) < REL_BOUND[name]


@pytest.mark.parametrize("name", ["q4_0", "q8_0"])
def test_not_worse_than_gguf_reference(name: str) -> None:
    grid = grids.get_grid(name)
    for seed in range(3):
        W = _gauss((32, 512), seed) * (seed + 1)
        values, _ = grid.quantize_rtn(W)
        ref = gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), grid.ggml_type), grid.ggml_type)
        ours = float(((values - W) ** 2).sum())
        theirs = float(((torch.from_numpy(ref) - W) ** 2).sum())
        assert ours <= theirs


@pytest.mark.parametrize("name", ALL)
def test_importance_lowers_weighted_column_error(name: str) -> None:
    grid = grids.get_grid(name)
    W = _gauss((64, 256), seed=3)
    col = 37
    importance = torch.ones(256)
    importance[col] = 1000.0
    plain, _ = grid.quantize_rtn(W)
    weighted, raw = grid.quantize_rtn(W, importance)
    _assert_exact(grid, weighted, raw)
    err_plain = float(((plain - W)[:, col] ** 2).sum())
    err_weighted = float(((weighted - W)[:, col] ** 2).sum())
    assert err_weighted < err_plain


def test_fits() -> None:
    q2 = grids.get_grid("q2_k")
    reason = q2.fits((4, 576), per_row=True)
    assert reason is not None and "576" in reason and "256" in reason
    assert q2.fits((4, 576), per_row=False) is None
    assert q2.fits((8, 512), per_row=True) is None
    assert q2.fits((3, 40), per_row=False) is not None  # 40 % 16 != 0
    assert q2.fits((1, 48), per_row=False) is not None  # 48 weights: no whole super-block
    assert grids.get_grid("q4_0").fits((3, 96), per_row=True) is None
    with pytest.raises(ValueError, match="576"):
        q2.quantize_rtn(torch.zeros(1, 576))


def test_get_grid_unknown() -> None:
    with pytest.raises(ValueError) as info:
        grids.get_grid("q9_9")
    for name in ALL:
        assert name in str(info.value)
    assert grids.get_grid("Q4_K") is grids.GRIDS["q4_k"]


@pytest.mark.parametrize("name", ALL)
def test_degenerate_blocks(name: str) -> None:
    grid = grids.get_grid(name)
    in_ = 512
    for W in (torch.zeros(2, in_), torch.full((2, in_), 0.3), torch.full((2, in_), -0.7)):
        values, raw = grid.quantize_rtn(W)
        assert torch.isfinite(values).all()
        _assert_exact(grid, values, raw)
        assert _rel(values, W) < 0.05 if W.abs().sum() > 0 else values.abs().sum() == 0
    # zero, constant and ordinary blocks side by side, one super-block each
    W = _gauss((4, in_), seed=5)
    W[0] = 0.0
    W[1, :256] = 1.5
    W[2, 256:] = -2.0
    values, raw = grid.quantize_rtn(W)
    assert torch.isfinite(values).all()
    _assert_exact(grid, values, raw)


@pytest.mark.parametrize("name", ALL)
def test_round_codes_zero_scale(name: str) -> None:
    grid = grids.get_grid(name)
    w = _gauss((3, grid.block))
    codes = grids.round_codes(grid, w, torch.zeros(3), torch.zeros(3))
    assert codes.dtype == torch.uint8
    assert (codes == grid.zero).all()
    assert torch.isfinite(grids.dequant(grid, codes, torch.zeros(3), torch.zeros(3))).all()


@pytest.mark.parametrize("name", ALL)
def test_staged_pipeline_matches_packing(name: str) -> None:
    """The LDLQ-style use: fit_super once, then fit_and_round one block column at a time, then pack."""
    grid = grids.get_grid(name)
    out, in_ = (4, 576) if grid.has_super else (4, 96)
    W = _gauss((out, in_), seed=7)
    importance = torch.rand(in_, generator=torch.Generator().manual_seed(1)) + 0.5
    flat_imp = importance.expand(out, in_).reshape(-1, grid.super_block)
    sup = grids.fit_super(grid, W.reshape(-1, grid.super_block), flat_imp)
    assert sup.shape == (out * in_ // grid.super_block, 2)
    assert torch.equal(sup, sup.half().float())
    codes = torch.empty(out, in_, dtype=torch.uint8)
    values = torch.empty(out, in_)
    block_codes = torch.empty(out, in_ // grid.block, 2, dtype=torch.int32)
    for j in range(0, in_, grid.block):
        rows = grids.super_index(grid, out, in_, j)
        assert torch.equal(rows, (torch.arange(out) * in_ + j) // grid.super_block)
        blocks = grids.block_index(grid, out, in_, j)
        assert torch.equal(blocks, torch.arange(out) * (in_ // grid.block) + j // grid.block)
        fit, c, v = grids.fit_and_round(grid, W[:, j : j + grid.block], sup[rows], importance[j : j + grid.block])
        assert fit.scale.shape == (out,) and fit.codes.shape == (out, 2)
        codes[:, j : j + grid.block] = c
        values[:, j : j + grid.block] = v
        block_codes[:, j // grid.block] = fit.codes
    raw = grids.pack(grid, codes.reshape(-1, grid.super_block), block_codes.reshape(-1, 2), sup)
    _assert_exact(grid, values, raw)
    assert _rel(values, W) < REL_BOUND[name] * 1.2


@pytest.mark.parametrize("name", ALL)
def test_fit_block_search_beats_plain_rounding(name: str) -> None:
    """The chosen integers are at least as good as the neighbours one step away (weighted, after rounding)."""
    grid = grids.get_grid(name)
    W = _gauss((64, grid.super_block), seed=11)
    sup = grids.fit_super(grid, W)
    wb = W.reshape(-1, grid.block)
    fit = grids.fit_block(grid, wb, sup.repeat_interleave(grid.super_block // grid.block, 0))
    err = (grids.dequant(grid, grids.round_codes(grid, wb, fit.scale, fit.offset), fit.scale, fit.offset) - wb) ** 2
    total = float(err.sum())
    for factor in (0.9, 1.1):
        alt = fit.scale * factor
        v = grids.dequant(grid, grids.round_codes(grid, wb, alt, fit.offset), alt, fit.offset)
        assert total <= float(((v - wb) ** 2).sum())
