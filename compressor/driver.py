"""The streaming compressor: bottom-first, one decoder block resident, atomic and resumable output.

Work happens in OUT.partial/: base.safetensors (embedding, final norm, head), one shard per finished decoder
block in layers/, head.safetensors for a head rounded with its input importance (after the last block), and
state.json recording what is done. A killed run resumes from its last finished block. When
all blocks are done the shards are merged into model.safetensors, the manifest is written and the directory is
renamed to OUT. Throughout, OUT.lock holds the run's pid: a second run on the same OUT is refused.
"""

from __future__ import annotations

import copy
import functools
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from lrdeploy.artifact import FORMAT, MANIFEST, VERSION, WEIGHTS, LinearEntry, QLRLinear
from lrdeploy.compressor import allocate as alloc
from lrdeploy.compressor import arch as archs
from lrdeploy.compressor import decompose as dec
from lrdeploy.compressor import distill as dst
from lrdeploy.compressor import embeddings as emb
from lrdeploy.compressor import grids, recipe, rotate
from lrdeploy.compressor.model import BlockContext, embed_scale, layer_prefix, materialize, rotary, skeleton
from lrdeploy.compressor.sources import ModelSource
from lrdeploy.compressor.text import calibration_ids, load_text, tokenize
from lrdeploy.errors import LrdError
from lrdeploy.io import atomic_write_json, merge_safetensors, output_lock, replace_dir, sha256_file

TARGETS = ("gguf", "onnx", "any")
INPUTS = ("student", "teacher")
DEFAULT_RANK = {"caldera": 32, "lowrank": 64, "ldlq": 0, "rtn": 0}
DEFAULT_LR_FORMAT = {"caldera": "q4_0", "lowrank": "f16", "ldlq": "f16", "rtn": "f16"}
# What a format falls back to where a tensor's rows hold no whole block of it (SmolLM2's 576-wide rows and 256-weight
# super-blocks). "auto": iq4_nl for GGUF, as llama-quantize does: the same 4.5 bits as q4_0, and its 16 non-uniform
# levels beat q4_0's on SmolLM2 (ldlq perplexity 31.87 against 34.49, uncompressed 30.84); ONNX would hold iq4_nl at
# 8 bits, so the other targets take q4_0. q8_0 is the last resort for either.
FALLBACKS = ("auto", "iq4_nl", "q4_0", "q8_0")


def fallbacks(o: CompressOptions) -> tuple[str, ...]:
    first = o.fallback if o.fallback != "auto" else ("iq4_nl" if o.target == "gguf" else "q4_0")
    return (first, "q8_0") if first != "q8_0" else ("q8_0",)
REFINES = ("none", "distill")


