"""Incoherence processing that stock runtimes execute: a randomized Hadamard rotation folded into the weights.

CALDERA and QuIP# multiply each weight by random Hadamard transforms on both sides before quantizing, and undo them
at run time with kernels that llama.cpp and onnxruntime don't have. Most of the benefit needs no runtime op: the
residual stream of a llama-family decoder is invariant under an orthogonal change of basis Q once every RMSNorm's
weight g is folded into the linears that read it (the computational invariance of SliceGPT, QuaRot, SpinQuant).
With column vectors and h' = Qᵀh, RMSNorm(h') = Qᵀ·RMSNorm(h)/g, so

- the embedding's rows e become eQ (E → E·Q);
- each linear that reads a norm's output (q, k, v after input_layernorm; gate, up after post_attention_layernorm;
  the lm_head after the final norm) becomes W·diag(g)·Q, and that norm's weight becomes ones;
- each linear that writes the residual (o_proj, down_proj) becomes Qᵀ·W, and its bias Qᵀ·b.

`residual+head` also rotates each attention head's value space by one orthogonal Qh of head_dim: v_proj's rows per
KV head become Qhᵀ·W_v (and its bias), o_proj's columns per query head W_o·Qh. Attention mixes tokens, not the
channels within a head, so this is exact too (a GQA head's query heads all read the same rotated values).

The rotated model is an ordinary model: its exports run in stock llama.cpp and onnxruntime. No rotation matrix is
stored; the artifact records the kind and the seed. The lm_head reads the final norm, so it becomes W·diag(g)·Q while
the embedding becomes E·Q: a tied model is untied (the head is stored on its own, and the manifest's output_bytes say
what that costs).

The matrix. Hadamard matrices exist only in orders 1, 2 and multiples of 4, and llama-family widths are not all
powers of two (SmolLM2 576 = 12²·4, Qwen2.5-1.5B 1536 = 12·128). Q = (H_2^a ⊗ P12^b ⊗ R_m)·diag(s)/√n: Sylvester's
H for the power of two, Paley's construction (q = 11) for each factor 12, a seeded Haar-random orthogonal R for an
odd remainder m if one is left (896 = 7·128 gets a 7×7 one), and seeded random signs s. Every factor but R spreads
each input over all outputs with equal weight, which is what flattens outliers; R keeps Q orthogonal at any width.
Everything is computed in float64 and handed out as float32.

`--rotate-down` is the one rotation that does not fold: down_proj reads the SwiGLU product, which no linear writes
directly, so rotating its input needs an op at run time. x·B with B = diag(Hb, …, Hb), one randomized Hadamard Hb
of width DOWN_BLOCK (or the largest power of two dividing the width, if smaller) repeated along the diagonal:
down_proj's weight becomes W·B and every runtime that runs the artifact computes W·B applied to x·B = W·x. A block of
256 mixes each 256-weight super-block of a row within itself (the unit a K- or i-quant scales), costs 256 MACs per
input (44% of down_proj's own on SmolLM2, 17% on Qwen2.5-1.5B) and is one Reshape-MatMul-Reshape in ONNX. llama.cpp
has no such op: an artifact made with it exports to ONNX only, and the GGUF exporter refuses it.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lrdeploy.compressor import arch as archs
from lrdeploy.compressor.embeddings import CHUNK_ROWS, EMBED, HEAD
from lrdeploy.errors import LrdError

KINDS = ("none", "residual", "residual+head")
FINAL_NORM = "model.norm.weight"
DOWN = archs.DOWN
DOWN_BLOCK = 256
MANIFEST_KEY = "rotate_down"  # the manifest's record of an online down_proj rotation: {"block": b, "seed": s}


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise LrdError(f"unknown --rotate '{kind}'; choose one of {', '.join(KINDS)}")


def paley12() -> torch.Tensor:
    """The 12×12 Hadamard matrix of Paley's first construction with q = 11 (q ≡ 3 mod 4)."""
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    jac = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
    return torch.eye(q + 1, dtype=torch.float64) + s


def factors(n: int) -> tuple[int, int, int]:
    """n = 2^a · 12^b · m with m odd: as many 12s as the threes and twos allow, then the rest of the twos."""
    if n < 1:
        raise LrdError(f"cannot rotate a width of {n}")
    a = (n & -n).bit_length() - 1
    m, b = n >> a, 0
    while m % 3 == 0 and a >= 2:
        m, a, b = m // 3, a - 2, b + 1
    return a, b, m


def orthogonal(n: int, seed: int) -> torch.Tensor:
    """The randomized Hadamard rotation of width N for SEED (see the module docstring), float64, orthogonal."""
    a, b, m = factors(n)
    g = torch.Generator().manual_seed(seed)
    mat = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(a):
        mat = torch.kron(mat, h2)
    for _ in range(b):
        mat = torch.kron(mat, paley12())
    mat = mat / mat.shape[0] ** 0.5
    if m > 1:
        z = torch.randn(m, m, generator=g, dtype=torch.float64)
        qr, r = torch.linalg.qr(z)
        mat = torch.kron(mat, (qr * torch.sign(torch.diagonal(r))).contiguous())  # Haar: QR leaves signs free
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return mat * signs  # Q·diag(s): column j scaled by s_j


