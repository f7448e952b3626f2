"""Side by side with the tools users would pick instead (issue 7): llama-quantize + imatrix, ONNX Runtime's
MatMulNBitsQuantizer, onnxruntime-genai's model builder, and lrdeploy's own GGUF and ONNX exports, all on
SmolLM2-135M, one text, one run.

    .venv/bin/python tools/peers.py                   # builds, quantizes, measures what is missing; writes the section
    .venv/bin/python tools/peers.py --only-report     # rewrite the section and plot from what is cached

What it does, each step cached under .cache/peers/ so a rerun skips finished work:

1. builds llama.cpp's own tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench) with cmake from the
   llama.cpp tree that the installed llama-cpp-python's sdist vendors (`pip download --no-binary :all:`); no
   Python bindings;
2. exports SmolLM2 to an F32 GGUF, computes an imatrix on the text our compressor calibrates on (the first half of
   tools/data/wikitext2-valid.txt) and quantizes to Q2_K, IQ2_XS, Q3_K_S, Q3_K_M, Q4_0, Q4_K_S and Q4_K_M with it;
3. compresses SmolLM2 with lrdeploy (--target gguf) and exports base + LoRA adapter GGUFs;
4. scores every GGUF with llama-perplexity (second half of the text, -c 512, fixed --chunks; `--lora` for ours) and
   times it with llama-bench (pp512, tg128); llama-bench takes no LoRA, so the adapter's cost is measured apart with
   llama-cpp-python (decode with and without the adapter, same base);
5. quantizes an fp32 ONNX export with onnxruntime's MatMulNBitsQuantizer (DEFAULT/RTN, HQQ, INC RTN, GPTQ), runs
   onnxruntime-genai's builder (`-p int4 -e cpu`, what ONNX users deploy today) on SmolLM2 written as an HF
   directory, and scores those and our own ONNX exports with `lrdeploy eval --backend onnxruntime`;
6. writes the "peers" section of docs/results.md and docs/peers-ppl-bytes.png.

Heavy commands run under `nice -n 19`: the machine is shared, so every speed number carries the load average.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench_onnx import BUILDER, builder
from common import WIKITEXT, cached, update_section
from common import run_json as shared_run_json
from common import slug as plain_slug

from lrdeploy.files import ONNX_META, ONNX_MODEL
from lrdeploy.io import staged_output

REPO = Path(__file__).resolve().parents[1]
DATA = WIKITEXT
WORK = REPO / ".cache" / "peers"
RESULTS = WORK / "results"
LLAMA_PY = "llama-cpp-python"
LLAMA_VERSION = importlib.metadata.version(LLAMA_PY)  # its sdist vendors llama.cpp: the tools are built from that
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
PRESETS = ("Q2_K", "IQ2_XS", "Q3_K_S", "Q3_K_M", "Q4_0", "Q4_K_S", "Q4_K_M")
NICE = ["nice", "-n", "19"]
CALIB_RANGE, EVAL_RANGE = "0:0.5", "0.5:1"
CTX = 512
BUILD = WORK / f"build-llama-cpp-python-{LLAMA_VERSION}-noamx"
# ggml's AMX matmul segfaults on some Sapphire Rapids machines (llama.cpp issue #20824; it did on every q4_0 GGUF
# of SmolLM2 here). An explicit -mno-* wins over -march=native in GCC and clang, so the native build leaves AMX out.
_AMX_OFF = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
NO_AMX = [f"-DCMAKE_C_FLAGS={_AMX_OFF}", f"-DCMAKE_CXX_FLAGS={_AMX_OFF}"] if platform.machine() in (
    "x86_64", "AMD64") else []

# Our points: (label, compress args). --target gguf keeps every row whole so stock llama.cpp runs the export; on
# SmolLM2 that means q2_k/q3_k only in ffn_down, q4_0 elsewhere (see README's note on fallbacks).
OURS: list[tuple[str, list[str]]] = [
    ("caldera q2_k + r32 q4_0", ["--method", "caldera", "--q-format", "q2_k", "--rank", "32", "--lr-format", "q4_0"]),
    ("ldlq q2_k", ["--method", "ldlq", "--q-format", "q2_k"]),
    ("ldlq q3_k", ["--method", "ldlq", "--q-format", "q3_k"]),
    ("ldlq q4_0", ["--method", "ldlq", "--q-format", "q4_0"]),  # llama-quantize Q4_0's types, Hessian-aware
    ("rtn q4_0", ["--method", "rtn", "--q-format", "q4_0"]),  # the same with importance-weighted rounding only
    ("caldera q2_k + r32 q4_0 + distill", ["--method", "caldera", "--q-format", "q2_k", "--rank", "32",
                                           "--lr-format", "q4_0", "--refine", "distill"]),  # the default, distilled
]
DEMO_ARTIFACT = REPO / "out" / "smollm2-caldera"  # tools/demo.sh's artifact: the defaults, reused when present

# onnxruntime's quantizers: (label, algorithm, bits). INC's RTN and GPTQ paths write 4-bit weights only.
ORT_POINTS: list[tuple[str, str, int]] = [
    ("ort default (RTN) 4-bit", "DEFAULT", 4),
    ("ort default (RTN) 2-bit", "DEFAULT", 2),
    ("ort HQQ 4-bit", "HQQ", 4),
    ("ort HQQ 2-bit", "HQQ", 2),
    ("ort INC RTN 4-bit", "RTN", 4),
    ("ort GPTQ 4-bit", "GPTQ", 4),
]
ORT_BLOCK = 32
EXTRA_WEIGHTS = (".lora_r_t", ".lora_l_t", ".q.offsets_t")  # our ONNX export's initializers beside Q
ONNX_MAX_IR = 10  # what the quantizer writes for int4 and what onnxruntime 1.31 reads without complaint


def slug(label: str) -> str:
    """A point's folder and record name (dash runs folded: the names the peers' and the 1.5B's records carry)."""
    return plain_slug(label, squeeze=True)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Step:
    """Wall time per step, for the section: how long a rerun of the whole thing takes."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, t0: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


STEPS = Step()


def run(cmd: list, log_file: Path | None = None, stdout_only: bool = False) -> str:
    """Run CMD, keep its combined output (in LOG_FILE too), fail with the tail of it: tools speak on stderr."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    out = res.stdout + res.stderr
    if log_file is not None:
        log_file.write_text(out)
    if res.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise SystemExit(f"failed ({res.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return res.stdout if stdout_only else out


def run_json(args: list[str]) -> dict:
    return shared_run_json(args, prefix=tuple(NICE))


# ---------------------------------------------------------------------------------------------------- llama.cpp


def llama_source() -> Path:
    """The llama.cpp tree that the installed llama-cpp-python vendors, from its sdist (`pip download --no-deps
    --no-binary :all:`, through whatever index pip is configured with): the same llama.cpp that lrdeploy's own
    llama.cpp backend runs."""
    root = WORK / f"llama_cpp_python-{LLAMA_VERSION}"
    src = root / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK, prefix=".sdist-") as tmp:
        log(f"pip download {LLAMA_PY}=={LLAMA_VERSION} (sdist)")
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp,
             f"{LLAMA_PY}=={LLAMA_VERSION}"])
        tarball = next(Path(tmp).glob("*.tar.gz"), None)
        if tarball is None:
            raise SystemExit(f"pip download gave no {LLAMA_PY} sdist")
        with tarfile.open(tarball) as tf:
            tf.extractall(WORK, filter="data")
    if not (src / "CMakeLists.txt").is_file():
        raise SystemExit(f"the {LLAMA_PY} {LLAMA_VERSION} sdist holds no vendor/llama.cpp/CMakeLists.txt")
    return src


