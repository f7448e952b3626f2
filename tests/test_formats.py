"""Every ggml format answers the same questions (compressor/format.py), whichever family holds it."""

from __future__ import annotations

import pytest
import torch

from lrdeploy.compressor import grids, lattice
from lrdeploy.compressor.format import Format
from lrdeploy.exporters.onnx import nbits_dequant, nbits_from_ggml
from lrdeploy.exporters.onnx.nbits import NBITS_FORMATS
from lrdeploy.runtime.inspect import gguf_scales

SHAPE = (4, 512)


@pytest.fixture(scope="module")
def weights() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 0.02


@pytest.mark.parametrize("name", list(grids.GRIDS))
def test_format_round_trips_and_sizes(name, weights):
    fmt = grids.get_grid(name)
    assert isinstance(fmt, Format) and fmt.name == name
    assert fmt.fits(SHAPE) is None
    assert fmt.fits((4, 500)) is not None  # 500 % 32 and % 256: no format's blocks tile it
    values, raw = fmt.quantize_rtn(weights)
    assert raw.dtype == torch.uint8 and raw.numel() * 8 == fmt.bpw * weights.numel()
    assert torch.equal(fmt.unpack(raw, SHAPE), values)
    assert 0 < (values - weights).abs().max() < weights.abs().max()


@pytest.mark.parametrize("name", list(grids.GRIDS))
def test_scale_fields_are_the_blocks_fp16_scales(name, weights):
    """A NaN written into any declared scale field spoils exactly the first block's weights, and inspect checks
    the field under the format's ggml type name."""
    fmt = grids.get_grid(name)
    _, raw = fmt.quantize_rtn(weights)
    assert gguf_scales()[fmt.ggml_type.name] == fmt.scale_fields
    for off in fmt.scale_fields:
        assert off + 2 <= fmt.type_size
        bad = raw.clone()
        bad[off], bad[off + 1] = 0x00, 0x7E  # fp16 NaN, little-endian
        spoilt = fmt.unpack(bad, SHAPE).reshape(-1)
        assert spoilt[: fmt.super_block].isnan().all()
        assert not spoilt[fmt.super_block :].isnan().any()


@pytest.mark.parametrize("name", list(grids.GRIDS))
def test_nbits_mapping_is_declared_and_exact(name, weights):
    fmt = grids.get_grid(name)
    values, raw = fmt.quantize_rtn(weights)
    assert (name in NBITS_FORMATS) == (fmt.nbits is not None)
    assert fmt.block_ldlq == (name in lattice.LATTICES)
    for zero_points in ("auto", "uint8", "float"):
        w = nbits_from_ggml(name, raw, SHAPE, zero_points)
        got = torch.from_numpy(nbits_dequant(w))
        if zero_points != "float" or fmt.nbits is None:
            assert torch.equal(got, values)
        else:  # a float zero point misses the offset by an ulp in some blocks
            assert torch.allclose(got, values, rtol=0, atol=1e-7)