@dataclass(frozen=True)
class Rotation:
    kind: str
    seed: int
    Q: torch.Tensor  # hidden × hidden
    Qh: torch.Tensor | None  # head_dim × head_dim (residual+head)

    @classmethod
    def make(cls, kind: str, seed: int, config) -> Rotation:
        check_kind(kind)
        hidden = config.hidden_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        Qh = orthogonal(head_dim, seed + 1) if kind == "residual+head" else None
        return cls(kind, seed, orthogonal(hidden, seed), Qh)


class RotatedSource:
    """A model source whose tensors come out rotated (see the module docstring); everything else is BASE's."""

    def __init__(self, base, kind: str, seed: int) -> None:
        self.family = archs.get(base.config)
        if not self.family.rotatable:
            raise LrdError(f"--rotate is not supported for {self.family.name}: its sandwich norms sit between the "
                           "linears and the residual stream, so no rotation folds into the weights; use --rotate none")
        self.reads = self.family.reads
        self.value, self.value_row = self.family.value_rows(base.config)
        self.base = base
        self.rotation = Rotation.make(kind, seed, base.config)
        self.source_config = base.config
        self.config = copy.deepcopy(base.config)
        self.config.tie_word_embeddings = False  # the head carries the final norm, the embedding does not
        self._norms: dict[str, torch.Tensor] = {}

    def __getattr__(self, name: str):  # spec, kind, path, n_layers, arch, tokenizer, digest, ...
        return getattr(self.base, name)

    def names(self) -> list[str]:
        names = self.base.names()
        return names if HEAD in names else [*names, HEAD]

    def has(self, name: str) -> bool:
        return name == HEAD or self.base.has(name)

    def save_meta(self, out: Path) -> None:
        self.config.save_pretrained(str(out))
        self.base.tokenizer().save_pretrained(str(out))

    def _norm(self, name: str) -> torch.Tensor:
        if name not in self._norms:
            self._norms[name] = self.base.tensor(name).double()
        return self._norms[name]

    def tensor(self, name: str) -> torch.Tensor:
        return self._rotate(name, lambda n: self.base.tensor(n)).float()

    def stored(self, name: str) -> torch.Tensor:
        """As the source would store it, rotated: float tensors keep the source's float type (float32 for a GGUF)."""
        w = self.base.stored(name if name != HEAD or self.base.has(HEAD) else EMBED)
        return self.tensor(name).to(w.dtype if w.is_floating_point() else torch.float32)

    def native(self, name: str) -> tuple[str | None, torch.Tensor]:
        """Rotated values lie on no ggml grid: `source` means float16 for them (built chunk by chunk: a 151,936-row
        vocabulary in float64 would be 1.9 GB)."""
        if name in (EMBED, HEAD):
            return None, torch.cat([c.half() for c in self.row_chunks(name, CHUNK_ROWS)])
        return None, self.tensor(name).half()

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        picked = self.base.rows(name, index)
        return self._apply(name, picked.reshape(-1, picked.shape[-1])).reshape(picked.shape).float()

    def row_chunks(self, name: str, rows: int):
        src = name if name != HEAD or self.base.has(HEAD) else EMBED
        for chunk in self.base.row_chunks(src, rows):
            yield self._apply(name, chunk).float()

    def _rotate(self, name: str, get) -> torch.Tensor:
        if name == FINAL_NORM or (name.endswith(".weight") and name.rsplit(".", 2)[-2] in self.reads):  # folded
            return torch.ones_like(self.base.tensor(name))
        if name == HEAD and not self.base.has(HEAD):
            return self._apply(HEAD, get(EMBED))
        return self._apply(name, get(name))

    def _apply(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """NAME's tensor W (float, any float type) rotated, in float64."""
        Q, Qh = self.rotation.Q, self.rotation.Qh
        w = w.double()
        if name == EMBED:
            return w @ Q
        if name == HEAD:
            return (w * self._norm(FINAL_NORM)) @ Q
        if not name.startswith("model.layers."):
            return w
        prefix, rest = name.split(".", 3)[:3], name.split(".", 3)[3]
        layer = ".".join(prefix) + "."
        module, kind = rest.rsplit(".", 1)
        for norm, readers in self.reads.items():
            if module in readers and kind == "weight":
                w = (w * self._norm(layer + norm + ".weight")) @ Q
        if Qh is not None and module == self.value:  # v_proj's rows, or the value rows of a fused qkv
            w = torch.cat([w[: self.value_row], _per_head(w[self.value_row :], Qh.T, rows=True)])
        if module in self.family.writes:
            if Qh is not None and module == "self_attn.o_proj" and kind == "weight":
                w = _per_head(w, Qh, rows=False)
            w = Q.T @ w
        return w


def _per_head(w: torch.Tensor, Qh: torch.Tensor, rows: bool) -> torch.Tensor:
    """Qh applied per head: to each head's block of rows (Qh·W_block) or of columns (W_block·Qh); a bias is a row."""
    d = Qh.shape[0]
    if rows:
        shape = w.shape
        blocks = w.reshape(shape[0] // d, d, -1)
        return (Qh @ blocks).reshape(shape)
    out, cols = w.shape
    return (w.reshape(out, cols // d, d) @ Qh).reshape(out, cols)


@dataclass(frozen=True)
class InputRotation:
    """x → x·B, B = diag(Hb, …, Hb) with Hb = orthogonal(block, seed): an online rotation of a linear's input (see the
    module docstring). The weight that reads the rotated input is W·B (`weight`), its H is Bᵀ·H·B (`h`)."""

    block: int
    seed: int

    @classmethod
    def for_width(cls, width: int, seed: int) -> InputRotation:
        block = min(DOWN_BLOCK, width & -width)  # the largest power of two dividing WIDTH, at most DOWN_BLOCK
        if block < 2:
            raise LrdError(f"--rotate-down needs an even down_proj input width; this model's is {width}")
        return cls(block, seed)

    @classmethod
    def for_down(cls, config, seed: int) -> InputRotation:
        """down_proj's rotation for --rotate-seed SEED (SEED gives Q, SEED + 1 Qh, SEED + 2 this one)."""
        return cls.for_width(config.intermediate_size, seed + 2)

    @classmethod
    def from_record(cls, rec: object) -> InputRotation | None:
        """The rotation a manifest records (None: none), or an error for a broken record."""
        if rec is None:
            return None
        ok = isinstance(rec, dict) and all(isinstance(rec.get(k), int) and not isinstance(rec.get(k), bool)
                                           for k in ("block", "seed"))
        if not ok or rec["block"] < 2 or rec["block"] & (rec["block"] - 1):
            raise LrdError(f"bad '{MANIFEST_KEY}' record in the manifest: {rec!r}")
        return cls(rec["block"], rec["seed"])

    def record(self) -> dict:
        return {"block": self.block, "seed": self.seed}

    @property
    def matrix(self) -> torch.Tensor:
        return _block_matrix(self.block, self.seed)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x·B over the last axis, in x's dtype (float64 inputs stay float64)."""
        hb = _block_matrix(self.block, self.seed, x.dtype, x.device)
        return (x.reshape(*x.shape[:-1], -1, self.block) @ hb).reshape(x.shape)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """W·B: each row is an input-space vector."""
        return self.apply(w)

    def h(self, H: torch.Tensor) -> torch.Tensor:
        """Bᵀ·H·B in float64, returned in H's dtype."""
        h = self.apply(self.apply(H.double()).T).T
        return h.to(H.dtype).contiguous()


@functools.cache
def _block_matrix(block: int, seed: int, dtype: torch.dtype = torch.float64,
                  device: torch.device | None = None) -> torch.Tensor:
    """Hb, built once in float64 and cast once per dtype and device: apply() runs in every forward of a down_proj."""
    if dtype == torch.float64 and device is None:
        return orthogonal(block, seed)
    return _block_matrix(block, seed).to(device=device, dtype=dtype)


def input_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What MODULE's weight really multiplies: X, or X rotated where the module carries an InputRotation."""
    rot = getattr(module, "in_rotation", None)
    return x if rot is None else rot.apply(x)


def carry(old: nn.Module, new: nn.Module) -> nn.Module:
    """NEW takes OLD's input rotation (a compressed or trainable linear replacing a rotated one)."""
    rot = getattr(old, "in_rotation", None)
    if rot is not None:
        new.in_rotation = rot
    return new


class InputRotatedLinear(nn.Linear):
    """nn.Linear whose weight reads the rotated input: y = W'·(x·B) + b, W' = W·B (the teacher's down_proj)."""

    in_rotation: InputRotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.in_rotation.apply(x))


def install_down(model: nn.Module, rot: InputRotation | None) -> None:
    """Every layer's down_proj of MODEL (a skeleton or a loaded model) becomes an InputRotatedLinear for ROT."""
    if rot is None:
        return
    for layer in model.model.layers:
        old = layer.get_submodule(DOWN)
        new = InputRotatedLinear(old.in_features, old.out_features, old.bias is not None, device=old.weight.device,
                                 dtype=old.weight.dtype)
        new.in_rotation = rot
        setattr(layer.mlp, DOWN.rsplit(".", 1)[1], new)


class DownRotatedSource:
    """A model source whose down_proj weights come out as W·B for ROT; every other tensor is BASE's unchanged."""

    def __init__(self, base, rot: InputRotation) -> None:
        self.base, self.rotation_down = base, rot

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    @staticmethod
    def _is_down(name: str) -> bool:
        return name.startswith("model.layers.") and name.endswith(f".{DOWN}.weight")

    def tensor(self, name: str) -> torch.Tensor:
        w = self.base.tensor(name)
        return self.rotation_down.weight(w.double()).float() if self._is_down(name) else w

    def stored(self, name: str) -> torch.Tensor:
        return self.tensor(name) if self._is_down(name) else self.base.stored(name)

    def native(self, name: str) -> tuple[str | None, torch.Tensor]:
        return (None, self.tensor(name).half()) if self._is_down(name) else self.base.native(name)