@dataclass
class CompressOptions:
    """Everything that decides the artifact's bytes (recorded in the manifest, compared on resume)."""

    method: str = "caldera"
    q_format: str = "q2_k"
    rank: int | None = None
    lr_format: str | None = None
    iters: int = 2
    lplr_iters: int = 2
    calib: str | None = None
    calib_range: str | None = None
    calib_tokens: int = 16384
    seq_len: int = 512
    seed: int = 0
    device: str = "auto"
    inputs: str = "student"
    target: str = "gguf"
    damp: float = 0.01
    whiten: bool = True
    batch_size: int = 8
    tensor_types: dict[str, str] = field(default_factory=dict)  # name substring -> q_format, like llama-quantize
    tensor_ranks: dict[str, int] = field(default_factory=dict)  # name substring -> rank (0: no L·R there)
    allow_fallback: bool = True  # False: a tensor whose rows don't fit q_format is an error, not a fallback tensor
    fallback: str = "auto"  # the format of such a tensor: auto (iq4_nl for gguf, else q4_0) | iq4_nl | q4_0 | q8_0
    refine: str = "none"  # none | distill (Lillama block-level feature distillation of L and R)
    distill_inputs: str = "teacher+student"
    distill_lr: float = 1e-4
    distill_steps: int = 64  # optimizer steps per block
    distill_epochs: float | None = None  # if set, steps = epochs · sequences / batch
    distill_batch: int = 4  # sequences per step
    target_params: float | None = None  # parameter reduction in % of all the model's parameters
    target_bpw: float | None = None  # bits per weight of Q + L + R over the compressed linears
    allocation: str = "uniform"  # uniform | bottom | top | error: how ranks meet the target
    embed_type: str | None = None  # token embedding format: None/source (as stored) | f16 | a grid
    output_type: str | None = None  # lm_head format, likewise; a format other than the embedding's unties them
    preset: str = "auto"  # whole-file mix (compressor/recipe.py); the run records the mix it resolved to
    rotate: str = "none"  # none | residual | residual+head: randomized Hadamard folded into the weights (rotate.py)
    rotate_seed: int = 0

    @property
    def targeted(self) -> bool:
        return self.target_params is not None or self.target_bpw is not None

    def resolved(self) -> CompressOptions:
        """Fill method-dependent defaults and check every value, before any work starts."""
        o = copy.copy(self)
        if o.method not in dec.METHODS:
            raise LrdError(f"unknown method '{o.method}'; choose one of {', '.join(dec.METHODS)}")
        _check_budget(o)
        _check_refine(o)
        if o.rank is None and not o.targeted:
            o.rank = DEFAULT_RANK[o.method]
        if o.lr_format is None:
            o.lr_format = DEFAULT_LR_FORMAT[o.method]
        if o.method == "lowrank":
            o.q_format = None
        elif o.q_format not in grids.GRIDS:
            raise LrdError(f"unknown format '{o.q_format}'; choose one of {', '.join(grids.GRIDS)}")
        if o.lr_format not in dec.LR_FORMATS:
            raise LrdError(f"unknown format '{o.lr_format}' for L and R; choose one of {', '.join(dec.LR_FORMATS)}")
        if o.method in ("rtn", "ldlq") and o.rank:
            raise LrdError(f"method {o.method} has no low-rank part: leave --rank out (or use caldera)")
        if o.method in ("caldera", "lowrank") and not o.targeted and o.rank <= 0:
            raise LrdError(f"--rank must be positive for method {o.method}, got {o.rank}")
        if o.rank and o.lr_format != "f16" and o.rank % 32 and o.target == "gguf":
            raise LrdError(f"--lr-format {o.lr_format} needs --rank to be a multiple of 32 for GGUF (got {o.rank}); "
                           "use --target onnx|any or --lr-format f16")
        _check_tensor_ranks(o)
        for pattern, fmt in o.tensor_types.items():
            if fmt not in grids.GRIDS:
                raise LrdError(f"unknown format '{fmt}' in --tensor-type {pattern}={fmt}; "
                               f"choose one of {', '.join(grids.GRIDS)}")
        recipe.check(o.preset)
        rotate.check_kind(o.rotate)
        emb.check_format(o.embed_type, "--embed-type")
        emb.check_format(o.output_type, "--output-type")
        if o.target not in TARGETS:
            raise LrdError(f"unknown target '{o.target}'; choose one of {', '.join(TARGETS)}")
        if o.fallback not in FALLBACKS:
            raise LrdError(f"unknown --fallback '{o.fallback}'; choose one of {', '.join(FALLBACKS)}")
        if o.inputs not in INPUTS:
            raise LrdError(f"unknown --inputs '{o.inputs}'; choose one of {', '.join(INPUTS)}")
        if o.device not in ("auto", "cpu", "cuda"):
            raise LrdError(f"unknown device '{o.device}'; choose auto, cpu or cuda")
        if o.device == "cuda" and not torch.cuda.is_available():
            raise LrdError("--device cuda was asked for but no CUDA device is available")
        for name in ("iters", "lplr_iters", "calib_tokens", "seq_len", "batch_size"):
            if getattr(o, name) < 1:
                raise LrdError(f"--{name.replace('_', '-')} must be at least 1")
        return o

    def distill_modes(self) -> list[str]:
        return self.distill_inputs.split("+") if self.refine == "distill" else []

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("device")  # where it ran doesn't change what it computes
        for key in ("embed_type", "output_type"):  # unset: the options of runs from before these existed
            if d[key] is None:
                d.pop(key)
        if d["preset"] in ("auto", "source"):  # what every run before presets did
            d.pop("preset")
        if d["rotate"] == "none":  # likewise before rotations
            d.pop("rotate")
            d.pop("rotate_seed")
        return d


def _check_budget(o: CompressOptions) -> None:
    if o.allocation not in alloc.ALLOCATIONS:
        raise LrdError(f"unknown --allocation '{o.allocation}'; choose one of {', '.join(alloc.ALLOCATIONS)}")
    if not o.targeted:
        if o.allocation != "uniform":
            raise LrdError("--allocation needs a size target: --target-params or --target-bpw")
        return
    if o.target_params is not None and o.target_bpw is not None:
        raise LrdError("pass --target-params or --target-bpw, not both")
    if o.rank is not None:
        raise LrdError("--rank and a size target exclude each other: the target decides the ranks")
    if o.target_params is not None:
        if o.method != "lowrank":
            raise LrdError("--target-params needs --method lowrank (Q keeps every parameter); use --target-bpw")
        if not 0 < o.target_params < 100:
            raise LrdError(f"--target-params is a reduction in percent, between 0 and 100; got {o.target_params}")
    if o.target_bpw is not None:
        if o.method not in ("lowrank", "caldera"):
            raise LrdError(f"--target-bpw sets ranks, so it needs --method lowrank or caldera, not {o.method}")
        if not o.target_bpw > 0:
            raise LrdError(f"--target-bpw must be positive, got {o.target_bpw}")


def _check_tensor_ranks(o: CompressOptions) -> None:
    for pattern, r in o.tensor_ranks.items():
        flag = f"--tensor-rank {pattern}={r}"
        if o.targeted:
            raise LrdError(f"{flag} and a size target exclude each other: the target decides the ranks")
        if o.method in ("rtn", "ldlq") and r:
            raise LrdError(f"{flag}: method {o.method} has no low-rank part (use caldera)")
        if r < 0 or (o.method == "lowrank" and r == 0):
            raise LrdError(f"{flag}: the rank must be positive" + ("" if o.method == "lowrank" else " or 0 (no L·R)"))
        if r and o.lr_format != "f16" and r % 32 and o.target == "gguf":
            raise LrdError(f"{flag}: --lr-format {o.lr_format} needs a multiple of 32 for GGUF")
        if r and o.target == "gguf" and o.rank and r != o.rank:
            raise LrdError(f"{flag}: a GGUF LoRA adapter has one rank, and --rank is {o.rank}; use {o.rank} or 0, "
                           "or --target onnx|any")


