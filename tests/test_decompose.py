"""Exactness of the per-linear math on random matrices with a known H."""

import pytest
import torch

from lrdeploy.compressor import decompose as dec
from lrdeploy.compressor import grids


def correlated_h(n: int, seed: int) -> torch.Tensor:
    """H of inputs with strongly correlated, unequal-scale features (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)
    scale = torch.logspace(-1, 1, n)[torch.randperm(n, generator=g)]
    X = torch.randn(4 * n, n, generator=g) @ mix * scale
    return X.T @ X / X.shape[0]


@pytest.mark.parametrize("fmt", ["q2_k", "q3_k", "q4_k", "q4_0", "q8_0"])
def test_ldlq_error_at_most_rtn(fmt):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 512, generator=g) * 0.02
    H = correlated_h(512, 2)
    fac = dec.hessian_factor(H)
    grid = grids.get_grid(fmt)
    q_ldlq = dec.ldlq(W, fac, grid)
    q_rtn = dec.rtn(W, grid, torch.diagonal(fac.H))
    e_ldlq, e_rtn = dec.rel_error(q_ldlq.values, W, H), dec.rel_error(q_rtn.values, W, H)
    assert e_ldlq <= e_rtn
    assert e_ldlq < 0.9 * e_rtn, (e_ldlq, e_rtn)  # correlated inputs: error feedback must pay off clearly


@pytest.mark.parametrize("fmt", ["q2_k", "q4_0"])
def test_ldlq_values_are_its_bytes(fmt):
    """What LDLQ computes with is exactly what its packed blocks decode to."""
    W = torch.randn(32, 512) * 0.05
    grid = grids.get_grid(fmt)
    q = dec.ldlq(W, dec.hessian_factor(correlated_h(512, 3)), grid)
    assert torch.equal(grid.unpack(q.raw, W.shape), q.values)


def test_ldlq_flattened_layout_rows_not_multiple_of_256():
    """576-wide rows (SmolLM2): q2_k super-blocks straddle rows, still exact and better than RTN."""
    W = torch.randn(48, 576) * 0.02
    H = correlated_h(576, 4)
    grid = grids.get_grid("q2_k")
    q = dec.ldlq(W, dec.hessian_factor(H), grid)
    assert torch.equal(grid.unpack(q.raw, W.shape), q.values)
    assert dec.rel_error(q.values, W, H) < dec.rel_error(dec.rtn(W, grid, torch.diagonal(H)).values, W, H)


def test_whitened_lowrank_equals_closed_form():
    """L·R must equal trunc_r(A·H^½)·H^-½ computed independently with the symmetric square root."""
    torch.manual_seed(5)
    A = torch.randn(96, 128, dtype=torch.float64)
    H = correlated_h(128, 6).double()
    fac = dec.hessian_factor(H, damp=0.0)
    rank = 12
    L, R = dec.whitened_lowrank(A.float(), fac, rank)
    evals, V = torch.linalg.eigh(fac.H.double())
    root = V @ torch.diag(evals.sqrt()) @ V.T
    inv_root = V @ torch.diag(evals.rsqrt()) @ V.T
    U, s, Vh = torch.linalg.svd(A @ root)
    expected = (U[:, :rank] * s[:rank]) @ Vh[:rank] @ inv_root
    got = (L.double() @ R.double())
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max())
    # its H-error is the energy of the discarded singular values: the optimum
    err = dec.h_error(got - A, fac.H.double())
    assert err == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-3)


def test_whitened_beats_plain_svd_in_h_norm():
    torch.manual_seed(7)
    A = torch.randn(64, 128)
    H = correlated_h(128, 8)
    fac = dec.hessian_factor(H)
    Lw, Rw = dec.whitened_lowrank(A, fac, 16)
    Ls, Rs = dec.svd_lowrank(A, 16)
    assert dec.h_error(Lw @ Rw - A, fac.H) < dec.h_error(Ls @ Rs - A, fac.H)


@pytest.mark.parametrize("lr_format", ["f16", "q8_0", "q4_0"])
def test_caldera_best_error_never_increases(lr_format):
    torch.manual_seed(9)
    # a weight with low-rank structure plus noise, as in trained layers
    W = (torch.randn(128, 32) @ torch.randn(32, 256)) * 0.01 + torch.randn(128, 256) * 0.01
    H = correlated_h(256, 10)
    fac = dec.hessian_factor(H)
    d = dec.caldera(W, fac, grids.get_grid("q2_k"), 32, lr_format, iters=4, lplr_iters=2)
    assert len(d.history) == 4
    assert all(b <= a for a, b in zip(d.history, d.history[1:], strict=False))
    assert d.error == d.history[-1]
    ldlq_only = dec.rel_error(dec.ldlq(W, fac, grids.get_grid("q2_k")).values, W, H)
    assert d.error < ldlq_only
    assert dec.rel_error(d.values(tuple(W.shape)), W, fac.H) == pytest.approx(d.error, rel=1e-5)


def test_lplr_quantized_factors_decode_from_their_bytes():
    torch.manual_seed(11)
    A = torch.randn(96, 256) * 0.02
    fac = dec.hessian_factor(correlated_h(256, 12))
    lr = dec.lplr(A, fac, 32, "q8_0", iters=2)
    grid = grids.get_grid("q8_0")
    assert torch.equal(grid.unpack(lr.L.raw, (96, 32)), lr.L.values)
    assert torch.equal(grid.unpack(lr.R.raw, (32, 256)), lr.R.values)


@pytest.mark.parametrize("decay", [0.0, 0.05])
def test_top_svd_captures_the_top_energy(decay):
    """The randomized top-r SVD keeps the best rank-r energy on flat (quantization-noise-like) and decaying spectra."""
    torch.manual_seed(11)
    m, n, rank = 640, 400, 32
    U = torch.linalg.qr(torch.randn(m, n)).Q
    V = torch.linalg.qr(torch.randn(n, n)).Q
    s = torch.exp(-decay * torch.arange(n, dtype=torch.float32)) + 0.1 * torch.rand(n)
    A = (U * s) @ V.T
    Ur, sr, Vhr = dec.top_svd(A, rank)
    exact = torch.linalg.svdvals(A)[:rank]
    assert 4 * (rank + 32) < min(m, n)  # the randomized path, not the exact fallback
    if decay:  # a decaying spectrum: the leading singular values themselves are found
        assert torch.allclose(sr, exact, rtol=1e-3)
    # on a flat one any near-top subspace is as good: what counts is the residual, within 1% of the optimum
    best = float((torch.linalg.svdvals(A)[rank:] ** 2).sum())
    got = float(((Ur * sr) @ Vhr - A).square().sum())
    assert got <= best * 1.01, (got, best)
    assert torch.equal(dec.top_svd(A, rank)[1], sr)  # seeded: a pure function of A


def test_solve_gram_survives_lost_factor_rows():
    """A factor rounded to its grid can lose whole rows; the Gram solve then falls back to least squares."""
    g = torch.Generator().manual_seed(0)
    F = torch.randn(4, 64, generator=g)
    eye = torch.eye(4)
    B = torch.randn(4, 3, generator=g)
    G = F @ F.T
    torch.testing.assert_close(dec.solve_gram(G, B, eye), torch.linalg.solve(G + 1e-6 * torch.trace(G) / 4 * eye, B))
    assert torch.equal(dec.solve_gram(torch.zeros(4, 4), B, eye), torch.zeros(4, 3))  # nothing left: L = 0
    F[2] = 0.0  # one lost row: its unknowns get the minimum-norm answer, the others still solve the system
    G = F @ F.T
    G[2, 2] = float("nan")
    X = dec.solve_gram(G, B, eye)
    assert torch.isfinite(X).all()


def test_hessian_factor_consume_damps_in_place_and_factors_alike():
    """consume=True damps the caller's H itself (no second in×in copy) and gives the same factors; U (computed in
    H⁻¹'s own buffer) is still the upper Cholesky factor of H⁻¹."""
    H = correlated_h(300, 5)
    ref = dec.hessian_factor(H.clone())
    own = H.clone()
    fac = dec.hessian_factor(own, consume=True)
    assert fac.H.data_ptr() == own.data_ptr()
    for a, b in ((ref.H, fac.H), (ref.S, fac.S), (ref.U, fac.U)):
        assert torch.equal(a, b)
    assert torch.allclose(fac.U.T @ fac.U, torch.linalg.inv(fac.H.double()).float(), rtol=1e-3, atol=1e-4)
    assert torch.equal(fac.U, fac.U.triu())


def test_chunked_super_fit_and_packing_equal_one_pass():
    """fit_super and pack work a slice of super-blocks at a time to bound memory: the bytes equal a single pass."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(96, 512, generator=g) * 0.02
    imp = torch.rand(512, generator=g).repeat(96).reshape(-1, 256)
    for fmt in ("q2_k", "q3_k", "q4_k"):
        grid = grids.get_grid(fmt)
        w = W.reshape(-1, 256)
        one = grids.fit_super(grid, w, imp, chunk=1 << 30)
        few = grids.fit_super(grid, w, imp, chunk=256 * 7)  # 7 super-blocks per slice: a ragged last slice
        assert torch.equal(one, few)
        fit = grids.fit_block(grid, W.reshape(-1, grid.block), one.repeat_interleave(256 // grid.block, 0))
        codes = grids.round_codes(grid, W.reshape(-1, grid.block), fit.scale, fit.offset).reshape(-1, 256)
        assert torch.equal(grids.pack(grid, codes, fit.codes, one, chunk=1 << 30),
                           grids.pack(grid, codes, fit.codes, one, chunk=256 * 5))
