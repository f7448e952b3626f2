"""The streaming compressor: bottom-first, one decoder block resident, atomic and resumable output.

`compress` reads as the loop it is: for each block, collect H group by group (compressor/hcollect.py), decompose
each linear (decompose.py), optionally distill the block's L and R (distill.py), write the block's shard and feed
the next block. The options and their checks live in options.py, the run directory (OUT.partial/, its shards, the
run state, resume and the final move to OUT) in rundir.py, size targets in ranks.py, and what each architecture
looks like in arch.py. When all blocks are done the shards are merged into model.safetensors, the manifest is
written and the directory is renamed to OUT. Throughout, OUT.lock holds the run's pid: a second run on the same OUT
is refused.
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from lrdeploy.artifact import FORMAT, MANIFEST, VERSION, WEIGHTS, LinearEntry, QLRLinear
from lrdeploy.compressor import arch as archs
from lrdeploy.compressor import decompose as dec
from lrdeploy.compressor import distill as dst
from lrdeploy.compressor import embeddings as emb
from lrdeploy.compressor import mix, ranks, recipe, rotate, rundir
from lrdeploy.compressor.hcollect import collect_h, hook_h, release_freed_memory, run_block, staged_h
from lrdeploy.compressor.model import BlockContext, embed_scale, layer_prefix, materialize, rotary, skeleton
from lrdeploy.compressor.options import CompressOptions, LinearPlan, plan_linear
from lrdeploy.compressor.sources import ModelSource
from lrdeploy.compressor.text import calibration_ids, load_text, tokenize
from lrdeploy.errors import LrdError
from lrdeploy.io import atomic_write_json, merge_safetensors, output_lock, partial_dir, sha256_file


def _weights(block: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    m = block.get_submodule(name)
    return m.weight.detach(), None if m.bias is None else m.bias.detach()


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
            rundir.tidy_partial(out)
            raise


def _compress(source: ModelSource, o: CompressOptions, out: Path, resume: bool, force: bool,
              progress: Progress | None, stop_after: int | None) -> CompressResult:
    t_start = time.perf_counter()
    run = _open(source, o, out, resume, force, progress)
    budget, early = _check_targets(run)  # an unreachable size fails here, before any file is written
    calib = _calibration(run)
    if resume and (run.tmp / MANIFEST).is_file():  # stopped while finishing: merged tensors and manifest are complete
        return CompressResult(out, _finish_stopped(run))
    run.state = rundir.start_or_resume(run.tmp, run.state_file, run.o, resume, force)
    _write_base(run)
    x, ctxs, rot = _first_inputs(run, calib)
    _settle_plans(run, budget, early, x, ctxs)
    flow = _Flow.start(run, x, rot)
    n_layers = run.source.config.num_hidden_layers
    for i in range(n_layers):
        _layer(run, flow, i, ctxs[i])
        if stop_after is not None and i + 1 >= stop_after and i + 1 < n_layers:
            raise KeyboardInterrupt
    _write_head(run, flow)
    return CompressResult(out, _finish(run, calib, time.perf_counter() - t_start))


@dataclass
class _Run:
    """What one compress run fixed when it opened: the (rotated) source, the resolved options, the run directory,
    the skeleton whose blocks are filled one at a time, and each linear's plan. STATE is the run state that
    OUT.partial/state.json holds (empty until the run starts or resumes)."""

    source: ModelSource
    o: CompressOptions
    out: Path
    tmp: Path
    device: torch.device
    arch: archs.Arch
    model: nn.Module
    model_params: int
    shapes: dict[str, tuple[int, int]]
    plans: dict[str, LinearPlan]
    vocab: emb.VocabPlan
    progress: Progress | None
    state: dict = field(default_factory=dict)

    @property
    def state_file(self) -> Path:
        return self.tmp / "state.json"

    def peak(self, where: str) -> None:
        rundir.note_peak(self.state, where)

    def save_state(self) -> None:
        atomic_write_json(self.state_file, self.state)


def _open(source: ModelSource, o: CompressOptions, out: Path, resume: bool, force: bool,
          progress: Progress | None) -> _Run:
    """Check OUT, apply the recipe and the rotations, build the skeleton and plan every linear."""
    tmp = partial_dir(out)
    if out.exists() and not force and not (resume and tmp.exists()):
        raise LrdError(f"{out} already exists; pass --force to overwrite it")
    if tmp.exists() and not (resume or force):
        raise LrdError(f"an unfinished run is in {tmp}; pass --resume to continue it or --force to start over")
    device = o.torch_device()
    o = recipe.apply(o, source.config.hidden_size)
    arch = archs.get(source.config)
    if o.rotate != "none":  # every tensor the run reads comes out rotated; the norms it folds read as ones
        source = rotate.RotatedSource(source, o.rotate, o.rotate_seed)
    down_rot = rotate.InputRotation.for_down(source.config, o.rotate_seed) if o.rotate_down else None
    if down_rot is not None:  # down_proj reads x·B: its weight comes out as W·B, the blocks rotate its input
        source = rotate.DownRotatedSource(source, down_rot)
    model = skeleton(source.config)
    rotate.install_down(model, down_rot)
    model_params = sum(p.numel() for p in model.parameters())  # tied embeddings count once, as Lillama counts
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(source.config.num_hidden_layers):
        block = model.model.layers[i]
        for name in arch.linears:
            m = block.get_submodule(name)
            shapes[layer_prefix(i) + name] = (m.out_features, m.in_features)
    step = ranks.rank_step(o)
    plans = {k: plan_linear(k, shp, o, rank=step if o.targeted else None) for k, shp in shapes.items()}
    vocab = emb.plan_vocab(o.embed_type, o.output_type, source.config, source.has(emb.HEAD),
                           tuple(model.model.embed_tokens.weight.shape))
    return _Run(source, o, out, tmp, device, arch, model, model_params, shapes, plans, vocab, progress)


def _check_targets(run: _Run) -> tuple[dict | None, dict | None]:
    """--mix-bpw's budget and --target-bpw's first allocation: each raises on a size the run cannot reach."""
    o = run.o
    budget = _mix_budget(run) if o.mix_bpw is not None else None
    early = None
    if o.targeted:
        first = o if o.allocation != "error" else replace(o, allocation="uniform")
        early = ranks.allocation_record(first, run.plans, run.shapes, run.model_params, None)
    return budget, early


def _calibration(run: _Run) -> torch.Tensor:
    """The calibration sequences, token ids on the run's device."""
    o, source = run.o, run.source
    ids = tokenize(source.tokenizer(), load_text(o.calib, o.calib_range))
    vocab_size = source.config.vocab_size
    if len(ids) and int(ids.max()) >= vocab_size:
        raise LrdError(f"the tokenizer of {source.spec} yields id {int(ids.max())}, but the model has only "
                       f"{vocab_size} embeddings: tokenizer and weights do not belong together")
    return calibration_ids(ids, o.calib_tokens, o.seq_len, o.seed).to(run.device)


