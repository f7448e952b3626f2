"""fp16 as ggml stores scales: rounding to it, its bit patterns, its little-endian bytes."""

from __future__ import annotations

import torch
from torch import Tensor

FP16_MAX = 65504.0


def round_fp16(t: Tensor) -> Tensor:
    """Round to the nearest fp16 (kept as float32), the precision ggml stores d/dmin in."""
    return t.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)


def fp16_bits(t: Tensor) -> Tensor:
    return t.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF


def fp16_neighbours(t: Tensor) -> list[Tensor]:
    """The fp16 values just below and above t (t already fp16-exact); non-finite results fall back to t."""
    bits = t.to(torch.float16).view(torch.int16)
    out = []
    for delta in (-1, 1):
        nb = (bits.to(torch.int32) + delta).clamp(-32768, 32767).to(torch.int16).view(torch.float16).to(torch.float32)
        out.append(torch.where(torch.isfinite(nb) & (t != 0), nb, t))
    return out


def half_bytes(t: Tensor) -> Tensor:
    """[n] float32 (fp16-exact) -> [n, 2] little-endian fp16 bytes."""
    bits = fp16_bits(t)
    return torch.stack([bits & 0xFF, bits >> 8], -1).to(torch.uint8)


def bytes_half(b: Tensor) -> Tensor:
    """[n, 2] little-endian fp16 bytes -> [n] float32."""
    bits = b[:, 0].to(torch.int32) | (b[:, 1].to(torch.int32) << 8)
    bits = torch.where(bits >= 32768, bits - 65536, bits)
    return bits.to(torch.int16).view(torch.float16).to(torch.float32)
