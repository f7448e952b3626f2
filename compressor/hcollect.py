"""H = XᵀX/n of each linear's calibration inputs, collected from a decoder block's forward passes.

Three ways, all in float32: `collect_h` hooks every linear wanted and runs the block once (teacher inputs: nothing is
swapped); `hook_h` hooks one group at a time while the caller swaps compressed linears in (the reference for student
inputs, on any architecture); `staged_h` reuses one attention pass per block on llama-shaped blocks, where the
registry (compressor/arch.py) allows it and tests hold it equal to `hook_h`.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from lrdeploy.compressor.rotate import input_of


class _Stop(Exception):
    """Raised by a hook to end a block's forward once the wanted input is captured."""


PANEL = 1536  # columns per panel of the symmetric update; narrower Grams take one plain GEMM


def gram_add(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """total += xᵀx for x (n, d), or a new one when total is None. Wide Grams compute only the panels on and above
    the diagonal (about half the flops: on an 8960-wide down_proj input, XᵀX is most of the time H collection
    takes); `gram_done` mirrors them into the lower triangle once all batches are in."""
    d = x.shape[1]
    if total is None:
        total = torch.zeros(d, d, device=x.device, dtype=torch.float32)
    if d <= 2 * PANEL:
        return total.addmm_(x.T, x)
    for i in range(0, d, PANEL):
        total[i : i + PANEL, i:].addmm_(x[:, i : i + PANEL].T, x[:, i:])
    return total


def gram_done(total: torch.Tensor) -> torch.Tensor:
    """The full symmetric Gram from what gram_add accumulated (in place; exactly symmetric afterwards)."""
    d = total.shape[0]
    if d > 2 * PANEL:
        for i in range(0, d - PANEL, PANEL):
            total[i + PANEL :, i : i + PANEL].copy_(total[i : i + PANEL, i + PANEL :].T)
    return total


class HCollector:
    """Accumulates XᵀX over calibration batches from a forward pre-hook."""

    def __init__(self, dim: int, device: torch.device):
        self.sum = torch.zeros(dim, dim, device=device, dtype=torch.float32)
        self.n = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = input_of(module, args[0].reshape(-1, args[0].shape[-1]).float())  # what the weight multiplies
        gram_add(self.sum, x)
        self.n += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        return gram_done(self.sum) / max(self.n, 1)


def run_block(block: nn.Module, x: torch.Tensor, ctx: dict, batch: int) -> torch.Tensor:
    """Apply one decoder block to all calibration sequences, batch by batch."""
    with torch.no_grad():
        return torch.cat([block(x[i : i + batch], **ctx) for i in range(0, len(x), batch)])


def collect_h(block: nn.Module, names: tuple[str, ...], x: torch.Tensor, ctx: dict,
              batch: int) -> dict[str, torch.Tensor]:
    """H for the inputs of NAMES in one forward pass of BLOCK over all calibration batches."""
    hooks, collectors = [], {}
    for name in names:
        module = block.get_submodule(name)
        c = HCollector(module.in_features, x.device)
        collectors[name] = c
        hooks.append(module.register_forward_pre_hook(c))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                block(x[i : i + batch], **ctx)
    finally:
        for h in hooks:
            h.remove()
    return {name: c.H for name, c in collectors.items()}


def release_freed_memory() -> None:
    """Hand memory that Python and torch freed back to the OS (glibc only; elsewhere nothing to do).

    glibc keeps freed chunks below its mmap threshold (which grows to 32 MB as big tensors come and go) in the
    heap. On a 1.5B model the activations and H of one block leave ~0.6 GB there per block, which the next block's
    largest factorisation would stack on; trimming before each group kept the peak flat.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, loaded once; None off Linux or on another libc (which returns freed memory itself)."""
    if platform.system() != "Linux":
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def hook_h(block: nn.Module, groups: tuple[tuple[str, ...], ...], x: torch.Tensor, ctx: dict,
           batch: int) -> Iterator[torch.Tensor]:
    """H of each group in turn: what the group's first linear really receives, recorded by a forward hook.

    The caller swaps a group's compressed linears into BLOCK before asking for the next H, so each H sees the
    compressed linears before it. The reference for every architecture: it assumes nothing about the block's
    layout. Each pass stops at the hooked linear, so the last group costs one whole forward and the first almost none.
    """
    for group in groups:
        module = block.get_submodule(group[0])
        c = HCollector(module.in_features, x.device)

        def record(m: nn.Module, args: tuple, c: HCollector = c) -> None:
            c(m, args)
            raise _Stop

        handle = module.register_forward_pre_hook(record)
        try:
            with torch.no_grad():
                for i in range(0, len(x), batch):
                    try:
                        block(x[i : i + batch], **ctx)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        yield c.H


def staged_h(block: nn.Module, x: torch.Tensor, ctx: dict, batch: int) -> Iterator[torch.Tensor]:
    """H of each group of a llama-shaped block in turn, from the block's own forward as its linears get compressed.

    The caller swaps a group's compressed linears into BLOCK before asking for the next H. Each stage reuses the
    activations of the one before (x + o(attn(norm x)), then + down(act(gate g) * up g)), so attention runs once
    per block instead of once per group. Valid only where the registry says so (Arch.staged_h): a block with
    sandwich norms or fused linears would get a wrong H with no error, so those take hook_h.
    """
    parts = range(0, len(x), batch)
    with torch.no_grad():
        yield _h_of(block.input_layernorm(x[i : i + batch]) for i in parts)
        attn_in = [collect_input(block.self_attn, "o_proj", block.input_layernorm(x[i : i + batch]), ctx)
                   for i in parts]
        yield _h_of(attn_in)
        g = [block.post_attention_layernorm(x[i : i + batch] + block.self_attn.o_proj(a))
             for i, a in zip(parts, _drain(attn_in), strict=True)]
        yield _h_of(g)
        mlp = block.mlp  # each chunk is dropped once used: down_proj's H is factored with no activations left
        yield _h_of(input_of(mlp.down_proj, mlp.act_fn(mlp.gate_proj(t)) * mlp.up_proj(t)) for t in _drain(g))


def _drain(items: list) -> Iterator:
    """The items of a list, front to back, each removed as it is handed out (so it is freed once used)."""
    items.reverse()
    while items:
        yield items.pop()


def _h_of(chunks: Iterable[torch.Tensor]) -> torch.Tensor:
    """XᵀX/n over activation chunks (…, d), accumulated in float32."""
    total, n = None, 0
    for t in chunks:
        t = t.reshape(-1, t.shape[-1]).float()
        total = gram_add(total, t)
        n += t.shape[0]
    return gram_done(total).div_(max(n, 1))


def collect_input(module: nn.Module, child: str, x: torch.Tensor, ctx: dict) -> torch.Tensor:
    """The input that MODULE's submodule CHILD receives when MODULE runs on X; the forward stops there."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise _Stop

    handle = module.get_submodule(child).register_forward_pre_hook(hook)
    try:
        module(hidden_states=x, **ctx)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]
