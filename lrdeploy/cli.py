"""The `lrdeploy` command line: a thin layer over the compressor, exporters and runtime."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lrdeploy.errors import LrdError, ctrl_c_wins

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,  # click's plain help: typer's rich panels give every flag a '<bool>' value to type
    help="Compress LLMs into W ~ Q + L·R (low-precision backbone plus low-rank factors) and deploy them.",
)
err = Console(stderr=True)
out = Console()


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet,
        transient=True,
    )


@app.command()
def compress(
    source: str = typer.Argument(..., help="HF directory, hub id, .gguf file, or 'smollm2' (the bundled model)."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to write."),
    method: str = typer.Option("caldera", help="caldera | ldlq | lowrank | rtn."),
    q_format: str = typer.Option("q2_k", help="Grid of the backbone Q: q2_k | q3_k | q4_k | q4_0 | q8_0, or a "
                                 "llama.cpp i-quant (GGUF only): iq2_xxs | iq2_xs | iq2_s | iq3_xxs | iq3_s | iq4_nl | "
                                 "iq4_xs."),
    rank: int | None = typer.Option(None, help="Rank of L·R (default: caldera 32, lowrank 64, others 0)."),
    lr_format: str | None = typer.Option(None, help="Grid of L and R: f16 | q8_0 | q4_0 (default: caldera q4_0)."),
    iters: int = typer.Option(2, help="CALDERA outer iterations."),
    lplr_iters: int = typer.Option(2, help="Inner L/R iterations per outer iteration."),
    calib: str | None = typer.Option(None, help="Calibration text: .txt, .jsonl, or a datasets name (default: "
                                        "CPython's pydoc topics, always installed)."),
    calib_range: str | None = typer.Option(None, help="Part of the calibration text to use, as fractions 'a:b'."),
    calib_tokens: int = typer.Option(16384, help="Calibration tokens."),
    seq_len: int = typer.Option(512, help="Calibration sequence length."),
    seed: int = typer.Option(0, help="Seed for the calibration sample."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    inputs: str = typer.Option("student", help="Which hidden states feed H: student (compressed so far) | teacher."),
    target: str = typer.Option("gguf", help="Format constraints to respect: gguf (rows fit blocks) | onnx | any."),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="Per-tensor Q format override NAME=FMT, "
                                          "e.g. down_proj=q3_k (substring of the linear's name; repeatable)."),
    tensor_rank: list[str] = typer.Option([], "--tensor-rank", help="Per-tensor rank override NAME=N, e.g. "
                                          "self_attn=0 for L·R only in the MLP (substring; repeatable)."),
    rotate: str = typer.Option("none", help="Fold a seeded randomized Hadamard rotation into the weights before "
                               "H is collected: none | residual (the residual stream; norms become ones, a tied head "
                               "is untied) | residual+head (also each attention head's value space)."),
    rotate_seed: int = typer.Option(0, help="Seed of --rotate's random signs."),
    rotate_down: bool = typer.Option(False, "--rotate-down", help="Also rotate down_proj's input online (a "
                                     "randomized Hadamard in blocks of 256, applied at run time): torch and ONNX run "
                                     "it, llama.cpp cannot, so it needs --target onnx or any."),
    preset: str = typer.Option("auto", help="Whole-file mix of embedding, output and small-linear formats: auto (q2 or "
                               "q3 by --q-format where rows hold 256-weight super-blocks, else source) | q2 (q2_k "
                               "embedding, q4_k output, q4_k k/v_proj) | q3 (q3_k embedding, else as q2) | source."),
    embed_type: str | None = typer.Option(None, "--embed-type", help="Format of the token embedding: source (as the "
                                          "source stores it) | f16 | q8_0 | q4_0 | q4_k | q3_k | q2_k | an i-quant."),
    output_type: str | None = typer.Option(None, "--output-type", help="Format of the output matrix (lm_head): "
                                           "source (as the source stores it) | f16 | q8_0 | q4_0 | q4_k | q3_k | "
                                           "q2_k | an i-quant. A format other than the embedding's unties a tied "
                                           "model."),
    no_whiten: bool = typer.Option(False, "--no-whiten", help="lowrank: plain SVD instead of the H-whitened fit."),
    fallback: str = typer.Option("auto", help="Format of a tensor whose rows don't fit --q-format: auto (iq4_nl for "
                                 "--target gguf, as llama-quantize does; q4_0 otherwise) | iq4_nl | q4_0 | q8_0."),
    no_fallback: bool = typer.Option(False, "--no-fallback", help="Fail instead of falling back (--fallback) where "
                                     "a tensor's rows don't fit --q-format."),
    refine: str = typer.Option("none", help="none | distill: train each block's L and R against the original block "
                               "(Lillama feature distillation; lowrank, or caldera with Q frozen)."),
    distill_inputs: str = typer.Option("teacher+student", help="Block inputs to distill on: teacher | student | "
                                       "teacher+student (two backward passes, one step)."),
    distill_lr: float = typer.Option(1e-4, help="AdamW learning rate for distillation."),
    distill_steps: int = typer.Option(64, help="Optimizer steps per block."),
    distill_epochs: float | None = typer.Option(None, help="Instead of --distill-steps: passes over the "
                                                "calibration sequences per block."),
    distill_batch: int = typer.Option(4, help="Calibration sequences per distillation step."),
    target_params: float | None = typer.Option(None, help="lowrank: ranks that remove this % of ALL the model's "
                                               "parameters (embeddings included)."),
    target_bpw: float | None = typer.Option(None, help="lowrank|caldera: ranks that bring Q + L + R to this bpw."),
    allocation: str = typer.Option("uniform", help="How ranks meet the target: uniform | bottom | top | error "
                                   "(greedy on H-error removed per byte)."),
    mix_bpw: float | None = typer.Option(None, "--mix-bpw", help="Whole-file bits per weight (as llama-quantize "
                                         "counts a file) to reach by moving the linears whose measured sensitivity "
                                         "pays most per byte up q2_k -> q3_k -> q4_k from --q-format (q2_k or q3_k)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last finished layer."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT or discard an unfinished run."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bar."),
) -> None:
    """Compress SOURCE layer by layer into an artifact (manifest + safetensors)."""
    from lrdeploy.compressor import arch as archs
    from lrdeploy.compressor.driver import CompressOptions
    from lrdeploy.compressor.driver import compress as run
    from lrdeploy.compressor.sources import open_source

    opts = CompressOptions(
        method=method, q_format=q_format, rank=rank, lr_format=lr_format, iters=iters, lplr_iters=lplr_iters,
        calib=calib, calib_range=calib_range, calib_tokens=calib_tokens, seq_len=seq_len, seed=seed,
        device=device, inputs=inputs, target=target, whiten=not no_whiten, allow_fallback=not no_fallback,
        fallback=fallback,
        tensor_types=_pairs(tensor_type, "--tensor-type"), tensor_ranks=_int_pairs(tensor_rank, "--tensor-rank"),
        embed_type=embed_type, output_type=output_type, preset=preset, rotate=rotate, rotate_seed=rotate_seed,
        rotate_down=rotate_down,
        refine=refine, distill_inputs=distill_inputs,
        distill_lr=distill_lr, distill_steps=distill_steps, distill_epochs=distill_epochs, distill_batch=distill_batch,
        target_params=target_params, target_bpw=target_bpw, allocation=allocation, mix_bpw=mix_bpw,
    )
    opts.resolved()
    src = open_source(source)
    with _progress(quiet or as_json) as bar:
        passes = 2 if mix_bpw is not None else 1  # a sensitivity pass first, one step per linear as well
        task = bar.add_task("compressing", total=passes * src.n_layers * len(archs.get(src.config).linears))
        try:
            with ctrl_c_wins():
                result = run(src, opts, output, resume=resume, force=force,
                             progress=lambda d: bar.update(task, advance=1, description=d))
        except KeyboardInterrupt:
            bar.stop()
            err.print(f"interrupted; {_kept(output, failed=False)}", soft_wrap=True)
            raise typer.Exit(130) from None
        except OSError as e:  # a full disk or a failed write: the driver tidied OUTPUT.partial under its lock
            bar.stop()
            raise LrdError(f"{_os_error(e)}; {_kept(output)}") from None
    summary = result.manifest["summary"]
    if as_json:
        print(json.dumps({"output": str(output), **summary, "timings": result.manifest["timings"]}))
        return
    _print_summary(result.manifest)


def _kept(output: Path, failed: bool = True) -> str:
    """What a stopped compress leaves, checked on disk: the finished layers and how to resume them, or that there is
    nothing to resume. FAILED: an error (not an interruption) stopped it, and must be fixed first."""
    from lrdeploy.compressor.rundir import finished_layers
    from lrdeploy.io import partial_dir

    done, tmp = finished_layers(output), partial_dir(output)
    fix = "; fix the problem, then resume" if failed else ". Resume"
    if done:
        return f"{done} finished layers are kept in {tmp}{fix} with: {_resume_command()}"
    if tmp.is_dir():
        return (f"no layer had finished; {tmp} holds the run's set-up only{fix} with: {_resume_command()} "
                "(or pass --force to start over)")
    return "no layer had finished and nothing was written; " + ("fix the problem, then " if failed else "") + \
        "run the command again"


def _resume_command() -> str:
    """The command line that was run, with --resume instead of --force."""
    args = [a for a in sys.argv[1:] if a not in ("--force", "--resume")]
    return "lrdeploy " + " ".join(args) + " --resume"


def _os_error(e: OSError) -> str:
    """'cannot write FILE: No space left on device' rather than a traceback."""
    what = f" {e.filename}" if e.filename else ""
    return f"I/O error on{what}: {e.strerror or e}"


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise LrdError(f"{flag} expects NAME=VALUE, got '{item}'")
        pairs[key] = value
    return pairs


def _int_pairs(items: list[str], flag: str) -> dict[str, int]:
    pairs = {}
    for key, value in _pairs(items, flag).items():
        try:
            pairs[key] = int(value)
        except ValueError:
            raise LrdError(f"{flag} expects NAME=INTEGER, got '{key}={value}'") from None
    return pairs


def _print_summary(manifest: dict) -> None:
    from lrdeploy.runtime.inspect import mix_notes, rotation_notes

    s = manifest["summary"]
    t = Table(title=f"{manifest['method']} -> bpw {s['bpw']:.3f}")
    t.add_column("linear")
    t.add_column("rel. H-error", justify="right")
    for k, v in s["error_by_type"].items():
        t.add_row(k, f"{v:.4f}")
    out.print(t)
    out.print(
        f"bpw {s['bpw']:.3f} over {s['linear_params']:,} linear weights ({s['linear_bytes']:,} bytes), "
        f"{s['fallbacks']} of {s['linears']} tensors fell back, "
        + (f"whole-file bpw {s['whole_bpw']:.3f} (embedding {s.get('embed_bytes', 0):,} bytes, separate head "
           f"{s.get('output_bytes', 0):,} bytes), " if "whole_bpw" in s else "")
        + f"compress time {manifest['timings']['compress_seconds']:.1f} s"
    )
    o = manifest.get("options", {})
    mix = [f"preset {o['preset']}"] if "preset" in o else []
    mix += rotation_notes(manifest) + mix_notes(manifest)
    if mix:
        out.print(", ".join(mix), soft_wrap=True)


@app.command("eval")
def eval_(
    source: str = typer.Argument(..., help="Artifact, model source (HF dir, hub id, .gguf, smollm2), or an export "
                                 "directory (llamacpp: model.gguf [+ adapter.gguf]; onnxruntime: model.onnx)."),
    text: str | None = typer.Option(None, help="Eval text: .txt, .jsonl or datasets name (default: pydoc)."),
    text_range: str | None = typer.Option(None, help="Part of the text to use, as fractions 'a:b'."),
    ctx: int = typer.Option(2048, help="Window length in tokens."),
    windows: int | None = typer.Option(None, help="Score at most this many windows."),
    backend: str = typer.Option("auto", help="auto (llamacpp for a GGUF export or .gguf, onnxruntime for an ONNX "
                                "export or .onnx, else torch) | torch | llamacpp | onnxruntime."),
    lora: Path | None = typer.Option(None, help="llamacpp: a LoRA adapter GGUF to apply to SOURCE (.gguf; default: "
                                     "the adapter.gguf beside it, if any)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bar."),
) -> None:
    """Perplexity of a model, artifact or export (non-overlapping ctx windows, every predicted token scored)."""
    from lrdeploy.compressor.text import eval_windows, load_text, tokenize
    from lrdeploy.runtime.backends import adapter_beside, auto_backend, check_backend, open_backend
    from lrdeploy.runtime.eval import perplexity

    if ctx < 2:
        raise LrdError("--ctx must be at least 2")
    check_backend(backend)
    if backend == "auto":
        backend = auto_backend(source)
    adapter = adapter_beside(source)
    if backend == "torch" and lora is None and adapter is not None:
        err.print(f"warning: --backend torch loads {source} without the {adapter} beside it; use --backend llamacpp "
                  "to apply it", markup=False, highlight=False, soft_wrap=True)
    model = open_backend(source, backend, device=device, lora=lora, n_ctx=ctx)
    ids = tokenize(model.tokenizer, load_text(text, text_range))
    wins = eval_windows(ids, ctx, windows)
    with _progress(quiet or as_json) as bar:
        task = bar.add_task("evaluating", total=len(wins))
        res = perplexity(model.logits, wins, lambda: bar.update(task, advance=1))
    row = {"ppl": res.ppl, "nll": res.nll, "tokens": res.tokens, "windows": res.windows, "ctx": res.ctx,
           "bpw": model.bpw, "backend": backend, "protocol": res.protocol, "source": source,
           "window_nll": list(res.window_nll)}
    if as_json:
        print(json.dumps(row))
    else:
        out.print(f"perplexity {res.ppl:.4f} over {res.tokens:,} tokens ({res.windows} windows of {ctx}, {backend})"
                  + (f", bpw {model.bpw:.3f}" if model.bpw is not None else ""))


@app.command()
def export(
    source: str = typer.Argument(..., help="Artifact directory, or a model source for an uncompressed baseline."),
    fmt: str = typer.Option(..., "--format", help="gguf | onnx."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory to write."),
    dtype: str | None = typer.Option(None, help="Float type of the uncompressed tensors: gguf f32|f16 "
                                        "(default f16); onnx fp32|fp16 (default: what --ep picks)."),
    merge: bool = typer.Option(False, "--merge", help="gguf: one file with Q + L·R requantized (no LoRA)."),
    graph: str = typer.Option("auto", "--graph", help="onnx: fused (onnxruntime's GroupQueryAttention and fused "
                              "RMSNorms, shared KV buffer) | plain (standard ops, growing cache) | auto (fused where "
                              "the model fits it)."),
    ep: str | None = typer.Option(None, "--ep", help="onnx: the execution provider the file is built for, as "
                                  "onnxruntime-genai's builder's -e: cpu (fp32, int8 activations: MatMulNBits' "
                                  "accuracy_level 4, fastest on CPU, not bit-exact) | cuda (fp16, which the CUDA EP's "
                                  "GroupQueryAttention needs) | auto (default: cuda where a CUDA GPU is present, else "
                                  "cpu)."),
    exact: bool = typer.Option(False, "--exact", help="onnx: fp32 with float activations (accuracy_level 0): the "
                               "export reproduces the artifact's logits; slower decode on CPU."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT."),
    as_json: bool = typer.Option(False, "--json", help="Print the export summary as JSON."),
) -> None:
    """Export an artifact (or an uncompressed model) to GGUF (base + LoRA adapter) or ONNX (split Q + L·R)."""
    if fmt == "gguf":
        from lrdeploy.exporters.gguf import export_gguf

        if graph != "auto" or ep is not None or exact:
            raise LrdError("--graph, --ep and --exact apply to --format onnx only")
        summary = export_gguf(source, output, dtype=dtype or "f16", merge=merge, force=force)
    elif fmt == "onnx":
        from lrdeploy.exporters.onnx import export_onnx

        if merge:
            raise LrdError("--merge applies to --format gguf only")
        summary = export_onnx(source, output, ep=ep or "auto", exact=exact, dtype=dtype, force=force, graph=graph)
    else:
        raise LrdError(f"unknown export format '{fmt}'; choose gguf or onnx")
    if as_json:
        print(json.dumps(summary))
    else:
        out.print(summary.get("message") or json.dumps(summary, indent=1))
        for note in summary.get("notes") or []:  # what the export costs on onnxruntime's kernels
            err.print(f"note: {note}", markup=False, highlight=False)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A .gguf or .onnx file, an export directory or an artifact directory."),
    verify: bool = typer.Option(False, "--verify", help="Also check the data: every file against the sha256 its "
                                "manifest records (artifacts), the graph (ONNX), the tensor layout and every tensor's "
                                "bytes (GGUF: no NaN/Inf in floats or block scales). Prints what was checked."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List a GGUF's, an ONNX model's or an artifact's tensors with their types, bytes and bpw."""
    from lrdeploy.runtime.inspect import inspect_path

    info = inspect_path(path, verify=verify)
    if as_json:
        print(json.dumps(info))
        return
    t = Table(title=f"{path}: {info['tensor_count']} tensors, {info['bytes']:,} bytes")
    for col in ("name", "type", "shape", "bytes", "bpw"):
        t.add_column(col, justify="right" if col in ("bytes", "bpw") else "left")
    for row in info["tensors"]:
        t.add_row(row["name"], row["type"], "x".join(map(str, row["shape"])), f"{row['bytes']:,}", f"{row['bpw']:.3f}")
    out.print(t)
    if info["bpw_file"] is not None:
        out.print(f"file bpw {info['bpw_file']:.3f} (all tensors: {info['bytes']:,} bytes over the model's "
                  f"{info['weights']:,} weights)", soft_wrap=True)
    source = {"tensors": "from the tensors", "manifest": "as the manifest records it",
              "lrdeploy_onnx.json": "as lrdeploy_onnx.json records it (the artifact's)"}.get(info["bpw_linears_from"])
    if info["bpw_linears"] is not None:
        out.print(f"linear bpw {info['bpw_linears']:.3f} (decoder linears, the README's definition: bytes of "
                  f"Q + L + R, scales included, over their weights; {source})", soft_wrap=True)
    else:
        out.print("linear bpw: none (no decoder linears recognized)", soft_wrap=True)
    for note in info.get("notes") or []:
        out.print(f"note: {note}", soft_wrap=True, markup=False)
    if verify:
        out.print(f"verified: {', '.join(info['verified']) or 'nothing recorded to check'}", soft_wrap=True)
        for line in info["checks"]:
            out.print(f"checked {line}", soft_wrap=True, markup=False)