def build_tools(jobs: int) -> dict[str, Path]:
    """llama.cpp's four tools, built once: Release, static, CPU only, no curl/ssl, no tests, examples or server."""
    bins = {t: BUILD / "bin" / t for t in TOOLS}
    if all(p.is_file() for p in bins.values()):
        return bins
    t0 = time.perf_counter()
    src = llama_source()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run([*NICE, "cmake", "-S", src, "-B", BUILD, *generator, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", *NO_AMX])
    log(f"building {', '.join(TOOLS)} (-j{jobs})")
    run([*NICE, "cmake", "--build", BUILD, "-j", str(jobs), "--target", *TOOLS], WORK / "build.log")
    STEPS.add("build llama.cpp tools", t0)
    return bins


def write_texts() -> tuple[Path, Path]:
    """The calibration half and the eval half of the text as plain files: what llama.cpp's tools read."""
    from lrdeploy.compressor.text import load_text

    paths = (WORK / "calib.txt", WORK / "eval.txt")
    for path, range_ in zip(paths, (CALIB_RANGE, EVAL_RANGE), strict=True):
        if not path.is_file():
            path.write_text(load_text(str(DATA), range_))
    return paths


def f32_gguf() -> Path:
    """Our uncompressed export: the common source of llama-quantize's files (the Q4_1 package, dequantized)."""
    out = WORK / "gguf" / "f32"
    if not (out / "model.gguf").is_file():
        t0 = time.perf_counter()
        run_json(["export", "smollm2", "--format", "gguf", "--dtype", "f32", "-o", str(out), "--force", "--json"])
        STEPS.add("F32 GGUF export", t0)
    return out / "model.gguf"


def imatrix(bins: dict[str, Path], model: Path, calib: Path, chunks: int, threads: int,
            out: Path = WORK / "imatrix.gguf") -> Path:
    """An importance matrix over CHUNKS × 512 tokens of the calibration half (16,384 tokens = our compressor's)."""
    if not out.is_file():
        t0 = time.perf_counter()
        tmp = out.with_name(out.stem + ".part.gguf")
        run([*NICE, bins["llama-imatrix"], "-m", model, "-f", calib, "-o", tmp, "-c", CTX, "-b", CTX,
             "--chunks", chunks, "-t", threads, "--no-ppl"], out.with_suffix(".log"))
        tmp.replace(out)
        STEPS.add("imatrix", t0)
    return out


def quantize(bins: dict[str, Path], model: Path, imat: Path, preset: str, threads: int,
             folder: Path = WORK / "gguf", requantize: bool = False) -> Path:
    """llama-quantize with the imatrix at PRESET; SmolLM2's 576-wide rows make it fall back per tensor.

    REQUANTIZE: the source is itself quantized (a Q4_K_M GGUF); llama-quantize decodes it to float first."""
    out = folder / f"llama-quantize-{preset}.gguf"
    if not out.is_file():
        t0 = time.perf_counter()
        tmp = out.with_suffix(".part")
        again = ["--allow-requantize"] if requantize else []
        run([*NICE, bins["llama-quantize"], *again, "--imatrix", imat, model, tmp, preset, threads],
            folder / f"llama-quantize-{preset}.log")
        tmp.replace(out)
        STEPS.add("llama-quantize", t0)
    return out


def our_artifact(label: str, args: list[str]) -> Path:
    """An lrdeploy artifact of SmolLM2 calibrated on the same half of the text (the demo's, when it exists)."""
    if label == OURS[0][0] and (DEMO_ARTIFACT / "lrdeploy.json").is_file():
        manifest = json.loads((DEMO_ARTIFACT / "lrdeploy.json").read_text())
        if manifest.get("calibration", {}).get("range") == CALIB_RANGE:
            return DEMO_ARTIFACT
    art = WORK / "art" / slug(label)
    if not (art / "lrdeploy.json").is_file():
        t0 = time.perf_counter()
        log(f"compressing {label}")
        again = "--resume" if art.with_name(art.name + ".partial").is_dir() else "--force"  # keep finished blocks
        comp = run_json(["compress", "smollm2", "-o", str(art), "--calib", str(DATA), "--calib-range", CALIB_RANGE,
                         "--target", "gguf", *args, again, "--json"])
        (WORK / "art" / f"{slug(label)}.compress.json").write_text(json.dumps(comp, indent=1))
        STEPS.add("lrdeploy compress", t0)
    return art


def our_gguf(label: str, art: Path) -> tuple[Path, Path]:
    """base + adapter GGUF export of an artifact."""
    out = WORK / "gguf" / slug(label)
    if not (out / "model.gguf").is_file():
        t0 = time.perf_counter()
        run_json(["export", str(art), "--format", "gguf", "-o", str(out), "--force", "--json"])
        STEPS.add("lrdeploy export", t0)
    return out / "model.gguf", out / "adapter.gguf"


def llama_perplexity(bins: dict[str, Path], model: Path, lora: Path | None, text: Path, chunks: int,
                     threads: int, ctx: int = CTX) -> dict:
    """llama-perplexity's own protocol: CTX-token chunks, each scored on its second half; 'Final estimate' parsed."""
    cmd = [*NICE, bins["llama-perplexity"], "-m", model, "-f", text, "-c", ctx, "-b", min(ctx, 2048), "--chunks",
           chunks, "-t", threads]
    if lora is not None:
        cmd += ["--lora", lora]
    out = run(cmd)
    line = next((ln for ln in out.splitlines() if "Final estimate: PPL =" in ln), None)
    if line is None:
        raise SystemExit(f"no 'Final estimate' from llama-perplexity on {model}")
    value = line.split("PPL =", 1)[1].split()
    if lora is not None and "lora" not in out.lower():
        raise SystemExit(f"llama-perplexity did not mention the adapter {lora}")
    return {"ppl": float(value[0]), "ppl_err": float(value[2]) if len(value) > 2 else None, "chunks": chunks,
            "ctx": ctx}


def llama_bench(bins: dict[str, Path], models: list[Path], threads: int, reps: int, n_gen: int = 128,
                prompt: int = CTX) -> dict[str, dict]:
    """llama-bench pp512 and tg128 for MODELS, keyed by path: two invocations over all of them, the second in
    reverse order, so drift in the machine's speed falls on every file alike; medians of all samples. Single
    3-rep runs of one file at a time differed by 10-20% between two runs of the same file."""
    load = os.getloadavg()[0]
    samples: dict[tuple[str, str], list[float]] = {}
    for order in (models, models[::-1]):
        cmd = [*NICE, bins["llama-bench"], "-p", prompt, "-n", n_gen, "-t", threads, "-r", reps, "-o", "json"]
        for m in order:
            cmd += ["-m", m]
        out = run(cmd, stdout_only=True)
        for t in json.loads(out[out.index("["): out.rindex("]") + 1]):
            key = f"pp{prompt}" if t["n_prompt"] == prompt and t["n_gen"] == 0 else f"tg{n_gen}" if t[
                "n_gen"] == n_gen else None
            if key:
                samples.setdefault((str(Path(t["model_filename"]).resolve()), key), []).extend(
                    t.get("samples_ts") or [t["avg_ts"]])
    rows: dict[str, dict] = {}
    for m in models:
        row: dict = {"load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2), "reps": 2 * reps}
        for key in (f"pp{prompt}", f"tg{n_gen}"):
            got = samples.get((str(Path(m).resolve()), key))
            if got:
                row[key] = statistics.median(got)
        rows[str(m)] = row
    return rows


def lora_cost(model: Path, lora: Path, threads: int, runs: int) -> dict:
    """Decode and prefill with and without the adapter on the same base, llama-cpp-python, interleaved runs.

    llama-bench has no LoRA option, so this ratio is what the adapter costs on top of llama-bench's base numbers.
    """
    import llama_cpp
    from bench_gguf import _speed_llama, timed_runs
    from transformers import AutoTokenizer

    from lrdeploy.compressor.text import load_text, tokenize

    tok = AutoTokenizer.from_pretrained(str(model.parent))  # the export carries the HF tokenizer files
    ids = tokenize(tok, load_text(str(DATA), EVAL_RANGE)[:20000]).tolist()
    prompt, cont = ids[:128], ids[128:192]
    llms = {k: _speed_llama(llama_cpp, model, ad, 192, 128, threads) for k, ad in (("base", None), ("lora", lora))}
    res: dict[str, list] = {f"{k}_{m}": [] for k in llms for m in ("prefill", "decode")}
    for llm in llms.values():
        timed_runs(llm, prompt, cont)  # warm-up
    for _ in range(runs):
        for k, llm in llms.items():
            pre, dec = timed_runs(llm, prompt, cont)
            res[f"{k}_prefill"].append(pre)
            res[f"{k}_decode"].append(dec)
    for llm in llms.values():
        llm.close()
    med = {k: statistics.median(v) for k, v in res.items()}
    return {**med, "decode_ratio": med["lora_decode"] / med["base_decode"],
            "prefill_ratio": med["lora_prefill"] / med["base_prefill"], "runs": runs,
            "llama_cpp_python": llama_cpp.__version__, "load": round(os.getloadavg()[0], 2)}


def gguf_info(model: Path, lora: Path | None) -> dict:
    """File bytes, bpw over the linears (lrdeploy's definition) and the ggml types the linears ended up in."""
    from lrdeploy.runtime.inspect import export_bpw, gguf_tensors, is_linear_gguf

    rows = gguf_tensors(model)
    types = Counter(r["type"] for r in rows if is_linear_gguf(r["name"]))
    embd = next((r for r in rows if r["name"] == "token_embd.weight"), None)
    nbytes = model.stat().st_size + (lora.stat().st_size if lora else 0)
    return {"bytes": nbytes, "bpw": export_bpw(model, lora), "linear_types": dict(types.most_common()),
            "adapter_bytes": lora.stat().st_size if lora else 0,
            "embd": f"{embd['type']}, {embd['bytes'] / 1e6:.1f} MB" if embd else "?"}


# ---------------------------------------------------------------------------------------------------- ONNX


def onnx_env() -> dict:
    """onnxruntime's quantizer imports onnx_ir; it lives in .cache/peers/pylib so the shared venv stays as it is."""
    pylib = WORK / "pylib"
    try:
        import onnx_ir  # noqa: F401
    except ImportError:
        if not (pylib / "onnx_ir").is_dir():
            run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", pylib, "onnx-ir"])
        sys.path.insert(0, str(pylib))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(pylib), os.environ.get("PYTHONPATH", "")])}


