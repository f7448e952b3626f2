"""What a compress run is asked to do: its options, their checks, and what each linear becomes.

CompressOptions holds everything that decides the artifact's bytes (the manifest records it, and a resumed run must
match it); `resolved()` fills the method-dependent defaults and checks every value before any work starts.
`plan_linear` applies the target's row constraints to one linear, falling back per tensor as llama-quantize does.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch

from lrdeploy.compressor import allocate as alloc
from lrdeploy.compressor import decompose as dec
from lrdeploy.compressor import distill as dst
from lrdeploy.compressor import embeddings as emb
from lrdeploy.compressor import grids, mix, recipe, rotate
from lrdeploy.devices import torch_device
from lrdeploy.errors import LrdError

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
    rotate_down: bool = False  # an online randomized Hadamard on down_proj's input (torch and ONNX only, rotate.py)
    mix_bpw: float | None = None  # whole-file bpw: the Q formats are then allocated from measured sensitivity (mix.py)

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
        _check_mix(o)
        for pattern, fmt in o.tensor_types.items():
            if fmt not in grids.GRIDS:
                raise LrdError(f"unknown format '{fmt}' in --tensor-type {pattern}={fmt}; "
                               f"choose one of {', '.join(grids.GRIDS)}")
        recipe.check(o.preset)
        rotate.check_kind(o.rotate)
        if o.rotate_down and o.target == "gguf":
            raise LrdError("--rotate-down needs a runtime that rotates down_proj's input, which llama.cpp cannot: "
                           "pass --target onnx (or any: torch and ONNX), or leave --rotate-down out")
        emb.check_format(o.embed_type, "--embed-type")
        emb.check_format(o.output_type, "--output-type")
        if o.target not in TARGETS:
            raise LrdError(f"unknown target '{o.target}'; choose one of {', '.join(TARGETS)}")
        if o.fallback not in FALLBACKS:
            raise LrdError(f"unknown --fallback '{o.fallback}'; choose one of {', '.join(FALLBACKS)}")
        if o.inputs not in INPUTS:
            raise LrdError(f"unknown --inputs '{o.inputs}'; choose one of {', '.join(INPUTS)}")
        torch_device(o.device)  # an unknown device, or cuda where there is none, fails here
        for name in ("iters", "lplr_iters", "calib_tokens", "seq_len", "batch_size"):
            if getattr(o, name) < 1:
                raise LrdError(f"--{name.replace('_', '-')} must be at least 1")
        return o

    def distill_modes(self) -> list[str]:
        return self.distill_inputs.split("+") if self.refine == "distill" else []

    def torch_device(self) -> torch.device:
        return torch_device(self.device)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("device")  # where it ran doesn't change what it computes
        for key in ("embed_type", "output_type"):  # unset: the options of runs from before these existed
            if d[key] is None:
                d.pop(key)
        if d["preset"] in ("auto", "source"):  # what every run before presets did
            d.pop("preset")
        if d["mix_bpw"] is None:  # likewise before sensitivity mixes
            d.pop("mix_bpw")
        if not d["rotate_down"]:  # likewise before online rotations
            d.pop("rotate_down")
        if d["rotate"] == "none" and "rotate_down" not in d:  # likewise before rotations
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


def _check_mix(o: CompressOptions) -> None:
    if o.mix_bpw is None:
        return
    if o.targeted:
        raise LrdError("--mix-bpw and --target-bpw/--target-params exclude each other: one size target at a time")
    if not o.mix_bpw > 0:
        raise LrdError(f"--mix-bpw must be positive, got {o.mix_bpw}")
    if o.method == "lowrank":
        raise LrdError("--mix-bpw chooses Q formats, and method lowrank has no Q; use caldera, ldlq or rtn")
    mix.check(o.q_format)


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


def plan_linear(name: str, shape: tuple[int, int], o: CompressOptions, rank: int | None = None,
                q_format: str | None = None) -> LinearPlan:
    """Apply the target's row constraints to one linear, falling back per tensor the way llama-quantize does.

    RANK overrides o.rank (a size target allocates one rank per linear); else --tensor-rank patterns do, last wins.
    Q_FORMAT likewise overrides o.q_format and --tensor-type (a sensitivity mix chose it).
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
    fallback = None
    if q_format is None and (q_format := o.q_format) is not None:
        for pattern, fmt in o.tensor_types.items():
            if pattern in name:
                q_format = fmt
    if q_format is not None:
        reason = grids.get_grid(q_format).fits(shape, per_row=per_row)
        if reason is not None and not o.allow_fallback:
            raise LrdError(f"{name} {out}x{in_}: {reason} ({o.target}), and --no-fallback forbids falling back; "
                           "pick a format whose blocks fit, or --target onnx|any")
        if reason is not None:
            for alt in fallbacks(o):
                if grids.get_grid(alt).fits(shape, per_row=per_row) is None:
                    fallback = f"{reason} ({o.target}): {q_format} -> {alt}"
                    q_format = alt
                    break
            else:
                raise LrdError(f"{name} {out}x{in_}: {reason}, and no fallback format fits")
    if rank and o.lr_format != "f16":
        for side, shp in (("R", (rank, in_)), ("L", (out, rank))):
            reason = grids.get_grid(o.lr_format).fits(shp, per_row=per_row)
            if reason is not None:
                raise LrdError(f"{name}: {side} in {o.lr_format}: {reason}")
    return LinearPlan(q_format, rank, o.lr_format, fallback)
