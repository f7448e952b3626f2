"""Benchmark (not a test): llama.cpp prefill and decode speed of SmolLM2 as base + adapter, F32, and llama-quantize.

Three GGUFs of the same model, side by side in one process:

* base + adapter: `lrdeploy export ARTIFACT --format gguf` (Q as native blocks, L·R as a LoRA applied at run time);
* F32: `lrdeploy export smollm2 --format gguf --dtype f32` (the uncompressed baseline);
* llama-quantize: the F32 file through llama.cpp's own quantizer (`llama_model_quantize`), at the preset whose file
  size is closest to base + adapter.

Each repetition times every variant in turn (so drift from other load hits all of them alike): prefill = one
batched eval of the prompt, decode = single-token evals. Medians over --runs repetitions after one warm-up.
Perplexity (llama.cpp, same HF-tokenized windows for all, every predicted token scored) is given for context.

    python tools/bench_gguf.py [--artifact ART] [--work DIR] [--prompt 128] [--decode 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from common import WIKITEXT

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_0", "Q4_K_S", "Q4_K_M")


def make_artifact(out: Path, calib: str) -> Path:
    """SmolLM2 with the compressor's defaults (caldera, q2_k, rank 32, q4_0 L/R) and the tests' cheap calibration."""
    from lrdeploy.compressor.driver import CompressOptions, compress
    from lrdeploy.compressor.sources import open_source

    if not (out / "lrdeploy.json").is_file():
        opts = CompressOptions(calib=calib, calib_range="0:0.5", calib_tokens=2048, seq_len=256, iters=1,
                               lplr_iters=1, device="cpu")
        compress(open_source("smollm2"), opts, out, force=True)
    return out


def quantize(src: Path, out: Path, preset: str, threads: int) -> Path:
    import llama_cpp

    if not out.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
        params.nthread = threads
        tmp = out.with_name(out.name + ".tmp")
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize failed for {preset}")
        tmp.replace(out)
    return out


def timed_runs(llm, prompt: list[int], cont: list[int]) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one repetition on a fresh KV cache."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for tok in cont:
        llm.eval([tok])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), len(cont) / (t2 - t1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, help="SmolLM2 artifact (default: compress one into WORK/artifact)")
    p.add_argument("--work", type=Path, default=Path("out/bench-gguf"))
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-write", action="store_true", help="Print the section instead of writing docs/results.md.")
    a = p.parse_args()
    if a.runs < 3:
        p.error("--runs must be at least 3 (medians of at least 3 runs)")

    import llama_cpp

    from lrdeploy.compressor.text import eval_windows, load_text, tokenize
    from lrdeploy.exporters.gguf import export_gguf
    from lrdeploy.runtime.eval import perplexity
    from lrdeploy.runtime.inspect import export_bpw
    from lrdeploy.runtime.llamacpp import amx_in_build, open_llamacpp

    calib = str(WIKITEXT)
    a.work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    art = a.artifact or make_artifact(a.work / "artifact", calib)
    lr_dir, f32_dir = a.work / "base+adapter", a.work / "f32"
    if not (lr_dir / "model.gguf").is_file():
        export_gguf(str(art), lr_dir, force=True)
    if not (f32_dir / "model.gguf").is_file():
        export_gguf("smollm2", f32_dir, dtype="f32", force=True)
    lr_bytes = sum(f.stat().st_size for f in lr_dir.glob("*.gguf"))
    quantized = {pr: quantize(f32_dir / "model.gguf", a.work / f"llama-quantize-{pr}.gguf", pr, a.threads)
                 for pr in PRESETS}
    preset, qfile = min(quantized.items(), key=lambda kv: abs(kv[1].stat().st_size - lr_bytes))

    variants = {
        "base + adapter (lrdeploy)": (lr_dir / "model.gguf", lr_dir / "adapter.gguf"),
        "F32": (f32_dir / "model.gguf", None),
        f"llama-quantize {preset}": (qfile, None),
    }
    tok = open_llamacpp(lr_dir, None, 256, "cpu").tokenizer
    text_ids = tokenize(tok, load_text(calib, "0.5:1"))
    prompt = text_ids[: a.prompt].tolist()
    cont = text_ids[a.prompt : a.prompt + a.decode].tolist()
    windows = eval_windows(text_ids, 256, a.ppl_windows)

    rows: dict[str, dict] = {}
    llms: dict[str, object] = {}
    for name, (model, lora) in variants.items():
        be = open_llamacpp(model, lora, 256, "cpu", n_threads=a.threads)
        ppl = perplexity(be.logits, windows).ppl
        be.close()
        size = model.stat().st_size + (lora.stat().st_size if lora else 0)
        rows[name] = {"bytes": size, "bpw": export_bpw(model, lora), "ppl": ppl, "prefill": [], "decode": []}
    for name, (model, lora) in variants.items():  # speed runs keep logits off, as llama-bench does
        llms[name] = _speed_llama(llama_cpp, model, lora, a.prompt + a.decode, a.prompt, a.threads)
        timed_runs(llms[name], prompt, cont)  # warm-up
    for _ in range(a.runs):
        for name, llm in llms.items():
            pre, dec = timed_runs(llm, prompt, cont)
            rows[name]["prefill"].append(pre)
            rows[name]["decode"].append(dec)
    for llm in llms.values():
        llm.close()

    f32 = rows["F32"]
    base_pre, base_dec = statistics.median(f32["prefill"]), statistics.median(f32["decode"])
    lines = [
        "## GGUF: llama.cpp speed of SmolLM2-135M (tools/bench_gguf.py)",
        "",
        f"Command: `python tools/bench_gguf.py --prompt {a.prompt} --decode {a.decode} --runs {a.runs}"
        f"{' --artifact ' + str(a.artifact) if a.artifact else ''}`",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {a.threads} threads, "
        f"load average {load:.1f} at start; llama-cpp-python {llama_cpp.__version__}, CPU. Medians of {a.runs} "
        "runs after a warm-up, variants interleaved within each run."
        + (" This build has AMX, so every model loads into plain CPU buffers (no weight repacking; README, "
           "Troubleshooting)." if amx_in_build() else ""),
        f"Artifact: {art} (bpw {rows['base + adapter (lrdeploy)']['bpw']:.3f} over the linears). "
        f"llama-quantize preset {preset} is the closest in file size among {', '.join(PRESETS)}.",
        f"Perplexity: llama.cpp, {a.ppl_windows} windows of 256 tokens from the second half of "
        f"{Path(calib).name}, every predicted token scored (not llama-perplexity's second-half protocol).",
        "",
        "| variant | file MB | linear bpw | ppl | prefill tok/s | decode tok/s | prefill vs F32 | decode vs F32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        pre, dec = statistics.median(r["prefill"]), statistics.median(r["decode"])
        lines.append(f"| {name} | {r['bytes'] / 1e6:.1f} | {r['bpw']:.3f} | {r['ppl']:.2f} | {pre:.0f} | {dec:.1f} "
                     f"| {pre / base_pre:.2f}x | {dec / base_dec:.2f}x |")
    lines += ["", f"Prompt {a.prompt} tokens (one batch), decode {a.decode} tokens one at a time."]
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        from common import update_section

        update_section("gguf", text)


def _speed_llama(llama_cpp, model: Path, lora: Path | None, n_ctx: int, n_batch: int, threads: int):
    """A context without all-position logits (speed runs), LoRA attached like the eval path does."""
    from lrdeploy.runtime.llamacpp import captured_stderr, plain_cpu_buffers

    log: list[str] = []
    with captured_stderr(log), plain_cpu_buffers(llama_cpp):
        llm = llama_cpp.Llama(model_path=str(model), lora_path=None if lora is None else str(lora), n_ctx=n_ctx,
                              n_batch=n_batch, n_ubatch=n_batch, n_threads=threads, n_threads_batch=threads,
                              verbose=False)
    if lora is not None and not getattr(llm, "_lora_adapter", None):
        raise RuntimeError(f"llama.cpp rejected the adapter {lora}")
    return llm


if __name__ == "__main__":
    main()