def _check_refine(o: CompressOptions) -> None:
    if o.refine not in REFINES:
        raise LrdError(f"unknown --refine '{o.refine}'; choose one of {', '.join(REFINES)}")
    if o.distill_inputs not in dst.INPUT_MODES:
        raise LrdError(f"unknown --distill-inputs '{o.distill_inputs}'; choose one of {', '.join(dst.INPUT_MODES)}")
    if o.refine == "distill" and o.method not in ("lowrank", "caldera"):
        raise LrdError(f"--refine distill trains L and R, so it needs --method lowrank or caldera, not {o.method}")
    if not o.distill_lr > 0:
        raise LrdError(f"--distill-lr must be positive, got {o.distill_lr}")
    for name in ("distill_steps", "distill_batch"):
        if getattr(o, name) < 1:
            raise LrdError(f"--{name.replace('_', '-')} must be at least 1")
    if o.distill_epochs is not None and not o.distill_epochs > 0:
        raise LrdError(f"--distill-epochs must be positive, got {o.distill_epochs}")


@dataclass(frozen=True)
class LinearPlan:
    """What one linear becomes: decided up front from its shape and the target's constraints."""

    q_format: str | None
    rank: int
    lr_format: str
    fallback: str | None


def plan_linear(name: str, shape: tuple[int, int], o: CompressOptions, rank: int | None = None) -> LinearPlan:
    """Apply the target's row constraints to one linear, falling back per tensor the way llama-quantize does.

    RANK overrides o.rank (a size target allocates one rank per linear); else --tensor-rank patterns do, last wins.
    """
    out, in_ = shape
    if rank is None:
        rank = o.rank
        for pattern, r in o.tensor_ranks.items():
            if pattern in name:
                rank = r
    if rank and rank >= min(out, in_):
        raise LrdError(f"--rank {rank} is not below min(out, in) = {min(out, in_)} for {name} {out}x{in_}")
    per_row = o.target == "gguf"
    q_format, fallback = o.q_format, None
    if q_format is not None:
        for pattern, fmt in o.tensor_types.items():
            if pattern in name:
                q_format = fmt
    if q_format is not None:
        reason = grids.fits(grids.get_grid(q_format), shape, per_row=per_row)
        if reason is not None and not o.allow_fallback:
            raise LrdError(f"{name} {out}x{in_}: {reason} ({o.target}), and --no-fallback forbids falling back; "
                           "pick a format whose blocks fit, or --target onnx|any")
        if reason is not None:
            for alt in fallbacks(o):
                if grids.fits(grids.get_grid(alt), shape, per_row=per_row) is None:
                    fallback = f"{reason} ({o.target}): {q_format} -> {alt}"
                    q_format = alt
                    break
            else:
                raise LrdError(f"{name} {out}x{in_}: {reason}, and no fallback format fits")
    if rank and o.lr_format != "f16":
        for side, shp in (("R", (rank, in_)), ("L", (out, rank))):
            reason = grids.fits(grids.get_grid(o.lr_format), shp, per_row=per_row)
            if reason is not None:
                raise LrdError(f"{name}: {side} in {o.lr_format}: {reason}")
    return LinearPlan(q_format, rank, o.lr_format, fallback)


class _Stop(Exception):
    """Raised by a hook to end a block's forward once the wanted input is captured."""


class HCollector:
    """Accumulates XᵀX over calibration batches from a forward pre-hook."""

    def __init__(self, dim: int, device: torch.device):
        self.sum = torch.zeros(dim, dim, device=device, dtype=torch.float32)
        self.n = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        self.sum.addmm_(x.T, x)
        self.n += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)


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
        yield _h_of(mlp.act_fn(mlp.gate_proj(t)) * mlp.up_proj(t) for t in _drain(g))


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
        total = t.T @ t if total is None else total.addmm_(t.T, t)
        n += t.shape[0]
    return total / max(n, 1)


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