def _finish_stopped(run: _Run) -> dict:
    """Resume a run that stopped after writing its manifest: only the move to OUT is left."""
    import json

    if json.loads((run.tmp / MANIFEST).read_text()).get("options") != run.o.to_json():
        raise LrdError(f"cannot resume {run.tmp}: it was started with other options; pass --force to start over")
    return rundir.finalize(run.tmp, run.out)


def _write_base(run: _Run) -> None:
    """A new run's first shard: the source's metadata, the embedding and (unless it waits) the head."""
    source, tmp = run.source, run.tmp
    if run.state["layers_done"] == 0 and not (tmp / "base.safetensors").exists():
        source.save_meta(tmp)
        if run.vocab.untie:
            emb.untie_config(tmp / "config.json")
        rundir.save_vocab(tmp / "base.safetensors", _base_tensors(source, run.vocab), run.state, run.state_file)
        run.peak("embedding and head")


def _first_inputs(run: _Run, calib: torch.Tensor) -> tuple[torch.Tensor, BlockContext, nn.Module]:
    """The first block's inputs (the calibration ids' embedding rows: the table is never built), each block's
    context (masks, positions, RoPE) and the rotary embedding they share. The skeleton drops its embedding."""
    model = run.model
    x = run.source.rows(emb.EMBED, calib).to(run.device)
    scale = embed_scale(run.source.config)
    if scale is not None:
        x = x * scale
    model.model.embed_tokens = None  # only one block stays resident
    rot = rotary(model, run.device)
    return x, BlockContext(model, x[: run.o.batch_size], rot), rot


