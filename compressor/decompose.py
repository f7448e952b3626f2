"""The math of W ~ Q + L·R for one linear layer: pure functions, tensors in, tensors out.

W is out×in, H = XᵀX/n (in×in) from the layer's calibration inputs. Errors are measured in the H-norm,
‖D‖²_H = tr(D H Dᵀ) = ‖D Xᵀ‖²/n, the squared output error the layer would make on its calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lrdeploy.compressor import grids, lattice
from lrdeploy.compressor.format import Format

LR_FORMATS = ("f16", "q8_0", "q4_0")


@dataclass(frozen=True)
class HessianFactor:
    """H and the two Cholesky factors every method needs; computed once per input group."""

    H: Tensor  # damped, in×in
    S: Tensor  # lower Cholesky of H: H = S Sᵀ (whitening)
    U: Tensor  # upper Cholesky of H⁻¹ (LDLQ error feedback)


def hessian_factor(H: Tensor, damp: float = 0.01, consume: bool = False) -> HessianFactor:
    """Damp H by damp·mean(diag H) (dead inputs get a unit diagonal) and factor it, in float32.

    float32 keeps 11008-wide layers fast on CPU; if rounding leaves H not positive definite the damping grows
    tenfold until it is. Memory is the point on wide layers (an 8960-wide H is 321 MB): the damping goes onto one
    copy's diagonal in place (onto H itself with CONSUME, for a caller that drops H), and the upper factor of H⁻¹
    overwrites H⁻¹ in its own buffer, so the peak is three such matrices: damped H, S, and H⁻¹ becoming U.
    """
    Hd = H.float() if consume else H.float().clone()
    del H
    diag = torch.diagonal(Hd)
    dead = diag <= 0
    diag[dead] = 1.0
    base = diag.clone()
    mean = base.mean()
    for _ in range(6):
        diag.copy_(base + damp * mean)
        S, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U = torch.cholesky_inverse(S)
            torch.linalg.cholesky_ex(U, upper=True, out=(U, info))
            if int(info) == 0:
                return HessianFactor(Hd, S, U)
            del U
        del S
        damp = max(damp * 10, 1e-6)
    raise ValueError("H is not positive definite even after heavy damping")


def h_error(D: Tensor, H: Tensor) -> float:
    """‖D‖²_H = tr(D H Dᵀ)."""
    D = D.float()
    return float(((D @ H.float()) * D).sum(dtype=torch.float64))


def rel_error(W_hat: Tensor, W: Tensor, H: Tensor) -> float:
    """Relative H-weighted error ‖Ŵ − W‖²_H / ‖W‖²_H (0 is exact)."""
    denom = h_error(W, H)
    return h_error(W_hat - W, H) / denom if denom > 0 else 0.0


# ---------------------------------------------------------------- low rank


def svd_lowrank(A: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Plain truncated SVD of A: the baseline the whitened version must beat."""
    U, s, Vh = top_svd(A.float(), rank)
    root = s.sqrt()
    return U * root, root[:, None] * Vh


def top_svd(A: Tensor, rank: int, oversample: int = 32, power_iters: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    """The top RANK singular triplets (U, s, Vh) of A.

    A full SVD costs O(m·n·min(m, n)) and took most of a 1.5B block's compress time; only r ≪ min(m, n) triplets
    are used. Randomized subspace iteration (Halko, Martinsson and Tropp 2011) gets them in O(m·n·(r + p)) per
    pass, re-orthonormalised each pass so flat spectra (quantization residuals) converge too. The sketch is seeded,
    so the result is a pure function of A. Small or near-square-rank problems take the exact SVD.
    """
    m, n = A.shape
    k = rank + oversample
    if 4 * k >= min(m, n):
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        return U[:, :rank], s[:rank], Vh[:rank]
    g = torch.Generator(device=A.device).manual_seed(0)
    Q = torch.linalg.qr(A @ torch.randn(n, k, generator=g, device=A.device, dtype=A.dtype)).Q
    for _ in range(power_iters):
        Q = torch.linalg.qr(A @ torch.linalg.qr(A.T @ Q).Q).Q
    Ub, s, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)
    return (Q @ Ub)[:, :rank], s[:rank], Vh[:rank]