def onnx_fp32() -> Path:
    out = WORK / "onnx" / "fp32"
    if not (out / "model.onnx").is_file():
        t0 = time.perf_counter()
        run_json(["export", "smollm2", "--format", "onnx", "--dtype", "fp32", "-o", str(out), "--force", "--json"])
        STEPS.add("ONNX fp32 export", t0)
    return out


def _calibration_feeds(fp32: Path, n_seqs: int) -> list[dict]:
    """GPTQ's calibration: N_SEQS × 512 tokens of the calibration half, with an empty KV cache."""
    import numpy as np
    import onnx
    from transformers import AutoTokenizer

    from lrdeploy.compressor.text import load_text, tokenize

    config = json.loads((fp32 / "config.json").read_text())
    kv = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    names = [i.name for i in onnx.load(str(fp32 / "model.onnx"), load_external_data=False).graph.input]
    ids = tokenize(AutoTokenizer.from_pretrained(str(fp32)), load_text(str(DATA), CALIB_RANGE)).numpy()
    feeds = []
    for s in range(n_seqs):
        seq = ids[s * CTX: (s + 1) * CTX].astype(np.int64)[None]
        feed: dict = {}
        for n in names:
            if n == "input_ids":
                feed[n] = seq
            elif n == "attention_mask":
                feed[n] = np.ones_like(seq)
            elif n == "position_ids":
                feed[n] = np.arange(seq.shape[1], dtype=np.int64)[None]
            elif n.startswith("past_key_values."):
                feed[n] = np.zeros((1, kv, 0, head_dim), dtype=np.float32)
        feeds.append(feed)
    return feeds


