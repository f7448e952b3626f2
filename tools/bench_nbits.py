"""MatMulNBits on onnxruntime's CPU EP: the time of one linear by bits, block size, accuracy level and zero-point kind.

    python tools/bench_nbits.py [--shapes 1536x576,8960x1536] [--tokens 1,128] [--runs 30] [--threads 2] [--write]

Each variant is a one-node graph y = MatMulNBits(x, B, scales[, zero_points]) over random codes, for an N×K weight
(SmolLM2's gate/up is 1536×576, Qwen2.5-Coder-1.5B's is 8960×1536), fed 1 token (a decode step, a GEMV) or 128 (a
prefill chunk). All variants of one shape and token count are timed interleaved, median of --runs calls each after
a warm-up, so a load change hits them alike; intra-op threads do not spin between calls, so the sessions waiting
their turn leave the cores to the one being timed. bpw counts codes, scales (float32, as the fp32 graph stores them) and
packed zero points.

Accuracy level 0 keeps the activations in float32: the output is x·Wᵀ of the dequantized weight up to summation
order, which the "exact" column checks (max |Δ| / max |y| against numpy in float64 ≤ 1e-5). Level 4 lets the kernel
quantize x to int8 per block (onnxruntime's fast CPU path, lossy). With --write the table becomes the "nbits"
section of docs/results.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from itertools import product

import numpy as np

from lrdeploy.exporters.onnx.nbits import pack_low_first, pack_zero_points

VARIANTS = [(bits, block, zp, acc)
            for bits, block, zp, acc in product((2, 4, 8), (16, 32, 64), ("none", "uint8", "float"), (0, 4))
            if not (bits == 8 and zp == "float")]  # no float zero-point kernel at 8 bits


def build(n: int, k: int, bits: int, block: int, zp: str, acc: int, rng: np.random.Generator, x: np.ndarray):
    """(session, x·Wᵀ in float64 for the dequantized W, bytes of B + scales + zero points)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    kb = k // block
    codes = rng.integers(0, 1 << bits, (n, kb, block))
    scales = (rng.random((n, kb)) * 0.02 + 0.001).astype(np.float32)
    inits = [numpy_helper.from_array(pack_low_first(codes, bits), "B"), numpy_helper.from_array(scales, "scales")]
    inputs = ["x", "B", "scales"]
    if zp == "none":
        zero = np.full((n, kb), 1 << (bits - 1), np.float64)
    elif zp == "uint8":
        zint = rng.integers(0, 1 << bits, (n, kb))
        inits.append(numpy_helper.from_array(pack_zero_points(zint, bits), "zp"))
        inputs.append("zp")
        zero = zint.astype(np.float64)
    else:
        zf = (rng.random((n, kb)) * (1 << bits)).astype(np.float32)
        inits.append(numpy_helper.from_array(zf, "zp"))
        inputs.append("zp")
        zero = zf.astype(np.float64)
    W = ((codes - zero[..., None]) * scales[..., None].astype(np.float64)).reshape(n, k)
    extra = {"accuracy_level": acc} if acc else {}
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, **extra)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle sessions must not spin on the cores
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    nbytes = sum(t.raw_data.__len__() for t in inits[1:]) + n * kb * block * bits // 8
    return session, x.astype(np.float64) @ W.T, nbytes


THREADS = 2


def measure(shapes: list[tuple[int, int]], tokens: list[int], runs: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for (n, k), m in product(shapes, tokens):
        built = {}
        x = rng.standard_normal((m, k)).astype(np.float32)
        for v in VARIANTS:
            try:
                built[v] = build(n, k, *v, rng, x)
            except Exception as e:  # a combination onnxruntime refuses
                rows.append({"shape": f"{n}x{k}", "tokens": m, "variant": v, "error": str(e).splitlines()[0][:80]})
        times: dict = {v: [] for v in built}
        exact = {}
        for v, (sess, ref, _) in built.items():
            y = sess.run(None, {"x": x})[0]
            exact[v] = float(np.abs(y - ref).max() / np.abs(ref).max())
        for _ in range(runs):
            for v, (sess, _, _) in built.items():
                t0 = time.perf_counter()
                sess.run(None, {"x": x})
                times[v].append(time.perf_counter() - t0)
        for v, (_, _, nbytes) in built.items():
            rows.append({"shape": f"{n}x{k}", "tokens": m, "variant": v, "us": 1e6 * statistics.median(times[v]),
                         "bpw": 8 * nbytes / (n * k), "rel_err": exact[v]})
        print(f"{n}x{k}, {m} tokens: {len(built)} variants timed", flush=True)
    return rows


def report(rows: list[dict], a: argparse.Namespace) -> str:
    import onnxruntime as ort

    cols = sorted({(r["shape"], r["tokens"]) for r in rows}, key=lambda c: (c[0], c[1]))
    by = {(r["variant"], r["shape"], r["tokens"]): r for r in rows}
    ref = {c: by.get(((4, 32, "none", 0), *c)) for c in cols}
    lines = [
        "## MatMulNBits on the CPU EP: bits, block size, zero points, accuracy level",
        "",
        f"`python tools/bench_nbits.py --shapes {a.shapes} --tokens {a.tokens} --runs {a.runs} --threads {a.threads} "
        f"--write`. onnxruntime {ort.__version__}, {a.threads} intra-op threads, {platform.machine()}, 2 cores. One "
        "node y = MatMulNBits(x, W) with random codes; medians of the interleaved runs; µs per call and the ratio to "
        "4-bit, block 32, no zero points, level 0 (× ref, lower is faster). bpw: codes + float32 scales + packed zero "
        "points. exact: level 0's max |Δ| / max |y| against float64 numpy is ≤ 1e-5.",
        "",
        "| bits | block | zero points | level | bpw | " + " | ".join(f"{s}, {t} tok µs | × ref" for s, t in cols)
        + " | exact |",
        "|---:|---:|---|---:|---:|" + "---:|---:|" * len(cols) + "---|",
    ]
    for v in VARIANTS:
        cells, bpw, err = [], None, None
        for c in cols:
            r = by.get((v, *c))
            if r is None or "error" in r:
                cells += ["refused", "–"]
                continue
            bpw = r["bpw"] if c[0] == cols[0][0] else bpw
            err = max(err or 0.0, r["rel_err"])
            base = ref[c]["us"] if ref[c] and "us" in ref[c] else None
            cells += [f"{r['us']:.0f}", f"{r['us'] / base:.2f}" if base else "–"]
        exact = "–" if err is None else ("yes" if err <= 1e-5 else f"no ({err:.1e})") if v[3] == 0 else "int8 x"
        lines.append(f"| {v[0]} | {v[1]} | {v[2]} | {v[3]} | {'' if bpw is None else f'{bpw:.3f}'} | "
                     + " | ".join(cells) + f" | {exact} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    global THREADS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1536x576,8960x1536")
    p.add_argument("--tokens", default="1,128")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="write the nbits section of docs/results.md")
    a = p.parse_args()
    THREADS = a.threads
    shapes = [tuple(int(d) for d in s.split("x")) for s in a.shapes.split(",")]
    rows = measure(shapes, [int(t) for t in a.tokens.split(",")], a.runs)
    text = report(rows, a)
    print(text)
    if a.write:
        from common import update_section

        update_section("nbits", text)


if __name__ == "__main__":
    main()
