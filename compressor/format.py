"""What every ggml block format lrdeploy writes answers, whichever family it belongs to.

Two families implement it, each one class with a table of its formats: the K-quants and legacy formats
(`grids.Grid`: q2_k, q3_k, q4_k, q4_0, q8_0) and the i-quants (`lattice.Lattice`: iq2_xxs … iq4_xs). Callers look a
format up with `grids.get_grid(name)` and use what it answers; none of them tests a name or a class. Adding a format
to a family means one row of its table (plus, for a new byte layout, its packer and parser beside the others).
"""

from __future__ import annotations

from typing import ClassVar

import gguf
import torch
from torch import Tensor


class Format:
    """A ggml block format: sizes as ggml declares them, and what the compressor, exporters and inspect ask of it."""

    name: str
    block: int  # weights sharing one scale (a K-quant's or i-quant's sub-block)
    super_block: int  # weights sharing one fp16 d (the block itself for q4_0, q8_0, iq4_nl)
    type_size: int  # bytes per super-block
    ggml_type: gguf.GGMLQuantizationType
    # Byte offsets, within one block, of the fp16 scales it stores (d, and dmin where there is one): what
    # `inspect --verify` checks for NaN/Inf.
    scale_fields: tuple[int, ...]
    # How ONNX Runtime's MatMulNBits holds the format: (bits, shift added to ggml's code, affine), or None for an
    # i-quant, whose values go to MatMulNBits as 8-bit signed levels (no kernel reads a codebook or a level table).
    nbits: tuple[int, int, bool] | None

    block_ldlq: ClassVar[bool] = False
    """Whether LDLQ rounds a group of columns at once (a codeword spans several weights of a row) rather than one
    column at a time: decompose.ldlq picks its algorithm by this."""

    @property
    def bpw(self) -> float:
        """Bits per weight including all scales, as the file size will show."""
        return 8.0 * self.type_size / self.super_block

    @property
    def has_super(self) -> bool:
        """Whether an fp16 d is shared over a 256-weight super-block (K-quants, i-quants but iq4_nl)."""
        return self.super_block != self.block

    def fits(self, shape: tuple[int, ...] | torch.Size, per_row: bool = True) -> str | None:
        """None if a matrix of SHAPE can use this format, otherwise a short reason. PER_ROW demands ggml's row
        layout (no block spans two rows), which GGUF files and the i-quants always demand."""
        raise NotImplementedError

    def quantize_rtn(self, W: Tensor, importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Round W[out, in] to nearest, each squared error weighted by IMPORTANCE ([in] or [out, in]): (the exact
        float32 values, ggml's bytes)."""
        raise NotImplementedError

    def unpack(self, raw: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """ggml's bytes back to the matrix of SHAPE, bit-identical to gguf-py's dequantization."""
        raise NotImplementedError