def ort_quantize(fp32: Path, label: str, algo: str, bits: int, gptq_seqs: int) -> Path:
    """MatMulNBitsQuantizer on the fp32 export; the tokenizer and config files are copied so our backend opens it."""
    out = WORK / "onnx" / slug(label)
    if (out / "model.onnx").is_file():
        return out
    t0 = time.perf_counter()
    onnx_env()
    import logging

    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: list[dict]) -> None:
            self.feeds = feeds
            self.it: Iterator[dict] = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.it, None)

        def rewind(self) -> None:
            self.it = iter(self.feeds)

    if algo == "DEFAULT":
        cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=ORT_BLOCK, is_symmetric=False, bits=bits)
    elif algo == "HQQ":
        cfg = mnq.HQQWeightOnlyQuantConfig(block_size=ORT_BLOCK, bits=bits)
    elif algo == "RTN":
        cfg = mnq.RTNWeightOnlyQuantConfig()
    elif algo == "GPTQ":
        cfg = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(_calibration_feeds(fp32, gptq_seqs)),
                                            block_size=128)
    else:
        raise SystemExit(f"unknown onnxruntime algorithm {algo}")
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node otherwise
    model = onnx.load(str(fp32 / "model.onnx"))
    q = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=ORT_BLOCK, is_symmetric=False, algo_config=cfg)
    q.process()
    qmodel = q.model.model if hasattr(q.model, "model") else q.model
    qmodel.ir_version = min(qmodel.ir_version, ONNX_MAX_IR)
    with staged_output(out, force=True) as tmp:
        onnx.save_model(qmodel, str(tmp / ONNX_MODEL))
        for f in fp32.iterdir():
            if f.is_file() and not f.name.startswith(ONNX_MODEL) and f.name != ONNX_META:
                shutil.copy2(f, tmp / f.name)
    STEPS.add("onnxruntime quantize", t0)
    return out


def our_onnx(label: str, art: Path) -> Path:
    out = WORK / "onnx" / slug(label)
    if not (out / "model.onnx").is_file():
        t0 = time.perf_counter()
        run_json(["export", str(art), "--format", "onnx", "-o", str(out), "--force", "--json"])
        STEPS.add("lrdeploy export", t0)
    return out


def onnx_info(folder: Path, vocab: int) -> dict:
    """File bytes and bpw over the decoder linears: MatMulNBits weights, scales and zero points (or dense fp32,
    and for our exports the L·R MatMuls too) over the linears' weight count; the lm_head (N = vocab) is left out."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}

    def nbytes(name: str) -> int:
        t = inits.get(name)
        if t is None:
            return 0
        return int(np.prod(t.dims)) * numpy_helper.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

    params = stored = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs["N"] == vocab:
                continue
            params += attrs["N"] * attrs["K"]
            stored += sum(nbytes(n) for n in node.input[1:4])
        elif node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            dims = list(inits[node.input[1]].dims)
            if vocab in dims:
                continue
            stored += nbytes(node.input[1])
            if not node.input[1].endswith(EXTRA_WEIGHTS):  # L, R and q2_k offsets add bytes, not weights
                params += int(np.prod(dims))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))
    meta = folder / ONNX_META  # lrdeploy's exports say how they hold the embedding
    embed = json.loads(meta.read_text()).get("vocab", {}).get("embed") if meta.is_file() else None
    return {"bytes": size, "bpw": 8 * stored / params if params else None, "embed": embed}


def onnx_eval(folder: Path, windows: int) -> dict:
    ev = run_json(["eval", str(folder), "--backend", "onnxruntime", "--text", str(DATA), "--text-range", EVAL_RANGE,
                   "--ctx", str(CTX), "--windows", str(windows), "--json"])
    return {"ppl": ev["ppl"], "tokens": ev["tokens"], "windows": ev.get("windows", windows)}


# ---------------------------------------------------------------------------------------------------- report


def frontier(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The (bytes, ppl) points no other point beats on both: what a user picks from at each size."""
    out: list[tuple[int, float]] = []
    for b, p in sorted(points):
        if not out or p < out[-1][1]:
            out.append((b, p))
    return out


def interp_ppl(curve: list[tuple[int, float]], nbytes: int) -> float | None:
    """llama-quantize's best perplexity at NBYTES: its frontier, linear in log-ppl between neighbours (None outside)."""
    pts = frontier(curve)
    for (b0, p0), (b1, p1) in zip(pts, pts[1:], strict=False):
        if b0 <= nbytes <= b1:
            w = (nbytes - b0) / (b1 - b0) if b1 > b0 else 0.0
            return math.exp((1 - w) * math.log(p0) + w * math.log(p1))
    return None


COLORS = {"llama-quantize": "C0", "onnxruntime": "C2", "onnxruntime-genai": "C3", "lrdeploy": "C1"}