def _settle_plans(run: _Run, budget: dict | None, early: dict | None, x: torch.Tensor, ctxs: BlockContext) -> None:
    """--target-bpw's ranks and --mix-bpw's formats, decided once and kept in the run state (a resumed run reads
    them back)."""
    o, state, shapes = run.o, run.state, run.shapes
    if o.targeted:
        if "allocation" not in state:
            if o.allocation == "error":
                curves = ranks.error_curves(run.model, run.arch, run.plans, o, x, ctxs, run.source.tensor, run.device)
                early = ranks.allocation_record(o, run.plans, shapes, run.model_params, curves)
            state["allocation"] = early
            run.save_state()
        allocated = state["allocation"]["ranks"]
        run.plans = {k: plan_linear(k, shp, o, rank=allocated[k]) for k, shp in shapes.items()}
    if o.mix_bpw is not None:
        if "mix" not in state:
            t_mix = time.perf_counter()
            state["mix"] = _mix(run, budget, x, ctxs)
            rundir.add_seconds(state, "sensitivity", time.perf_counter() - t_mix)
            run.save_state()
            run.peak("sensitivity pass")
            release_freed_memory()  # the pass's blocks and activations: the main pass's peak must not sit on them
        formats = state["mix"]["formats"]
        run.plans = {k: plan_linear(k, shp, o, rank=run.plans[k].rank, q_format=formats[k])
                     for k, shp in shapes.items()}


@dataclass
class _Flow:
    """The activations that climb the blocks: the original blocks' (TEACHER_X) and the compressed blocks'
    (STUDENT_X), each kept only when the run reads it, plus distillation's batch contexts and step count."""

    teacher_x: torch.Tensor | None
    student_x: torch.Tensor | None
    modes: list[str]
    dctxs: BlockContext | None
    steps: int

    @classmethod
    def start(cls, run: _Run, x: torch.Tensor, rot: nn.Module) -> _Flow:
        o = run.o
        modes = o.distill_modes()
        steps = o.distill_steps if o.distill_epochs is None else dst.steps_for(o.distill_epochs, len(x),
                                                                                 o.distill_batch)
        return cls(
            teacher_x=x if o.inputs == "teacher" or modes else None,
            student_x=x if o.inputs == "student" or "student" in modes else None,
            modes=modes,
            dctxs=BlockContext(run.model, x[: min(o.distill_batch, len(x))], rot) if modes else None,
            steps=steps,
        )

    def climb(self, run: _Run, teacher: nn.Module, prefix: str, shard: Path, ctx: dict,
              y: torch.Tensor | None) -> None:
        """Both streams through block PREFIX: the student's through the block just written (read back from its
        SHARD), the teacher's through the original block (Y when distillation already computed it)."""
        if self.student_x is not None:
            t1 = time.perf_counter()
            student = rundir.student_block(teacher, prefix, shard, run.state["linears"], run.device)
            self.student_x = run_block(student, self.student_x, ctx, run.o.batch_size)
            del student
            rundir.add_seconds(run.state, "student_forward", time.perf_counter() - t1)
            run.peak(f"{prefix}: compressed block's forward")
        if y is not None:
            self.teacher_x = y
        elif self.teacher_x is not None:
            self.teacher_x = run_block(teacher, self.teacher_x, ctx, run.o.batch_size)
            run.peak(f"{prefix}: original block's forward")


def _layer(run: _Run, flow: _Flow, i: int, ctx: dict) -> None:
    """Block I: compress and write it unless a resumed run already did, move the streams up through it, drop it."""
    prefix = layer_prefix(i)
    teacher = materialize(run.model.model.layers[i], prefix, run.source.tensor, run.device)
    shard = run.tmp / "layers" / f"{i:04d}.safetensors"
    y = None
    if i >= run.state["layers_done"]:
        y = _write_layer(run, flow, i, teacher, ctx, shard)
    elif run.progress:
        for name in run.arch.linears:
            run.progress(f"layer {i} {name} (resumed)")
    flow.climb(run, teacher, prefix, shard, ctx, y)
    run.model.model.layers[i] = None  # drop the block: peak memory must not grow with depth
    del teacher


def _write_layer(run: _Run, flow: _Flow, i: int, teacher: nn.Module, ctx: dict, shard: Path) -> torch.Tensor | None:
    """Collect H, decompose, distill when asked, write block I's shard and record it in the run state. Returns the
    teacher block's outputs when distillation computed them (the next block's teacher inputs)."""
    o, state, prefix = run.o, run.state, layer_prefix(i)
    t0 = time.perf_counter()
    stages = state.setdefault("stage_seconds", {})
    tensors, entries, parts = _compress_block(
        teacher, run.arch, prefix, run.plans, o, flow.student_x if o.inputs == "student" else None,
        flow.teacher_x if o.inputs == "teacher" else None, ctx, run.progress, stages, run.peak)
    records = {k: v.to_json() for k, v in entries.items()}
    y = None
    if flow.modes:
        y = run_block(teacher, flow.teacher_x, ctx, o.batch_size)  # the targets, and the next teacher input
        report = dst.distill_block(teacher, prefix, parts, tensors, records, o, flow.teacher_x, flow.student_x, y,
                                   ctx, flow.dctxs[i], flow.steps, i)
        state.setdefault("distill", []).append(report)
        run.peak(f"{prefix}: distillation")
    rundir.save_shard(shard, tensors, teacher, prefix, run.arch)
    del tensors, parts  # block i's damped H (321 MB for an 8960-wide down_proj) must not meet block i+1's
    state["linears"].update(records)
    state["layers_done"] = i + 1
    state["seconds"] += time.perf_counter() - t0
    run.save_state()
    return y