@app.command()
def bench(
    targets: list[str] = typer.Argument(..., help="Artifacts, GGUF export directories (or .gguf files) and ONNX "
                                        "export directories."),
    baseline: str = typer.Option(..., help="The uncompressed model (e.g. smollm2); exported once per backend."),
    backend: str = typer.Option("auto", help="auto (from each target) | torch | onnxruntime | llamacpp."),
    ctx: str = typer.Option("512,2048", help="Context lengths to measure, comma-separated."),
    gen_tokens: int = typer.Option(32, help="Greedy tokens decoded at each ctx."),
    memory_budget: str | None = typer.Option(None, help="Find the longest context that fits, e.g. 4GiB (RSS on "
                                             "CPU, CUDA peak on GPU)."),
    runs: int = typer.Option(3, help="Runs per model; medians are reported."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    threads: int | None = typer.Option(None, help="CPU threads (default: all cores)."),
    ppl_text: str | None = typer.Option(None, "--ppl-text", help="Also measure perplexity on this text."),
    ppl_range: str | None = typer.Option(None, help="Part of the perplexity text, as fractions 'a:b'."),
    ppl_windows: int = typer.Option(8, help="Perplexity windows (512 tokens each)."),
    report: Path | None = typer.Option(None, help="Write report.md, report.json and PNG plots here."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bar."),
) -> None:
    """Memory, maximum context and throughput of TARGETS against the uncompressed baseline."""
    from lrdeploy.runtime.bench import BenchOptions, parse_bytes, parse_ctx, resolve_targets
    from lrdeploy.runtime.bench import bench as run
    from lrdeploy.runtime.bench_report import write_report

    opts = BenchOptions(ctx=parse_ctx(ctx), gen_tokens=gen_tokens, runs=runs, device=device, threads=threads,
                        memory_budget=parse_bytes(memory_budget) if memory_budget else None, ppl_text=ppl_text,
                        ppl_range=ppl_range, ppl_windows=ppl_windows)
    models = resolve_targets(targets, backend)
    with _progress(quiet or as_json) as bar:
        task = bar.add_task("benchmarking", total=None)
        result = run(models, baseline, opts, progress=lambda d: bar.update(task, advance=1, description=d),
                     total=lambda n: bar.update(task, total=n))
    if report is not None:
        write_report(result, report, "lrdeploy " + " ".join(sys.argv[1:]))
    if as_json:
        print(json.dumps(result))
        return
    _print_bench(result, report)


def _print_bench(result: dict, report: Path | None) -> None:
    mib = 1 << 20
    t = Table(title="lrdeploy bench (medians; × = against the uncompressed model on the same backend)")
    for col in ("model", "backend", "MiB", "RSS MiB", "prefill tok/s", "decode tok/s", "max ctx", "ppl"):
        t.add_column(col, justify="left" if col in ("model", "backend") else "right")
    for r in result["models"]:
        v = r["vs_baseline"]
        last = r["ctx"][-1]

        def x(val: float | None) -> str:
            return "" if val is None else f" {val:.2f}×"

        t.add_row(r["label"], r["backend"], f"{r['bytes'] / mib:,.0f}{x(v['bytes'])}",
                  f"{r['rss_after_load'] / mib:,.0f}{x(v['rss_after_load'])}",
                  f"{last['prefill_tps']:,.0f}{x(v['prefill_tps'][-1])} @{last['ctx']}",
                  f"{last['decode_tps']:,.1f}{x(v['decode_tps'][-1])} @{last['ctx']}",
                  f"{r['max_ctx']['tokens']:,}{x(v['max_ctx'])}" if "max_ctx" in r else "",
                  f"{r['ppl']:.2f}" if r.get("ppl") else "")
    out.print(t)
    if report is not None:
        out.print(f"report: {report / 'report.md'}")


# typer >= 0.29 bundles its own click (typer._click) and raises that click's exceptions, older typer raises click's:
# typer.BadParameter is the BadParameter of whichever click typer runs on, so its bases are the classes to catch.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_NO_ARGS = getattr(sys.modules[_CLICK_ERROR.__module__], "NoArgsIsHelpError", ())  # click < 8.2 exits 0 instead


def _usage_message(e: Exception) -> str:
    """Click's message on one line, lower-cased like ours, with where to look: 'no such option: --bogus (see ...)'."""
    msg = " ".join(e.format_message().split("\n")).strip().removesuffix(".")
    if msg[1:2].islower():
        msg = msg[0].lower() + msg[1:]
    ctx = getattr(e, "ctx", None)
    return f"{msg} (see '{ctx.command_path} --help')" if ctx is not None else msg


def main() -> None:
    # tokenizers warns in every child of a process that has used it (bench's workers, llama.cpp's tools): the CLI
    # tokenizes once per command, so its parallelism buys nothing and the warning would only clutter stderr
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with ctrl_c_wins():
            code = app(prog_name="lrdeploy", standalone_mode=False)  # non-standalone: codes come back, no exit
        if isinstance(code, int) and code:
            sys.exit(code)
    except LrdError as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except OSError as e:  # the disk or the file system, not a bug: one line, like LrdError
        err.print(f"error: {_os_error(e)}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(LrdError.exit_code)
    except _NO_ARGS as e:  # bare `lrdeploy`: the help, on stderr, exit 2 (nothing was run)
        e.show()
        sys.exit(e.exit_code)
    except _CLICK_ERROR as e:  # a command-line mistake: one line, like LrdError, and no traceback
        err.print(f"error: {_usage_message(e)}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(LrdError.exit_code)


if __name__ == "__main__":
    main()