def plot(gguf_rows: list[dict], onnx_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = ((axes[0], gguf_rows, "llama.cpp GGUF: llama-perplexity (c 512, second half of each chunk)", "lower left"),
              (axes[1], onnx_rows, "ONNX: lrdeploy eval (ctx 512, every token)", "lower center"))
    for ax, rows, title, legend_at in panels:
        scored = [r for r in rows if r.get("ppl") is not None]
        refs = [r for r in scored if r["group"] == "reference"]
        for r in refs:  # a line, not a point: the uncompressed file would stretch the size axis 5×
            ax.axhline(r["ppl"], ls="--", color="gray", label=f"{r['short']} ({r['bytes'] / 1e6:.0f} MB)")
        cap = 10 * min((r["ppl"] for r in refs), default=math.inf)  # collapsed points go in a note, not the plot
        off = [r for r in scored if r["ppl"] > cap]
        groups: dict[str, list[dict]] = {}
        for r in scored:
            if r["group"] != "reference" and r not in off:
                groups.setdefault(r["group"], []).append(r)
        for name, rs in groups.items():
            rs = sorted(rs, key=lambda r: r["bytes"])
            xs, ys = [r["bytes"] / 1e6 for r in rs], [r["ppl"] for r in rs]
            color = COLORS.get(name)
            if name == "llama-quantize":  # its presets as points, the best of them at each size as the curve
                ax.plot(xs, ys, "o", color=color, label=name)
                fx, fy = zip(*frontier([(r["bytes"], r["ppl"]) for r in rs]), strict=True)
                ax.plot([x / 1e6 for x in fx], fy, "-", color=color, alpha=0.6, label=f"{name} frontier")
            else:
                ax.plot(xs, ys, marker="D" if name == "lrdeploy" else "o", color=color, label=name)
            for r, x, y in zip(rs, xs, ys, strict=True):
                ax.annotate(r["short"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if off:
            ax.text(0.98, 0.98, "off the chart:\n" + "\n".join(f"{r['short']}: {r['bytes'] / 1e6:.0f} MB, ppl "
                                                              f"{r['ppl']:,.0f}" for r in off),
                    transform=ax.transAxes, ha="right", va="top", fontsize=7,
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "gray"})
        ax.set_yscale("log")
        ax.set_xlabel("file bytes (MB; base + adapter for lrdeploy GGUF)")
        ax.set_ylabel("perplexity")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc=legend_at)
    fig.suptitle("SmolLM2-135M, WikiText-2 validation second half: perplexity against file size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def h_error_ratio(worse: str, better: str) -> tuple[float, float] | None:
    """Lowest and highest ratio, over linear types, of the mean calibration H-error of two of our artifacts.

    The errors are the ones the compressor recorded in each manifest; None when either artifact is missing.
    """
    errors = []
    for label in (worse, better):
        manifest = WORK / "art" / slug(label) / "lrdeploy.json"
        if not manifest.is_file():
            return None
        by_type: dict[str, list[float]] = {}
        for name, linear in json.loads(manifest.read_text())["linears"].items():
            by_type.setdefault(name.rsplit(".", 1)[-1], []).append(linear["error"])
        errors.append({t: statistics.mean(v) for t, v in by_type.items()})
    ratios = [errors[0][t] / errors[1][t] for t in errors[0] if errors[1].get(t)]
    return (min(ratios), max(ratios)) if ratios else None


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _load_note(rows: list[dict]) -> str:
    """What the 1-minute load averages at the llama-bench runs say about how far to trust absolute numbers."""
    loads = [r["bench"]["load_before"] for r in rows if (r.get("bench") or {}).get("load_before") is not None]
    if not loads:
        return ""
    if max(loads) < 2.5:  # 2 cores: up to ~2 means the bench itself, nothing else
        spread = f"{min(loads):.1f}" if min(loads) == max(loads) else f"{min(loads):.1f}–{max(loads):.1f}"
        return f"Taken on an otherwise idle machine (1-minute load average {spread} before the bench)."
    return (f"**Taken under contention** (1-minute load average up to {max(loads):.1f}, in the table): read ratios "
            "between rows, not absolute numbers.")


def margins_note(wide: list[str]) -> str:
    """WIDE: our points further from llama-quantize's curve than one llama-perplexity standard error."""
    if not wide:
        return "Each margin to the curve is inside one standard error of either estimate."
    return ("Margins to the curve beyond one standard error (the larger of ours and the nearest llama-quantize "
            f"file's): {', '.join(wide)}; the others are inside it.")


def builder_lines(onnx_rows: list[dict]) -> list[str]:
    """Our ONNX files against the builder's, by size and perplexity (its speed is in the "ONNX Runtime" section)."""
    peer = next((r for r in onnx_rows if r["group"] == "onnxruntime-genai" and r.get("ppl") is not None), None)
    ours = [r for r in onnx_rows if r["group"] == "lrdeploy" and r.get("ppl") is not None]
    if peer is None or not ours:
        return []
    both = [r["short"] for r in ours if r["bytes"] <= peer["bytes"] and r["ppl"] < peer["ppl"]]
    lower = [r for r in ours if r["ppl"] < peer["ppl"]]
    smaller = [r for r in ours if r["bytes"] <= peer["bytes"]]
    embeds = sorted({r["embed"] for r in ours if r.get("embed")})
    lines = [f"onnxruntime-genai's builder (`-p int4 -e cpu`): {peer['bytes'] / 1e6:.1f} MB, ppl {peer['ppl']:.2f}; "
             "it holds the tied embedding in int4 (GatherBlockQuantized and MatMulNBits over the same blocks) and "
             "runs every MatMulNBits with int8 activations (accuracy_level 4). "
             + (f"Smaller and lower in perplexity: {', '.join(both)}. " if both else
                f"None of ours is both smaller and lower in perplexity: of {len(ours)}, {len(lower)} are lower and "
                f"{len(smaller)} no larger (ours run from {min(r['bytes'] for r in ours) / 1e6:.1f} MB). ")
             + "Ours are `lrdeploy export --format onnx` of the GGUF-target artifacts above, as they stand"
             + (f" (embedding: {embeds[0]})" if len(embeds) == 1 else "")
             + "; the \"ONNX Runtime\" section compresses the embedding to q4_0 for the builder's size and times "
             "both side by side.", ""]
    return lines


def report(gguf_rows: list[dict], onnx_rows: list[dict], a: argparse.Namespace, env: dict) -> str:
    order = {"reference": 0, "llama-quantize": 1, "onnxruntime": 1, "onnxruntime-genai": 1, "lrdeploy": 2}
    gguf_rows = sorted(gguf_rows, key=lambda r: (order.get(r["group"], 3), -r["bytes"]))
    onnx_rows = sorted(onnx_rows, key=lambda r: (order.get(r["group"], 3), -r["bytes"]))
    quant = [r for r in gguf_rows if r["group"] == "llama-quantize" and r.get("ppl") is not None]
    curve = [(r["bytes"], r["ppl"]) for r in quant]
    lines = [
        "## vs peers: llama-quantize + imatrix, onnxruntime's MatMulNBitsQuantizer, onnxruntime-genai's builder "
        "(SmolLM2-135M)",
        "",
        f"Regenerate with `.venv/bin/python tools/peers.py --chunks {a.chunks} --windows {a.windows} "
        f"--threads {a.threads}` (every step cached in .cache/peers/; `--only-report` rewrites this from the cache).",
        "",
        f"- Tools: llama.cpp as the `{LLAMA_PY}` {LLAMA_VERSION} sdist vendors it, built "
        "with cmake (Release, static, CPU, `GGML_NATIVE`), no Python bindings; onnxruntime "
        f"{env.get('onnxruntime', '?')}.",
        f"- Text: `{DATA.name}`. Calibration (our compressor, llama-imatrix over {a.imatrix_chunks} × 512 tokens, "
        f"GPTQ over {a.gptq_seqs} × 512 tokens) = first half; evaluation = second half.",
        f"- **Two perplexity protocols, never mixed.** GGUF files: `llama-perplexity -c 512 --chunks {a.chunks}` "
        "(llama.cpp tokenizes, each 512-token chunk scores only its second half, so numbers run lower than ours). "
        f"ONNX files: `lrdeploy eval --backend onnxruntime --ctx 512 --windows {a.windows}` (HF tokenizer, every "
        "predicted token of each window). Each protocol has its own reference row (F32 GGUF / fp32 ONNX).",
        "- Sizes: file bytes as stored (ours = base + adapter.gguf); bpw = 8 · bytes of the decoder linears "
        "(Q + L + R, scales included) / their weight count, lrdeploy's definition (embeddings, norms and the "
        "lm_head left out; ONNX: the quantized lm_head is left out of bpw but counted in file bytes).",
        f"- Speed: `llama-bench -p 512 -n 128 -t {a.threads} -r {a.reps}` over all files at once, twice (the second "
        f"pass in reverse order), median of the {2 * a.reps} samples per file, CPU "
        f"({platform.machine()}, {os.cpu_count()} cores), every tool under `nice -n 19`. {_load_note(gguf_rows)}",
        "",
        "| file | method | protocol | file MB | linear bpw | ppl | pp512 tok/s | tg128 tok/s | load avg |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in gguf_rows + onnx_rows:
        b = r.get("bench") or {}
        lines.append(f"| {r['short']} | {r['method']} | {r['protocol']} | {r['bytes'] / 1e6:.1f} | "
                     f"{_fmt(r.get('bpw'), '.3f')} | {_fmt(r.get('ppl'), '.2f')} | {_fmt(b.get('pp512'), '.0f')} | "
                     f"{_fmt(b.get('tg128'), '.1f')} | {_fmt(b.get('load_before'), '.1f')} |")
    lines += ["", "![perplexity against file bytes](peers-ppl-bytes.png)", ""]

    fallbacks = [f"{r['short']}: {', '.join(f'{k} ×{v}' for k, v in r['linear_types'].items())}; token_embd "
                 f"{r.get('embd', '?')}" + (f"; adapter {r['adapter_bytes'] / 1e6:.1f} MB" if r.get("adapter_bytes")
                                            else "")
                 for r in gguf_rows if r.get("linear_types") and r["group"] != "reference"]
    if fallbacks:
        lines += ["Types of the 210 decoder linears in each GGUF (SmolLM2's 576-wide rows hold no 256-weight "
                  "super-block, so K/IQ types reach only ffn_down; the rest falls back per tensor, in llama-quantize "
                  "and in our `--target gguf` alike), and the token embedding (tied: it is also the output "
                  "matrix, 21% of the weights):", ""]
        lines += [f"- {f}" for f in fallbacks] + [""]

    same = {}
    for r in gguf_rows:
        twin = next((q for q in gguf_rows if q is not r and q["group"] == r["group"] == "llama-quantize"
                     and q["bytes"] == r["bytes"] and q.get("linear_types") == r.get("linear_types")), None)
        if twin is not None and tuple(sorted((r["short"], twin["short"]))) not in same:
            same[tuple(sorted((r["short"], twin["short"])))] = True
    for a_, b_ in same:
        lines += [f"{a_} and {b_} write the same tensor types and byte count on SmolLM2 (the files differ only in "
                  "their ftype field): one point, whichever perplexity was measured.", ""]

    missing_ppl = [r["short"] for r in gguf_rows + onnx_rows if r.get("ppl") is None]
    missing_speed = [r["short"] for r in gguf_rows if not r.get("bench")]
    missing_ort = [label for label, _, _ in ORT_POINTS if not (WORK / "onnx" / slug(label) / "model.onnx").is_file()]
    if missing_ppl or missing_speed or missing_ort:
        lines += ["**Not measured** (rerunning the command "
                  "fills these in from where it stopped):"]
        if missing_ppl:
            lines.append(f"- perplexity: {', '.join(missing_ppl)}")
        if missing_speed:
            lines.append(f"- llama-bench speed: {', '.join(missing_speed)}")
        if missing_ort:
            lines.append(f"- onnxruntime quantizers not run: {', '.join(missing_ort)} (`--ort` leaves them out)")
        if not any(r.get("lora_cost") for r in gguf_rows):
            lines.append("- the LoRA path's cost (llama-cpp-python, base with and without the adapter)")
        lines.append("")

    ours = [r for r in gguf_rows if r["group"] == "lrdeploy" and r.get("ppl") is not None]
    above: list[str] = []
    wide: list[str] = []  # margins to the curve beyond one standard error
    if ours and quant:
        lines += ["**Where our GGUF points sit against llama-quantize's curve** (its frontier: the lowest perplexity "
                  "llama-quantize reaches at each size, log-linear between presets; same protocol, same text):", ""]
        for r in ours:
            near = min(quant, key=lambda q: abs(q["bytes"] - r["bytes"]))
            at = interp_ppl(curve, r["bytes"])
            if at is not None and r["ppl"] >= at:
                above.append(r["short"])
            err = max(r.get("ppl_err") or 0.0, near.get("ppl_err") or 0.0)
            if at is not None and err and abs(r["ppl"] - at) > err:
                wide.append(f"{r['short']} ({r['ppl'] - at:+.2f}, one standard error {err:.2f})")
            where = ("outside llama-quantize's size range" if at is None else
                     f"{'below' if r['ppl'] < at else 'above'} the curve (llama-quantize at this size ≈ {at:.2f})")
            beaten = [q["short"] for q in quant if q["bytes"] <= r["bytes"] and q["ppl"] <= r["ppl"]]
            where += f"; beaten on both size and perplexity by {', '.join(beaten)}" if beaten else (
                "; no llama-quantize file is both smaller and better")
            line = (f"- {r['short']}: {r['bytes'] / 1e6:.1f} MB, ppl {r['ppl']:.2f} ± {_fmt(r.get('ppl_err'), '.2f')}; "
                    f"{where}. Nearest size: {near['short']} ({near['bytes'] / 1e6:.1f} MB, ppl {near['ppl']:.2f} ± "
                    f"{_fmt(near.get('ppl_err'), '.2f')}; llama-perplexity's ± is its own standard error).")
            lc, b, nb = r.get("lora_cost"), r.get("bench") or {}, near.get("bench") or {}
            if lc and b.get("tg128") and nb.get("tg128"):
                eff = b["tg128"] * lc["decode_ratio"]
                ratio = eff / nb["tg128"]
                verdict = "within" if ratio >= 0.85 else "not within"
                line += (f" Decode: base alone {b['tg128']:.1f} tok/s, × {lc['decode_ratio']:.2f} for the adapter "
                         f"= {eff:.1f} tok/s, {ratio:.2f}× {near['short']}'s {nb['tg128']:.1f}: {verdict} 15%.")
            lines.append(line)
        lines.append("")
    if ours and quant and all(r["bpw"] > 3.5 for r in ours + quant):
        lines += [
            "No GGUF of SmolLM2 reaches 2–3.5 bpw over its linears, ours or llama-quantize's: 180 of its 210 "
            "linears are 576 wide, hold no 256-weight super-block, and fall back to 32-weight blocks of at least "
            "4.5 bpw (q4_0, iq4_nl). So the comparison is made where the files are, at about 4–4.5 bpw. "
            + margins_note(wide)
            + " The files are scored on the same chunks, so the margins are paired, but they are not tested for "
            "significance here.",
            "",
        ]
    if above:
        ratio = h_error_ratio("rtn q4_0", "ldlq q4_0")
        ldlq_vs_rtn = "" if ratio is None else (
            f"On this grid LDLQ's calibration H-error is {ratio[0]:.1f}–{ratio[1]:.1f}× below that of lrdeploy's own "
            "importance-weighted RTN (means per linear type, from the `error` each artifact's manifest records; the "
            "lrdeploy rtn q4_0 row), yet its perplexity is higher: at 4 bits on SmolLM2, LDLQ's in-sample objective "
            "does not carry over to the model. Why is not established; two candidates are overfitting to the "
            "calibration Hessian, and SmolLM2's weights sitting on a Q4_1 grid that LDLQ's error feedback moves them "
            "off. ")
        lines += [
            f"Above the curve: {', '.join(above)}. llama-quantize's Q4_0 with the imatrix is the point they lose to: "
            "a 4.5-bpw q4_0 in every linear, ffn_down included. Ours keep q2_k in ffn_down (+ L·R) or round q4_0 "
            f"with LDLQ. {ldlq_vs_rtn}Where ffn_down is 2–3-bit, at Q2_K's bytes and below, ours are below the curve.",
            "",
        ]
    if onnx_rows:
        lines += [
            "Reading the ONNX rows: HQQ's 4-bit file is lossless here because SmolLM2's weights already sit on a "
            "Q4_1 grid, which asymmetric 4-bit blocks of 32 can reproduce; RTN's min/max scales miss that grid in "
            "blocks that do not use both extreme codes. At 2 bits both of onnxruntime's quantizers collapse. "
            "Our exports carry a 2-bit backbone as 4-bit MatMulNBits codes plus an offset "
            "correction (the split form keeps onnxruntime's prepacked kernels), so in ONNX a q2_k backbone costs "
            "4-bit bytes, and the iq4_nl fallback of SmolLM2's 576-wide linears is stored as exact 8-bit codes: "
            "those rows' linears cost about twice their GGUF bpw. Our files are still smaller than onnxruntime's "
            "4-bit ones because they hold the embedding quantized, where onnxruntime's quantizer leaves it float32. "
            "True 2-bit packing does not pay: "
            "onnxruntime's CPU MatMulNBits runs 2-bit weights fast only for blocks of 32 or more with int8 "
            "activations (section \"MatMulNBits\").",
            "",
        ]
        lines += builder_lines(onnx_rows)
    lora_rows = [r for r in ours if r.get("lora_cost")]
    if lora_rows:
        from lrdeploy.runtime.llamacpp import amx_in_build

        lc0 = lora_rows[0]["lora_cost"]
        lines += [
            f"The LoRA path's cost: llama-bench takes no adapter, so its numbers above are for the base alone. The "
            f"adapter's cost was measured with llama-cpp-python {lc0['llama_cpp_python']} on the same base with and "
            "without `lora_path` (128-token prompt, 64 decoded tokens, medians of "
            f"{lc0['runs']} interleaved runs after a warm-up): "
            + "; ".join(f"{r['short']}: decode × {r['lora_cost']['decode_ratio']:.2f}, prefill × "
                        f"{r['lora_cost']['prefill_ratio']:.2f}" for r in lora_rows) + "."
            + (" This llama-cpp-python build has AMX, so both loads used plain CPU buffers (no weight repacking; "
               "README, Troubleshooting), while llama-bench's build leaves AMX out and repacks."
               if amx_in_build() else ""),
            "",
        ]
    spent = {k: v for k, v in STEPS.seconds.items() if v >= 5}
    if spent:
        lines += ["Wall time of the steps this invocation ran (cached steps cost nothing): "
                  + ", ".join(f"{k} {v / 60:.1f} min" for k, v in spent.items()) + ".", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=40, help="llama-perplexity chunks of 512 tokens")
    p.add_argument("--windows", type=int, default=40, help="lrdeploy eval windows of 512 tokens (ONNX)")
    p.add_argument("--imatrix-chunks", type=int, default=32, help="32 × 512 = our compressor's 16,384 tokens")
    p.add_argument("--gptq-seqs", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    p.add_argument("--reps", type=int, default=5, help="llama-bench repetitions per pass (two passes)")
    p.add_argument("--lora-runs", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], choices=["gguf", "bench", "onnx"],
                   help="parts not to compute in this run; what they have cached is still reported")
    p.add_argument("--ort", nargs="*", default=[a for _, a, _ in ORT_POINTS],
                   choices=sorted({a for _, a, _ in ORT_POINTS}), help="onnxruntime algorithms to quantize with")
    p.add_argument("--no-compress", action="store_true", help="use only the lrdeploy artifacts already made")
    p.add_argument("--only-report", action="store_true", help="compute nothing: report what is cached")
    a = p.parse_args()
    for d in (WORK, RESULTS, WORK / "gguf", WORK / "onnx", WORK / "art"):
        d.mkdir(parents=True, exist_ok=True)

    def live(part: str) -> bool:
        return not a.only_report and part not in a.skip

    def measure(part: str, key: str, make) -> dict | None:
        return cached(RESULTS / f"{key}.json", make, live(part))

    bins = build_tools(a.jobs) if live("gguf") else {t: BUILD / "bin" / t for t in TOOLS}
    calib, text = write_texts()
    env = {"onnxruntime": __import__("onnxruntime").__version__}

    # lrdeploy artifacts: the demo's defaults when present, else compressed here (unless --no-compress)
    arts: dict[str, Path] = {}
    for label, args in OURS:
        art = WORK / "art" / slug(label)
        if label == OURS[0][0] and (DEMO_ARTIFACT / "lrdeploy.json").is_file():
            art = DEMO_ARTIFACT
        if not a.only_report and not a.no_compress:
            art = our_artifact(label, args)
        if (art / "lrdeploy.json").is_file():
            arts[label] = art
        else:
            log(f"{label}: no artifact yet (run without --no-compress to make it)")

    todo: list[dict] = []  # GGUF files to measure: every perplexity first, then the (slower, noisier) speed runs
    f32 = WORK / "gguf" / "f32" / "model.gguf"
    if live("gguf"):
        f32 = f32_gguf()
        imat = imatrix(bins, f32, calib, a.imatrix_chunks, a.threads)
        for preset in PRESETS:
            quantize(bins, f32, imat, preset, a.threads)
    for preset in PRESETS:
        todo.append({"short": f"llama-quantize {preset}", "method": f"llama-quantize {preset} --imatrix",
                     "group": "llama-quantize", "model": WORK / "gguf" / f"llama-quantize-{preset}.gguf",
                     "lora": None, "key": f"lq-{preset}"})
    for label, art in arts.items():
        gdir = WORK / "gguf" / slug(label)
        if live("gguf"):
            our_gguf(label, art)
        lora = gdir / "adapter.gguf"
        todo.append({"short": f"lrdeploy {label}", "group": "lrdeploy", "model": gdir / "model.gguf",
                     "method": f"lrdeploy compress {' '.join(dict(OURS)[label])} --target gguf"
                               + (", base + LoRA" if lora.is_file() else ""),
                     "lora": lora if lora.is_file() else None, "key": slug(label)})
    todo.append({"short": "F32 GGUF", "method": "lrdeploy export --dtype f32 (uncompressed)", "group": "reference",
                 "model": f32, "lora": None, "key": "f32"})
    todo = [pt for pt in todo if pt["model"].is_file()]

    gguf_rows: list[dict] = []
    for pt in todo:
        t0 = time.perf_counter()
        ppl = measure("gguf", f"ppl-{pt['key']}-c{a.chunks}",
                      lambda pt=pt: llama_perplexity(bins, pt["model"], pt["lora"], text, a.chunks, a.threads))
        STEPS.add("llama-perplexity", t0)
        row = {k: pt[k] for k in ("short", "method", "group")} | {"protocol": "llama-perplexity"}
        row |= gguf_info(pt["model"], pt["lora"]) | {"ppl": ppl["ppl"] if ppl else None,
                                                     "ppl_err": ppl.get("ppl_err") if ppl else None}
        gguf_rows.append(row)
        log(f"{row['short']}: {row['bytes'] / 1e6:.1f} MB, ppl {_fmt(row['ppl'], '.3f')}")
    t0 = time.perf_counter()
    keys = "+".join(pt["key"] for pt in todo)
    benches = measure("bench", f"bench-{hashlib.sha256(keys.encode()).hexdigest()[:12]}-r{a.reps}",
                      lambda: llama_bench(bins, [pt["model"] for pt in todo], a.threads, a.reps)) or {}
    STEPS.add("llama-bench + LoRA cost", t0)
    for pt, row in zip(todo, gguf_rows, strict=True):
        t0 = time.perf_counter()
        row["bench"] = benches.get(str(pt["model"]))
        if pt["lora"] is not None:
            row["lora_cost"] = measure("bench", f"lora-{pt['key']}",
                                       lambda pt=pt: lora_cost(pt["model"], pt["lora"], a.threads, a.lora_runs))
        STEPS.add("llama-bench + LoRA cost", t0)
        log(f"{row['short']}: pp512 {_fmt((row['bench'] or {}).get('pp512'), '.0f')}, "
            f"tg128 {_fmt((row['bench'] or {}).get('tg128'), '.1f')}")

    onnx_rows: list[dict] = []
    if live("onnx"):
        onnx_env()
    fp32 = onnx_fp32() if live("onnx") else WORK / "onnx" / "fp32"
    vocab = json.loads((fp32 / "config.json").read_text())["vocab_size"] if (fp32 / "config.json").is_file() else 0

    def onnx_point(short: str, method: str, group: str, folder: Path, key: str) -> None:
        if not (folder / "model.onnx").is_file():
            return
        t0 = time.perf_counter()
        ev = measure("onnx", f"eval-onnx-{key}-w{a.windows}", lambda: onnx_eval(folder, a.windows))
        STEPS.add("lrdeploy eval (onnxruntime)", t0)
        row = {"short": short, "method": method, "group": group, "protocol": "lrdeploy eval",
               **onnx_info(folder, vocab), "ppl": ev["ppl"] if ev else None}
        onnx_rows.append(row)
        log(f"{short}: {row['bytes'] / 1e6:.1f} MB, ppl {_fmt(row['ppl'], '.3f')}")

    onnx_point("fp32 ONNX", "lrdeploy export --dtype fp32 (uncompressed)", "reference", fp32, "fp32")
    for label, algo, bits in ORT_POINTS:
        folder = WORK / "onnx" / slug(label)
        if live("onnx") and algo in a.ort:
            try:
                folder = ort_quantize(fp32, label, algo, bits, a.gptq_seqs)
            except Exception as e:  # one quantizer failing must not lose the others
                log(f"{label}: onnxruntime quantizer failed: {type(e).__name__}: {str(e)[:300]}")
                continue
        onnx_point(label, f"MatMulNBitsQuantizer {algo} bits={bits} block {ORT_BLOCK}", "onnxruntime", folder,
                   slug(label))
    genai = WORK / "onnx" / slug(BUILDER)
    if live("onnx"):
        try:
            genai = builder(WORK, "smollm2")
        except SystemExit as e:  # the builder failing must not lose the other rows
            log(f"{BUILDER}: {e}")
    onnx_point(BUILDER, "onnxruntime_genai.models.builder -p int4 -e cpu", "onnxruntime-genai", genai,
               "genai-builder-int4")
    for label, art in arts.items():
        folder = our_onnx(label, art) if live("onnx") else WORK / "onnx" / slug(label)
        onnx_point(f"lrdeploy {label}", "lrdeploy export --format onnx", "lrdeploy", folder, slug(label))

    docs = REPO / "docs"
    plot(gguf_rows, onnx_rows, docs / "peers-ppl-bytes.png")
    section = report(gguf_rows, onnx_rows, a, env)
    update_section("peers", section)
    print(section)


if __name__ == "__main__":
    main()
