"""One bench measurement in a fresh interpreter (`python -m lrdeploy.runtime.bench_worker SPEC`): load the model on
its backend, then time prefill and decode per context, or hold one long context (the memory search's check), or
score perplexity. Prints one JSON line; a failure is one line on stderr and exit status 2."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from lrdeploy.errors import LrdError
from lrdeploy.runtime.memory import gpu_peak, reset_peak, rss_now, rss_peak

WARMUP_TOKENS = 32


def open_runner(spec: dict):
    """The measured model, on the backend factory eval uses too; llama.cpp sizes a context per call."""
    from lrdeploy.runtime.backends import open_backend

    runner = open_backend(spec["path"], spec["backend"], spec["device"], n_ctx=None, threads=spec.get("threads"))
    if spec["backend"] == "llamacpp":  # llama.cpp loads the weights with a context: count them in the load here
        runner.reset(WARMUP_TOKENS * 2)
    return runner


def prompt_ids(tokenizer, text: str | None, n: int) -> list[int]:
    """N real-text token ids (the text repeated when it is shorter)."""
    from lrdeploy.compressor.text import load_text, tokenize

    ids = tokenize(tokenizer, load_text(text)).tolist()
    if not ids:
        raise LrdError("the bench text tokenizes to nothing")
    return (ids * (n // len(ids) + 1))[:n]


def preload(backend: str) -> None:
    """Import everything a backend needs before measuring, so library code is not counted as model memory."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import lrdeploy.compressor.text  # noqa: F401

    if backend == "onnxruntime":
        import onnxruntime  # noqa: F401
    elif backend == "llamacpp":
        import llama_cpp  # noqa: F401
    else:
        import lrdeploy.artifact  # noqa: F401
        import lrdeploy.compressor.model  # noqa: F401


def worker(spec: dict) -> dict:
    """One child's measurements of one model. Modes: run (timings per ctx), check (one long context), ppl."""
    preload(spec["backend"])
    base = rss_now()  # the interpreter and its libraries: not part of what the model needs
    t0 = time.perf_counter()
    runner = open_runner(spec)
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"load_s": load_s, "rss_after_load": rss_now() - base, "interpreter_rss": base,
                           "kv_per_token": runner.kv_per_token, "max_positions": runner.max_positions,
                           "bpw": runner.bpw}
    if spec["mode"] == "ppl":
        from lrdeploy.compressor.text import eval_windows, load_text, tokenize
        from lrdeploy.runtime.eval import perplexity

        ids = tokenize(runner.tokenizer, load_text(spec["text"], spec.get("text_range")))
        windows = eval_windows(ids, spec["ppl_ctx"], spec["ppl_windows"])
        res = perplexity(runner.logits, windows)
        out["ppl"], out["window_nll"] = res.ppl, list(res.window_nll)
        return out
    gen = spec["gen"]
    if spec["mode"] == "check":
        n = spec["tokens"]
        ids = prompt_ids(runner.tokenizer, spec.get("text"), n - 1)
        runner.reset(n)
        reset_peak()
        runner.prefill(ids)
        runner.decode(1)
        out.update(tokens=n, peak=gpu_peak(runner) or rss_peak() - base)
        return out
    ids = prompt_ids(runner.tokenizer, spec.get("text"), max(spec["ctx"]))
    runner.reset(WARMUP_TOKENS * 2)
    runner.prefill(ids[:WARMUP_TOKENS])
    runner.decode(4)
    rows = []
    for ctx in spec["ctx"]:
        runner.reset(ctx + gen)
        reset_peak()
        if gpu_peak(runner) is not None:
            import torch

            torch.cuda.reset_peak_memory_stats()
        t1 = time.perf_counter()
        runner.prefill(ids[:ctx])
        runner.sync()
        t2 = time.perf_counter()
        runner.decode(gen)
        t3 = time.perf_counter()
        rows.append({"ctx": ctx, "prefill_tps": ctx / (t2 - t1), "decode_tps": gen / (t3 - t2),
                     "kv_bytes": runner.kv_bytes(ctx + gen), "peak": gpu_peak(runner) or rss_peak() - base})
    out["ctx"] = rows
    runner.close()
    return out


if __name__ == "__main__":
    try:
        print(json.dumps(worker(json.loads(sys.argv[1]))))
    except LrdError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
