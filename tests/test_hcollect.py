"""The staged H (one forward per block, reused across groups) equals the H the linears really see (forward hooks)."""

from __future__ import annotations

import pytest
import torch

from lrdeploy.compressor.driver import block_context, collect_h, materialize, rotary, staged_h
from lrdeploy.compressor.model import LINEAR_GROUPS, layer_prefix, skeleton
from lrdeploy.compressor.sources import open_source


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_staged_h_equals_hook_h(fixture, request):
    src = open_source(str(request.getfixturevalue(fixture)))
    model = skeleton(src.config)
    torch.manual_seed(0)
    x = torch.randn(6, 32, src.config.hidden_size)
    rot = rotary(model, torch.device("cpu"))
    ctx = block_context(model, x[:4], rot)
    block = materialize(model.model.layers[1], layer_prefix(1), src.tensor, torch.device("cpu"))
    firsts = tuple(g[0] for g in LINEAR_GROUPS)
    hooked = collect_h(block, firsts, x, ctx, 4)  # batches of 4 and 2: the last batch is a short one
    staged = list(staged_h(block, x, ctx, 4))
    assert len(staged) == len(firsts) == 4
    for name, H in zip(firsts, staged, strict=True):
        torch.testing.assert_close(H, hooked[name], rtol=1e-5, atol=1e-6)
        assert H.shape == (block.get_submodule(name).in_features,) * 2