def _write_head(run: _Run, flow: _Flow) -> None:
    """The head, when its format weighs columns by its inputs: the final hidden states after the final norm."""
    if not run.vocab.head_needs_inputs:
        return
    source, vocab = run.source, run.vocab
    norm = materialize(run.model.model.norm, "model.norm.", source.tensor, run.device)
    importance = emb.input_importance(norm, flow.student_x if flow.student_x is not None else flow.teacher_x,
                                      run.o.batch_size)
    head = emb.encode(source, vocab.head_from, vocab.head, vocab.shape, importance)
    run.peak("head with its input importance")
    rundir.save_vocab(run.tmp / "head.safetensors", {emb.HEAD: head}, run.state, run.state_file)


def _mix_budget(run: _Run) -> dict:
    """--mix-bpw's budget, checked before any file is written: the whole file's bytes less what the mix does not
    choose (embedding and head in their formats, norms and biases in float32, L·R), over the weights as
    llama-quantize counts a file (the model's parameters, a tied embedding once, plus a head stored apart)."""
    source, o, model, plans, shapes, vocab = run.source, run.o, run.model, run.plans, run.shapes, run.vocab
    rows, cols = vocab.shape
    fixed = sum(_vocab_bytes(source, fmt, name, vocab.shape) for fmt, name in
                ((vocab.embed, emb.EMBED), (vocab.head, vocab.head_from)) if fmt is not None)
    linear_weights = {k + ".weight" for k in shapes}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or name in linear_weights or name in (emb.EMBED, emb.HEAD):
            continue
        seen.add(id(p))
        fixed += p.numel() * 4  # norms and biases, stored in float32
    for k, (out, in_) in shapes.items():
        if plans[k].rank:
            fixed += plans[k].rank * (out + in_) * ranks.bytes_per_weight(plans[k].lr_format)
    tied = bool(getattr(source.config, "tie_word_embeddings", False))
    weights = run.model_params + (rows * cols if tied and vocab.head is not None else 0)
    least = 8 * (fixed + sum(mix.q_bytes(shapes[k], p.q_format) for k, p in plans.items())) / weights
    if o.mix_bpw < least:
        raise LrdError(f"--mix-bpw {o.mix_bpw} is below the smallest file the run's starting formats make "
                       f"({least:.3f} bpw); ask for at least that, or start lower (--q-format q2_k, --preset q2, a "
                       "smaller --rank)")
    return {"weights": weights, "fixed": fixed, "linears": o.mix_bpw * weights / 8 - fixed}


def _mix(run: _Run, budget: dict, x: torch.Tensor, ctxs: BlockContext) -> dict:
    """--mix-bpw: the Q format of every linear, from a sensitivity pass of the teacher (compressor/mix.py)."""
    start = {k: p.q_format for k, p in run.plans.items()}
    sx = x[: mix.SEQUENCES]
    sens = mix.sensitivity(run.model, run.arch, start, sx, ctxs, run.source.tensor, run.device, run.o.batch_size,
                           run.progress)
    chosen = mix.allocate(start, run.shapes, sens, budget["linears"])
    return mix.record(run.o.mix_bpw, budget["weights"], budget["fixed"], chosen, run.shapes, sens, start,
                      int(sx.shape[0] * sx.shape[1]))


def _vocab_bytes(source: ModelSource, fmt: str, name: str, shape: tuple[int, int]) -> float:
    if fmt == emb.SOURCE:
        _, data = source.native(name)
        return data.numel() * data.element_size()
    return shape[0] * shape[1] * ranks.bytes_per_weight(fmt)