def whitened_lowrank(A: Tensor, fac: HessianFactor, rank: int, AS: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Best rank-r approximation of A in the H-norm: L·R = trunc_r(A·S)·S⁻¹ (SVD-LLM). AS: A·S where the caller
    has it (out·in² FLOPs: on an 8960-wide down_proj as much as the SVD and the LDLQ together)."""
    U, s, Vh = top_svd(A.float() @ fac.S if AS is None else AS, rank)
    root = s.sqrt()
    L = U * root
    # R = √Σ Vᵀ S⁻¹, i.e. solve Rᵀ from Sᵀ Rᵀ = (√Σ Vᵀ)ᵀ
    R = torch.linalg.solve_triangular(fac.S.T, (root[:, None] * Vh).T, upper=True).T
    return L, R


# ---------------------------------------------------------------- quantizers


@dataclass
class Quantized:
    """A matrix on a grid: the values the model computes with and the bytes that store them."""

    values: Tensor
    raw: Tensor | None  # uint8 ggml blocks; None for f16
    fmt: str


def cast_f16(W: Tensor) -> Quantized:
    return Quantized(W.half().float(), None, "f16")


def rtn(W: Tensor, grid: Format, importance: Tensor | None = None) -> Quantized:
    """Round to nearest with importance-weighted scale search: the baseline LDLQ must beat."""
    values, raw = grid.quantize_rtn(W.float(), importance)
    return Quantized(values, raw, grid.name)


def ldlq(W: Tensor, fac: HessianFactor, grid: Format, lazy: int = 128) -> Quantized:
    """LDLQ / GPTQ: round one column at a time and feed its error forward through chol(H⁻¹).

    Block scales are chosen when the block's first column is reached, from the error-updated weights; the
    super-block scales (d, dmin) come from the weights before rounding. The error goes forward in three tiers, as
    GPTQ's lazy batch updates do: column by column inside a block, one matrix product per block into the rest of
    its panel of LAZY columns, one per panel into the rest of the matrix. Each panel is held transposed, so every
    per-column step reads and writes contiguous rows. The i-quants take `block_ldlq`: a codeword spans 8 columns,
    so 8 are rounded at once and their error fed forward together.
    """
    if grid.block_ldlq:
        return block_ldlq(W, fac, grid, lazy)
    W = W.float().clone()
    out, n = W.shape
    B, SB = grid.block, grid.super_block
    lazy = max(B, lazy - lazy % B)
    diag = torch.diagonal(fac.H).float()
    importance = diag.repeat(out).reshape(-1, SB) if grid.super_block > 1 else None
    sup = grids.fit_super(grid, W.reshape(-1, SB), importance)
    levels = torch.empty(n, out, dtype=torch.float32, device=W.device)  # transposed, as the panels are
    Q = torch.empty(n, out, dtype=torch.float32, device=W.device)
    block_codes = torch.empty(out, n // B, 2, dtype=torch.int64, device=W.device)
    U = fac.U
    rows = torch.arange(out, device=W.device)
    for i1 in range(0, n, lazy):
        i2 = min(i1 + lazy, n)
        P = W[:, i1:i2].T.contiguous()  # [panel, out]
        E = torch.empty_like(P)
        U1 = U[i1:i2, i1:i2]
        for b1 in range(0, i2 - i1, B):
            b2, j = b1 + B, i1 + b1
            fit = grids.fit_block(grid, P[b1:b2].T.contiguous(), sup[(rows * n + j) // SB], diag[j : j + B])
            block_codes[:, j // B] = fit.codes.to(torch.int64)
            rounder = grids.Rounder(grid, fit.scale, fit.offset)
            for i in range(b1, b2):
                levels[i1 + i] = rounder.levels(P[i])  # the codes are levels + zero: formed once, at the end
                q = rounder.values(levels[i1 + i], Q[i1 + i])
                torch.div(P[i] - q, U1[i, i], out=E[i])
                P[i + 1 : b2].addr_(U1[i, i + 1 : b2], E[i], alpha=-1.0)
            P[b2:].addmm_(U1[b1:b2, b2:].T, E[b1:b2], alpha=-1.0)
        W[:, i2:].addmm_(E.T, U[i1:i2, i2:], alpha=-1.0)
    codes = (levels.T + grid.zero).to(torch.uint8)
    raw = grids.pack(grid, codes.reshape(-1, SB), block_codes.reshape(-1, 2), sup)
    return Quantized(Q.T.contiguous(), raw, grid.name)


def block_ldlq(W: Tensor, fac: HessianFactor, grid: lattice.Lattice, lazy: int = 128) -> Quantized:
    """Block LDLQ: round `group` columns at a time and feed their error forward through chol(H⁻¹) = U.

    For a group G with error Δ (the current weights minus their rounding), the weights after it are corrected by
    E·U[G, after] with E = Δ·U[G, G]⁻¹, the optimal compensation for the group's error under H (GPTQ's update with
    a block of columns in place of one). Codewords are searched with per-weight importance diag(U[G,G]ᵀU[G,G])⁻¹,
    the diagonal of the metric that error is scored in. Sub-scales are chosen as each sub-block is reached, from
    the error-updated weights weighted by diag(H); d from the weights before rounding.
    """
    lattice.check(grid, W)
    H, U = fac.H, fac.U
    W = W.to(torch.float32).clone()
    out, n = W.shape
    G, B = grid.group, grid.block
    lazy = max(B, lazy - lazy % B)
    diag = torch.diagonal(H).to(torch.float32)
    sc = lattice.fit_scales(grid, W, diag)
    codes = lattice.Codes.empty(grid, out, n, sc.d)
    Q = torch.empty_like(W)
    Ub = U.unfold(0, G, G).unfold(1, G, G).diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # [n/G, G, G] diagonal blocks
    Ub_inv = torch.linalg.solve_triangular(Ub, torch.eye(G).expand_as(Ub), upper=True)
    metric = torch.diagonal(Ub_inv @ Ub_inv.transpose(1, 2), dim1=1, dim2=2)  # diag((U_GGᵀ U_GG)⁻¹)
    a = torch.empty(0)
    for i1 in range(0, n, lazy):
        i2 = min(i1 + lazy, n)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for g in range(0, i2 - i1, G):
            j = i1 + g
            if j % B == 0:
                a, s = lattice.choose_scale(grid, W1[:, g : g + B], sc.d[:, j // grid.super_block],
                                            sc.s[:, j // B], diag[j : j + B])
                codes.put_scale(grid, j, a, s)
            r = lattice.round_group(grid, W1[:, g : g + G], a, metric[j // G])
            codes.put(grid, j, r)
            q = a.unsqueeze(-1) * r.q
            Q[:, j : j + G] = q
            E = (W1[:, g : g + G] - q) @ Ub_inv[j // G]
            W1[:, g + G :] -= E @ U1[g : g + G, g + G :]
            E1[:, g : g + G] = E
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Quantized(Q, lattice.pack(grid, codes), grid.name)


def quantize_factor(M: Tensor, fmt: str, importance: Tensor | None = None) -> Quantized:
    """Put a low-rank factor on its grid: f16 cast, or RTN weighted by the diagonal of the H its error sees.

    LDLQ buys nothing here: at 4+ bits the factors' rounding error is far below Q's (measured on SmolLM2).
    """
    if fmt == "f16":
        return cast_f16(M)
    return rtn(M, grids.get_grid(fmt), importance)


# ---------------------------------------------------------------- LPLR and CALDERA


@dataclass
class LowRank:
    L: Quantized
    R: Quantized

    @property
    def product(self) -> Tensor:
        return self.L.values @ self.R.values


def lplr(A: Tensor, fac: HessianFactor, rank: int, lr_format: str, iters: int) -> LowRank:
    """Low-precision low-rank fit of A: whitened init, then alternate L and R solves, each rounded to its grid.

    R's rounding is weighted by diag(H), L's by diag(R·H·Rᵀ), the H that each one's error sees. The best iterate
    by H-weighted error is kept.
    """
    A = A.float()
    AS = A @ fac.S  # ‖L·R − A‖²_H = ‖L·(R·S) − A·S‖²_F: each candidate then costs r·n² + m·r·n, not m·n²
    L0, R0 = whitened_lowrank(A, fac, rank, AS)
    if lr_format == "f16":
        return LowRank(cast_f16(L0), cast_f16(R0))
    eye = torch.eye(rank, device=A.device)
    diag_h = torch.diagonal(fac.H)
    Rq = quantize_factor(R0, lr_format, diag_h)
    best, best_err = None, float("inf")
    for _ in range(max(1, iters)):
        HR = Rq.values @ fac.H
        G = HR @ Rq.values.T
        Lq = quantize_factor(solve_gram(G, HR @ A.T, eye).T, lr_format, torch.diagonal(G))
        best, best_err = _keep_best(best, best_err, LowRank(Lq, Rq), AS, fac.S)
        Rq = quantize_factor(solve_gram(Lq.values.T @ Lq.values, Lq.values.T @ A, eye), lr_format, diag_h)
        best, best_err = _keep_best(best, best_err, LowRank(Lq, Rq), AS, fac.S)
    return best if best is not None else LowRank(quantize_factor(L0, lr_format), quantize_factor(R0, lr_format))


def solve_gram(G: Tensor, B: Tensor, eye: Tensor) -> Tensor:
    """X with (G + δI)·X = B for a Gram matrix G (r×r), δ = 1e-6·mean(diag G).

    A factor rounded to its grid can lose whole rows (a q4_0 row of tiny values becomes zeros), and on Qwen2.5's
    wide-range layers G was then singular even after the damping: such a G falls back to least squares
    through the pseudo-inverse: the minimum-norm solution, zeros for the lost directions.
    """
    G = G + 1e-6 * torch.trace(G) / G.shape[0] * eye
    X, info = torch.linalg.solve_ex(G, B)
    if int(info) == 0 and bool(torch.isfinite(X).all()):
        return X
    G = torch.nan_to_num(G.double(), nan=0.0, posinf=0.0, neginf=0.0)
    X = torch.linalg.pinv(G, hermitian=True) @ torch.nan_to_num(B.double(), nan=0.0, posinf=0.0, neginf=0.0)
    return X.float()


def _keep_best(best: LowRank | None, best_err: float, cand: LowRank, AS: Tensor, S: Tensor) -> tuple[LowRank, float]:
    D = (cand.L.values @ (cand.R.values @ S)).sub_(AS)
    err = float(D.square_().sum(dtype=torch.float64))
    return (cand, err) if err < best_err else (best, best_err)


@dataclass
class Decomposition:
    """The result for one linear: Q (or None), L·R (or None) and the error history."""

    Q: Quantized | None
    LR: LowRank | None
    error: float
    history: list[float] = field(default_factory=list)

    def values(self, shape: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
        W = torch.zeros(shape, device=device)
        if self.Q is not None:
            W += self.Q.values
        if self.LR is not None:
            W += self.LR.product
        return W


def caldera(
    W: Tensor, fac: HessianFactor, grid: Format, rank: int, lr_format: str, iters: int, lplr_iters: int
) -> Decomposition:
    """CALDERA: from L·R = 0 alternate Q ← LDLQ(W − L·R) and (L, R) ← LPLR(W − Q); keep the best iterate."""
    W = W.float()
    LR: LowRank | None = None
    best: Decomposition | None = None
    history: list[float] = []
    norm = h_error(W, fac.H)
    for _ in range(max(1, iters)):
        target = W if LR is None else W - LR.product
        Q = ldlq(target, fac, grid)
        LR = lplr(W - Q.values, fac, rank, lr_format, lplr_iters)
        err = h_error(Q.values + LR.product - W, fac.H) / norm if norm > 0 else 0.0
        if best is None or err < best.error:
            best = Decomposition(Q, LR, err)
        history.append(best.error)
    best.history = history
    return best


METHODS = ("caldera", "ldlq", "lowrank", "rtn")


def decompose(
    W: Tensor,
    fac: HessianFactor,
    method: str,
    q_format: str | None,
    rank: int,
    lr_format: str,
    iters: int = 5,
    lplr_iters: int = 5,
    whiten: bool = True,
) -> Decomposition:
    """Dispatch one linear to its method; the error is always the relative H-weighted error."""
    W = W.float()
    Q: Quantized | None = None
    LR: LowRank | None = None
    if method == "caldera" and rank:
        return caldera(W, fac, grids.get_grid(q_format), rank, lr_format, iters, lplr_iters)
    if method == "rtn":
        Q = rtn(W, grids.get_grid(q_format), torch.diagonal(fac.H))
    elif method in ("ldlq", "caldera"):  # caldera at rank 0 is LDLQ alone
        Q = ldlq(W, fac, grids.get_grid(q_format))
    elif method == "lowrank":
        if whiten:
            LR = lplr(W, fac, rank, lr_format, lplr_iters)
        else:
            L, R = svd_lowrank(W, rank)
            LR = LowRank(quantize_factor(L, lr_format), quantize_factor(R, lr_format))
    else:
        raise ValueError(f"unknown method {method!r}")
    d = Decomposition(Q, LR, 0.0)
    d.error = rel_error(d.values(tuple(W.shape), W.device), W, fac.H)
    return d


def linear_tensors(full: str, d: Decomposition, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The artifact tensors of one compressed linear."""
    out: dict[str, torch.Tensor] = {}
    if d.Q is not None:
        out[f"{full}.q"] = d.Q.raw.cpu().contiguous()
    if d.LR is not None:
        for key, part in (("lora_l", d.LR.L), ("lora_r", d.LR.R)):
            out[f"{full}.{key}"] = (part.values.half() if part.raw is None else part.raw).cpu().contiguous()
    if bias is not None:
        out[f"{full}.bias"] = bias.cpu().contiguous()
    return out


def linear_bytes(tensors: dict[str, torch.Tensor], full: str) -> int:
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(full + ".") and
               not k.endswith(".bias"))