def _weights(block: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    m = block.get_submodule(name)
    return m.weight.detach(), None if m.bias is None else m.bias.detach()


def linear_tensors(full: str, d: dec.Decomposition, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
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


Progress = Callable[[str], None]


@dataclass
class CompressResult:
    out: Path
    manifest: dict


def compress(
    source: ModelSource,
    options: CompressOptions,
    out: Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    stop_after: int | None = None,
) -> CompressResult:
    """Compress SOURCE into the artifact OUT. STOP_AFTER (tests) ends the run after that many blocks."""
    o = options.resolved()
    out = Path(out)
    with output_lock(out):  # taken before OUT and OUT.partial are looked at: a second run must not touch them
        try:
            return _compress(source, o, out, resume, force, progress, stop_after)
        except OSError:  # a full disk or a failed write: drop half-written files while this run still owns OUT
            tidy_partial(out)
            raise


def _compress(source: ModelSource, o: CompressOptions, out: Path, resume: bool, force: bool,
              progress: Progress | None, stop_after: int | None) -> CompressResult:
    tmp = out.with_name(out.name + ".partial")
    state_file = tmp / "state.json"
    if out.exists() and not force and not (resume and tmp.exists()):
        raise LrdError(f"{out} already exists; pass --force to overwrite it")
    if tmp.exists() and not (resume or force):
        raise LrdError(f"an unfinished run is in {tmp}; pass --resume to continue it or --force to start over")
    device = o.torch_device()
    t_start = time.perf_counter()
    config = source.config
    o = recipe.apply(o, config.hidden_size)
    arch = archs.get(config)
    if o.rotate != "none":  # every tensor the run reads comes out rotated; the norms it folds read as ones
        source = rotate.RotatedSource(source, o.rotate, o.rotate_seed)
        config = source.config
    model = skeleton(config)
    n_layers = config.num_hidden_layers
    model_params = sum(p.numel() for p in model.parameters())  # tied embeddings count once, as Lillama counts
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(n_layers):
        block = model.model.layers[i]
        for name in arch.linears:
            m = block.get_submodule(name)
            shapes[layer_prefix(i) + name] = (m.out_features, m.in_features)
    step = rank_step(o)
    plans = {k: plan_linear(k, shp, o, rank=step if o.targeted else None) for k, shp in shapes.items()}
    vocab = emb.plan_vocab(o.embed_type, o.output_type, config, source.has(emb.HEAD),
                           tuple(model.model.embed_tokens.weight.shape))
    early = None
    if o.targeted:  # an unreachable target fails here, before any file is written
        early = allocation_record(o if o.allocation != "error" else replace(o, allocation="uniform"), plans, shapes,
                                  model_params, None)

    tokenizer = source.tokenizer()
    ids = tokenize(tokenizer, load_text(o.calib, o.calib_range))
    if len(ids) and int(ids.max()) >= config.vocab_size:
        raise LrdError(f"the tokenizer of {source.spec} yields id {int(ids.max())}, but the model has only "
                       f"{config.vocab_size} embeddings: tokenizer and weights do not belong together")
    calib = calibration_ids(ids, o.calib_tokens, o.seq_len, o.seed).to(device)
    if resume and (tmp / MANIFEST).is_file():  # stopped while finishing: merged tensors and manifest are complete
        import json

        if json.loads((tmp / MANIFEST).read_text()).get("options") != o.to_json():
            raise LrdError(f"cannot resume {tmp}: it was started with other options; pass --force to start over")
        return CompressResult(out, _finalize(tmp, out))
    state = _start_or_resume(tmp, state_file, o, resume, force)
    if state["layers_done"] == 0 and not (tmp / "base.safetensors").exists():
        source.save_meta(tmp)
        if vocab.untie:
            emb.untie_config(tmp / "config.json")
        _save_vocab(tmp / "base.safetensors", _base_tensors(source, vocab), state, state_file)

    get = source.tensor
    x = source.rows(emb.EMBED, calib).to(device)  # only the calibration ids' rows: the table is never built
    scale = embed_scale(config)
    if scale is not None:
        x = x * scale
    model.model.embed_tokens = None  # only one block stays resident
    rot = rotary(model, device)
    ctxs = BlockContext(model, x[: o.batch_size], rot)
    if o.targeted:
        if "allocation" not in state:  # decided once; a resumed run reads it back
            if o.allocation == "error":
                curves = _error_curves(model, arch, plans, o, x, ctxs, get, device)
                early = allocation_record(o, plans, shapes, model_params, curves)
            state["allocation"] = early
            atomic_write_json(state_file, state)
        ranks = state["allocation"]["ranks"]
        plans = {k: plan_linear(k, shp, o, rank=ranks[k]) for k, shp in shapes.items()}
    modes = o.distill_modes()
    teacher_x = x if o.inputs == "teacher" or modes else None
    student_x = x if o.inputs == "student" or "student" in modes else None
    dctxs = BlockContext(model, x[: min(o.distill_batch, len(x))], rot) if modes else None
    steps = o.distill_steps if o.distill_epochs is None else dst.steps_for(o.distill_epochs, len(x), o.distill_batch)

    y = None
    for i in range(n_layers):
        prefix = layer_prefix(i)
        ctx = ctxs[i]
        teacher = materialize(model.model.layers[i], prefix, get, device)
        shard = tmp / "layers" / f"{i:04d}.safetensors"
        if i >= state["layers_done"]:
            t0 = time.perf_counter()
            stages = state.setdefault("stage_seconds", {})
            tensors, entries, parts = _compress_block(
                teacher, arch, prefix, plans, o, student_x if o.inputs == "student" else None,
                teacher_x if o.inputs == "teacher" else None, ctx, progress, stages)
            records = {k: v.to_json() for k, v in entries.items()}
            if modes:
                y = run_block(teacher, teacher_x, ctx, o.batch_size)  # the targets, and the next teacher input
                report = _distill_block(teacher, prefix, parts, tensors, records, o, teacher_x, student_x, y, ctx,
                                        dctxs[i], steps, i)
                state.setdefault("distill", []).append(report)
            _save_shard(shard, tensors, teacher, prefix, arch)
            del tensors, parts  # block i's damped H (321 MB for an 8960-wide down_proj) must not meet block i+1's
            state["linears"].update(records)
            state["layers_done"] = i + 1
            state["seconds"] += time.perf_counter() - t0
            atomic_write_json(state_file, state)
        elif progress:
            for name in arch.linears:
                progress(f"layer {i} {name} (resumed)")
        if student_x is not None:
            t1 = time.perf_counter()
            student = _student_block(teacher, prefix, shard, state["linears"], device)
            student_x = run_block(student, student_x, ctx, o.batch_size)
            del student
            _add_seconds(state, "student_forward", time.perf_counter() - t1)
        if y is not None:
            teacher_x, y = y, None
        elif teacher_x is not None:
            teacher_x = run_block(teacher, teacher_x, ctx, o.batch_size)
        model.model.layers[i] = None  # drop the block: peak memory must not grow with depth
        del teacher
        if stop_after is not None and i + 1 >= stop_after and i + 1 < n_layers:
            raise KeyboardInterrupt
    if vocab.head_needs_inputs:  # the head's inputs are the final hidden states after the final norm
        norm = materialize(model.model.norm, "model.norm.", get, device)
        importance = emb.input_importance(norm, student_x if student_x is not None else teacher_x, o.batch_size)
        head = emb.encode(source, vocab.head_from, vocab.head, vocab.shape, importance)
        _save_vocab(tmp / "head.safetensors", {emb.HEAD: head}, state, state_file)
    manifest = _finish(source, o, tmp, out, state, calib, time.perf_counter() - t_start, device)
    return CompressResult(out, manifest)


def _start_or_resume(tmp: Path, state_file: Path, o: CompressOptions, resume: bool, force: bool) -> dict:
    fresh = {"options": o.to_json(), "layers_done": 0, "linears": {}, "seconds": 0.0}
    if tmp.exists():
        if resume:
            import json

            try:
                state = json.loads(state_file.read_text())
            except (OSError, ValueError):
                state = None
            if state is None or not isinstance(state, dict) or "layers_done" not in state:
                raise LrdError(f"cannot resume: {state_file} is missing or corrupt; pass --force to start over")
            if state.get("options") != o.to_json():
                raise LrdError(f"cannot resume {tmp}: it was started with other options; pass --force to start over")
            return state
        if not force:
            raise LrdError(f"an unfinished run is in {tmp}; pass --resume to continue it or --force to start over")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "layers").mkdir()
    atomic_write_json(state_file, fresh)
    return fresh


def _base_tensors(source: ModelSource, vocab: emb.VocabPlan) -> dict[str, torch.Tensor | emb.Stored]:
    """Everything outside the blocks: the final norm as the source stores it, the embedding in its format, and the
    head unless it waits for its input importance (or is the tied embedding)."""
    names = [n for n in source.names() if not n.startswith("model.layers.") and n not in (emb.EMBED, emb.HEAD)]
    tensors: dict[str, torch.Tensor | emb.Stored] = {n: source.stored(n) for n in names}
    tensors[emb.EMBED] = emb.encode(source, emb.EMBED, vocab.embed, vocab.shape)
    if vocab.head is not None and not vocab.head_needs_inputs:
        tensors[emb.HEAD] = emb.encode(source, vocab.head_from, vocab.head, vocab.shape)
    return tensors


def _save_vocab(path: Path, tensors: dict[str, torch.Tensor | emb.Stored], state: dict, state_file: Path) -> None:
    """Write one shard; the manifest records of its embedding/head go into the state first (a kill between the two
    writes leaves a state whose shard is rewritten on resume, never a shard without its record)."""
    from safetensors.torch import save_file

    records = {n: t.entry() for n, t in tensors.items() if isinstance(t, emb.Stored)}
    if records:
        state.setdefault("tensors", {}).update(records)
        atomic_write_json(state_file, state)
    flat: dict[str, torch.Tensor] = {}
    for n, t in tensors.items():
        flat.update(t.tensors(n) if isinstance(t, emb.Stored) else {n: t.contiguous()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(flat, str(tmp))
    tmp.replace(path)


def _compress_block(
    teacher: nn.Module,
    arch: archs.Arch,
    prefix: str,
    plans: dict[str, LinearPlan],
    o: CompressOptions,
    student_x: torch.Tensor | None,
    teacher_x: torch.Tensor | None,
    ctx: dict,
    progress: Progress | None,
    stages: dict[str, float],
) -> tuple[dict[str, torch.Tensor], dict[str, LinearEntry], dict[str, tuple[dec.Decomposition, torch.Tensor]]]:
    """Compress the linears of one block, group by group, with H from student or teacher inputs.

    Also returns each linear's decomposition and damped H, which distillation starts from and re-measures with.
    """
    student = copy.deepcopy(teacher)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, LinearEntry] = {}
    parts: dict[str, tuple[dec.Decomposition, torch.Tensor]] = {}
    t_h = time.perf_counter()
    if teacher_x is not None:  # teacher inputs: every H comes from one pass of the original block
        firsts = tuple(g[0] for g in arch.groups)
        hs = collect_h(teacher, firsts, teacher_x, ctx, o.batch_size)
        h_stages = iter([hs[name] for name in firsts])
    elif arch.staged_h:  # student inputs: each H sees the already-compressed linears before it
        h_stages = staged_h(student, student_x, ctx, o.batch_size)
    else:
        h_stages = hook_h(student, arch.groups, student_x, ctx, o.batch_size)
    for group in arch.groups:
        release_freed_memory()
        fac = dec.hessian_factor(next(h_stages), o.damp)  # H itself is not kept: fac.H is its damped copy
        stages["h_collection"] = stages.get("h_collection", 0.0) + time.perf_counter() - t_h
        for name in group:
            full = prefix + name
            plan = plans[full]
            W, bias = _weights(teacher, name)
            t0 = time.perf_counter()
            d = dec.decompose(
                W, fac, o.method, plan.q_format, plan.rank, plan.lr_format, o.iters, o.lplr_iters, o.whiten
            )
            part = linear_tensors(full, d, bias)
            tensors.update(part)
            entries[full] = LinearEntry(
                shape=list(W.shape),
                q_format=plan.q_format,
                rank=plan.rank,
                lr_format=plan.lr_format if plan.rank else None,
                error=d.error,
                fallback=plan.fallback,
                history=d.history or None,
                seconds=round(time.perf_counter() - t0, 3),
                bytes=linear_bytes(part, full),
            )
            _swap(student, name, d, bias)
            parts[name] = (d, fac.H)
            if progress:
                progress(f"layer {prefix.split('.')[2]} {name}")
        t_h = time.perf_counter()  # the next group's H starts here: its activations come from the swapped linears
    return tensors, entries, parts


def rank_step(o: CompressOptions) -> int:
    """Allocated ranks are multiples of this: quantized L has rows of length r that must hold whole 32-blocks."""
    return 8 if o.lr_format == "f16" else 32


def _bytes_per_weight(fmt: str) -> float:
    if fmt == "f16":
        return 2.0
    g = grids.get_grid(fmt)
    return g.type_size / g.super_block


def allocation_record(o: CompressOptions, plans: dict[str, LinearPlan], shapes: dict[str, tuple[int, int]],
                      model_params: int, curves: dict[str, torch.Tensor] | None) -> dict:
    """Ranks per linear for the size target, and what the target and the result are (for the manifest)."""
    step = rank_step(o)
    linear_params = sum(a * b for a, b in shapes.values())
    slots = []
    for name, (out, in_) in shapes.items():
        layer = int(name.split(".")[2])
        if o.target_params is not None:
            slots.append(alloc.Slot(name, layer, (out, in_), 0.0, float(out + in_), step))
        else:
            q = plans[name].q_format
            fixed = 0.0 if q is None else out * in_ * _bytes_per_weight(q)
            slots.append(alloc.Slot(name, layer, (out, in_), fixed, (out + in_) * _bytes_per_weight(o.lr_format),
                                    step))
    if o.target_params is not None:
        budget = model_params * (1 - o.target_params / 100) - (model_params - linear_params)
    else:
        budget = o.target_bpw * linear_params / 8
    ranks = alloc.allocate(slots, budget, o.allocation, curves)
    cost = alloc.total_cost(slots, ranks)
    rec: dict = {"mode": o.allocation, "model_params": model_params, "linear_params": linear_params,
                 "budget": budget, "cost": cost, "ranks": ranks}
    if o.target_params is not None:
        rec["target_params"] = o.target_params
        rec["param_reduction"] = 100 * (1 - (model_params - linear_params + cost) / model_params)
    else:
        rec["target_bpw"] = o.target_bpw
        rec["bpw"] = 8 * cost / linear_params
    if curves is not None:
        rec["predicted_error"] = sum(float(curves[k][r]) for k, r in ranks.items())
    return rec


def _error_curves(model: nn.Module, arch: archs.Arch, plans: dict[str, LinearPlan], o: CompressOptions,
                  x: torch.Tensor, ctxs: BlockContext, get, device: torch.device) -> dict[str, torch.Tensor]:
    """Relative H-error against rank for every linear, from one streaming pass of the teacher.

    The curve is the whitened spectrum of what L·R must fit: W for lowrank, W − LDLQ(W) for caldera (its first
    iteration). H comes from the teacher's hidden states whatever --inputs says: the student's don't exist yet.
    """
    curves: dict[str, torch.Tensor] = {}
    firsts = tuple(g[0] for g in arch.groups)
    for i in range(len(model.model.layers)):
        prefix = layer_prefix(i)
        block = materialize(model.model.layers[i], prefix, get, device)
        hs = collect_h(block, firsts, x, ctxs[i], o.batch_size)
        for group in arch.groups:
            fac = dec.hessian_factor(hs[group[0]], o.damp)
            for name in group:
                W, _ = _weights(block, name)
                W = W.float()
                plan = plans[prefix + name]
                A = W if plan.q_format is None else W - dec.ldlq(W, fac, grids.get_grid(plan.q_format)).values
                sigma = torch.linalg.svdvals(A @ fac.S)
                curves[prefix + name] = alloc.error_curve(sigma, dec.h_error(W, fac.H)).cpu()
        x = run_block(block, x, ctxs[i], o.batch_size)
        block.to_empty(device="meta")  # free it: the main pass materializes it again
    return curves


def _distill_block(teacher: nn.Module, prefix: str, parts: dict[str, tuple[dec.Decomposition, torch.Tensor]],
                   tensors: dict[str, torch.Tensor], records: dict[str, dict], o: CompressOptions,
                   teacher_x: torch.Tensor, student_x: torch.Tensor | None, y: torch.Tensor, ctx: dict, dctx: dict,
                   steps: int, layer: int) -> dict:
    """Train the block's L and R against the teacher block, put them back on their grid, update TENSORS/RECORDS.

    The targets Y are the teacher block's outputs on the teacher's inputs. After training, L and R go back to
    lr_format the plain way (f16 cast, or RTN weighted by the diagonal of the H each one's error sees). The
    re-quantized block is kept only if its calibration loss (summed over the input modes) is lower than before
    training, so a short or too-hot run never makes a block worse than its initialization ("kept" says which).
    """
    t0 = time.perf_counter()
    modes = o.distill_modes()
    factors = {}
    for name, (d, _) in parts.items():
        bias = _weights(teacher, name)[1]
        factors[name] = (None if d.Q is None else d.Q.values, d.LR.L.values, d.LR.R.values, bias)
    student = dst.trainable_block(teacher, factors)
    inputs = {"teacher": teacher_x, "student": student_x}
    before = {m: dst.block_loss(student, inputs[m], y, ctx, o.batch_size) for m in modes}
    history = dst.train_block(student, [inputs[m] for m in modes], y, dctx, steps, o.distill_lr, o.distill_batch,
                              seed=o.seed * 1_000_003 + layer)
    trained_tensors: dict[str, torch.Tensor] = {}
    trained_records: dict[str, dict] = {}
    for name, (d, H) in parts.items():
        full = prefix + name
        m = student.get_submodule(name)
        W, bias = _weights(teacher, name)
        R = dec.quantize_factor(m.R.detach(), o.lr_format, torch.diagonal(H))
        L = dec.quantize_factor(m.L.detach(), o.lr_format, torch.diagonal(R.values @ H @ R.values.T))
        new = dec.Decomposition(d.Q, dec.LowRank(L, R), 0.0)
        new.error = dec.rel_error(new.values(tuple(W.shape), W.device), W, H)
        with torch.no_grad():
            m.L.copy_(L.values)
            m.R.copy_(R.values)
        part = linear_tensors(full, new, bias)
        trained_tensors.update(part)
        trained_records[full] = {"error": new.error, "bytes": linear_bytes(part, full)}
        records[full]["error_init"] = d.error
    after = {m: dst.block_loss(student, inputs[m], y, ctx, o.batch_size) for m in modes}
    kept = sum(after.values()) < sum(before.values())
    if kept:
        tensors.update(trained_tensors)
        for full, rec in trained_records.items():
            records[full].update(rec)
    return {"layer": layer, "steps": steps, "kept": kept, "loss_before": before, "loss_after": after,
            "train_loss_first": history[0] if history else None, "train_loss_last": history[-1] if history else None,
            "seconds": round(time.perf_counter() - t0, 2)}


def _swap(block: nn.Module, name: str, d: dec.Decomposition, bias: torch.Tensor | None) -> None:
    parent_name, _, child = name.rpartition(".")
    qlr = QLRLinear.from_values(
        None if d.Q is None else d.Q.values,
        None if d.LR is None else d.LR.L.values,
        None if d.LR is None else d.LR.R.values,
        bias,
    )
    setattr(block.get_submodule(parent_name), child, qlr)


def _save_shard(path: Path, tensors: dict[str, torch.Tensor], teacher: nn.Module, prefix: str,
                arch: archs.Arch) -> None:
    """One finished block: its compressed linears plus its other tensors (norms) as they were."""
    from safetensors.torch import save_file

    compressed = {prefix + n for n in arch.linears}
    for name, p in teacher.named_parameters():
        full = prefix + name
        if full.rpartition(".")[0] not in compressed:
            tensors[full] = p.detach().cpu().contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def _student_block(teacher: nn.Module, prefix: str, shard: Path, linears: dict, device) -> nn.Module:
    """The compressed block rebuilt from its shard: the same code path for a fresh run and a resumed one."""
    from lrdeploy.artifact import ArtifactTensors, install_qlr

    sub = {k[len(prefix):]: v for k, v in linears.items() if k.startswith(prefix)}
    student = copy.deepcopy(teacher)
    install_qlr(student, sub)
    get = ArtifactTensors(shard.parent.parent, {"linears": linears}, device, weights=shard)
    with torch.no_grad():
        for name in sub:
            module = student.get_submodule(name)
            module.to_empty(device=device)
            for key in ("q", "lora_l", "lora_r", "bias"):
                if getattr(module, key) is not None:
                    getattr(module, key).copy_(get(f"{prefix}{name}.{key}"))
    return student.eval()


def _finish(source: ModelSource, o: CompressOptions, tmp: Path, out: Path, state: dict, calib: torch.Tensor,
            seconds: float, device: torch.device) -> dict:
    shards = [tmp / "base.safetensors"] + sorted((tmp / "layers").glob("*.safetensors"))
    shards += [f for f in (tmp / "head.safetensors",) if f.is_file()]
    merge_safetensors(tmp / WEIGHTS, shards)
    linears = state["linears"]
    vocab = _vocab_records(source, tmp, state)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "source": {"spec": source.spec, "kind": source.kind, "path": str(source.path), "sha256": source.digest()},
        "architecture": source.arch,
        "method": o.method,
        "options": o.to_json(),
        "calibration": {
            "source": o.calib or "pydoc (embedded default)",
            "range": o.calib_range,
            "tokens": int(calib.numel()),
            "sequences": int(calib.shape[0]),
            "seq_len": o.seq_len,
            "seed": o.seed,
        },
        "linears": linears,
        **vocab,
        "summary": summarize(linears, vocab.get("tensors"), **_whole_file(source, tmp / WEIGHTS, vocab)),
        **_refine_records(o, state),
        "timings": {
            "compress_seconds": round(state["seconds"], 2),
            "stages": stage_seconds(state),
            "wall_seconds_this_run": round(seconds, 2),
            "device": str(device),
            "host": platform.node(),
            "threads": torch.get_num_threads(),
        },
        "files": {WEIGHTS: {"sha256": sha256_file(tmp / WEIGHTS), "bytes": (tmp / WEIGHTS).stat().st_size}},
    }
    atomic_write_json(tmp / MANIFEST, manifest)
    return _finalize(tmp, out)


def _add_seconds(state: dict, stage: str, seconds: float) -> None:
    stages = state.setdefault("stage_seconds", {})
    stages[stage] = stages.get(stage, 0.0) + seconds


def stage_seconds(state: dict) -> dict:
    """Where the time went, summed over blocks: H collection (the block's forward passes, XᵀX and its Cholesky
    factors), decomposition per linear type, distillation, and the compressed block's forward that feeds the next
    block (student inputs)."""
    by_type: dict[str, float] = {}
    for name, e in state["linears"].items():
        kind = name.rsplit(".", 1)[-1]
        by_type[kind] = by_type.get(kind, 0.0) + (e.get("seconds") or 0.0)
    spent = {k: round(v, 2) for k, v in state.get("stage_seconds", {}).items()}
    distill = sum(r.get("seconds", 0.0) for r in state.get("distill", []))
    return {**spent, "decompose": {k: round(v, 2) for k, v in by_type.items()},
            **({"distill": round(distill, 2)} if state.get("distill") else {})}


def _finalize(tmp: Path, out: Path) -> dict:
    """Drop the shards and the run state once the manifest is written, then move TMP to OUT (safe to repeat)."""
    import json

    (tmp / "base.safetensors").unlink(missing_ok=True)
    (tmp / "head.safetensors").unlink(missing_ok=True)
    if (tmp / "layers").is_dir():
        shutil.rmtree(tmp / "layers")
    (tmp / "state.json").unlink(missing_ok=True)
    manifest = json.loads((tmp / MANIFEST).read_text())
    replace_dir(tmp, out)
    return manifest


def _refine_records(o: CompressOptions, state: dict) -> dict:
    """The manifest's allocation and distillation sections, when the run had them."""
    rec: dict = {}
    if "allocation" in state:
        rec["allocation"] = state["allocation"]
    if o.refine == "distill":
        rec["distill"] = {"inputs": o.distill_inputs, "lr": o.distill_lr, "batch": o.distill_batch,
                          "loss": "mean over tokens of mean|y - y_hat| - log sigmoid(cos(y, y_hat))",
                          "blocks": state.get("distill", [])}
    return rec


def _vocab_records(source: ModelSource, tmp: Path, state: dict) -> dict:
    """The manifest's `tensors` table (embedding and head formats), and `untied` when the artifact unties a tied
    source (its head's bytes are the summary's output_bytes)."""
    from transformers import AutoConfig

    if "tensors" not in state:  # a run started before these existed
        return {}
    tied = getattr(source, "source_config", source.config).tie_word_embeddings  # a rotated source's original config
    untied = bool(tied) and not AutoConfig.from_pretrained(str(tmp)).tie_word_embeddings
    return {"tensors": state["tensors"], **({"untied": True} if untied else {})}


def _whole_file(source: ModelSource, weights: Path, vocab: dict) -> dict:
    """Bytes of every stored tensor, and the weights of the model they store (a tied embedding once)."""
    from lrdeploy.io import read_safetensors_header

    header, _ = read_safetensors_header(weights)
    nbytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
    params = sum(p.numel() for p in skeleton(source.config).parameters())
    return {"stored_bytes": nbytes,
            "model_weights": emb.stored_weights(params, vocab.get("tensors", {}), source.config.tie_word_embeddings)}


def summarize(linears: dict, tensors: dict | None = None, stored_bytes: int | None = None,
              model_weights: int | None = None) -> dict:
    """bpw over the compressed linears (Q + L + R bytes, scales included), and mean error per linear type.

    With the artifact's `tensors` table and its totals: the embedding's and the separately stored head's bytes, and
    whole_bpw = 8 · (every stored byte) / (every model weight), the way llama-quantize counts a file.
    """
    params = sum(e["shape"][0] * e["shape"][1] for e in linears.values())
    nbytes = sum(e["bytes"] for e in linears.values())
    by_type: dict[str, list[float]] = {}
    for name, e in linears.items():
        by_type.setdefault(name.rsplit(".", 1)[-1], []).append(e["error"])
    fallbacks = sum(1 for e in linears.values() if e.get("fallback"))
    return {
        "bpw": 8 * nbytes / params if params else 0.0,
        "linear_params": params,
        "linear_bytes": nbytes,
        "error_by_type": {k: sum(v) / len(v) for k, v in by_type.items()},
        "fallbacks": fallbacks,
        "linears": len(linears),
        **({} if tensors is None else {"embed_bytes": tensors.get(emb.EMBED, {}).get("bytes", 0),
                                       "output_bytes": tensors.get(emb.HEAD, {}).get("bytes", 0)}),
        **({} if not model_weights else {"whole_bpw": 8 * stored_bytes / model_weights,
                                         "stored_bytes": stored_bytes, "model_weights": model_weights}),
    }



def tidy_partial(out: Path) -> int:
    """After a failed write: drop half-written *.tmp files from OUT.partial, keep finished layers; returns how many.

    Every finished file was renamed into place whole, so only the *.tmp siblings can be damaged. Call it while
    holding OUT's lock: another run's *.tmp files are not strays.
    """
    tmp = Path(out).with_name(Path(out).name + ".partial")
    if tmp.is_dir():
        for stray in tmp.rglob("*.tmp"):
            stray.unlink(missing_ok=True)
    return finished_layers(out)


def finished_layers(out: Path) -> int:
    """How many blocks OUT.partial holds finished (0 when there is no readable run state)."""
    import json

    tmp = Path(out).with_name(Path(out).name + ".partial")
    try:
        return int(json.loads((tmp / "state.json").read_text())["layers_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