def _base_tensors(source: ModelSource, vocab: emb.VocabPlan) -> dict[str, torch.Tensor | emb.Stored]:
    """Everything outside the blocks: the final norm as the source stores it, the embedding in its format, and the
    head unless it waits for its input importance (or is the tied embedding)."""
    names = [n for n in source.names() if not n.startswith("model.layers.") and n not in (emb.EMBED, emb.HEAD)]
    tensors: dict[str, torch.Tensor | emb.Stored] = {n: source.stored(n) for n in names}
    tensors[emb.EMBED] = emb.encode(source, emb.EMBED, vocab.embed, vocab.shape)
    if vocab.head is not None and not vocab.head_needs_inputs:
        tensors[emb.HEAD] = emb.encode(source, vocab.head_from, vocab.head, vocab.shape)
    return tensors


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
    peak: Callable[[str], None],
) -> tuple[dict[str, torch.Tensor], dict[str, LinearEntry], dict[str, tuple[dec.Decomposition, torch.Tensor]]]:
    """Compress the linears of one block, group by group, with H from student or teacher inputs.

    Also returns each linear's decomposition and damped H, which distillation starts from and re-measures with
    (empty when the run does not distill).
    """
    student = copy.deepcopy(teacher)
    keep_parts = bool(o.distill_modes())
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
        fac = dec.hessian_factor(next(h_stages), o.damp, consume=True)  # fac.H: H, damped in place
        stages["h_collection"] = stages.get("h_collection", 0.0) + time.perf_counter() - t_h
        peak(f"{prefix}{group[0]}: H and its factors")
        for name in group:
            full = prefix + name
            plan = plans[full]
            W, bias = _weights(teacher, name)
            t0 = time.perf_counter()
            d = dec.decompose(
                W, fac, o.method, plan.q_format, plan.rank, plan.lr_format, o.iters, o.lplr_iters, o.whiten
            )
            part = dec.linear_tensors(full, d, bias)
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
                bytes=dec.linear_bytes(part, full),
            )
            _swap(student, name, d, bias)
            peak(f"{full}: decomposition")
            if keep_parts:  # only distillation reads them: otherwise each linear's values would be held twice
                parts[name] = (d, fac.H)
            if progress:
                progress(f"layer {prefix.split('.')[2]} {name}")
        t_h = time.perf_counter()  # the next group's H starts here: its activations come from the swapped linears
    return tensors, entries, parts


def _swap(block: nn.Module, name: str, d: dec.Decomposition, bias: torch.Tensor | None) -> None:
    parent_name, _, child = name.rpartition(".")
    qlr = QLRLinear.from_values(
        None if d.Q is None else d.Q.values,
        None if d.LR is None else d.LR.L.values,
        None if d.LR is None else d.LR.R.values,
        bias,
    )
    parent = block.get_submodule(parent_name)
    setattr(parent, child, rotate.carry(getattr(parent, child), qlr))


def _finish(run: _Run, calib: torch.Tensor, seconds: float) -> dict:
    """Merge the shards into model.safetensors, write the manifest and move OUT.partial to OUT."""
    source, o, tmp, state, device = run.source, run.o, run.tmp, run.state, run.device
    shards = [tmp / "base.safetensors"] + sorted((tmp / "layers").glob("*.safetensors"))
    shards += [f for f in (tmp / "head.safetensors",) if f.is_file()]
    merge_safetensors(tmp / WEIGHTS, shards)
    rundir.note_peak(state, "merging the shards")
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
        **({rotate.MANIFEST_KEY: source.rotation_down.record()} if o.rotate_down else {}),
        **vocab,
        "summary": summarize(linears, vocab.get("tensors"), **_whole_file(source, tmp / WEIGHTS, vocab)),
        **_refine_records(o, state),
        "timings": {
            "compress_seconds": round(state["seconds"], 2),
            "stages": rundir.stage_seconds(state),
            "wall_seconds_this_run": round(seconds, 2),
            "device": str(device),
            "host": platform.node(),
            "threads": torch.get_num_threads(),
            "peak_rss": state.get("peak_rss"),  # where the run's resident memory peaked (all parts of a resume)
        },
        "files": {WEIGHTS: {"sha256": sha256_file(tmp / WEIGHTS), "bytes": (tmp / WEIGHTS).stat().st_size}},
    }
    atomic_write_json(tmp / MANIFEST, manifest)
    return rundir.finalize(tmp, run.out)


def _refine_records(o: CompressOptions, state: dict) -> dict:
    """The manifest's allocation, mix and distillation sections, when the run had them."""
    rec: dict = {}
    for key in ("allocation", "mix"):
        if key in state:
            rec[key] = state[key]
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



