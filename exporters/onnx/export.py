"""The ONNX export driver: what a file is built for (execution provider, float type, accuracy level), the graph it
gets (fused or plain), the checks on what was written, onnxruntime-genai's genai_config.json, and the atomic
write of the export directory with its lrdeploy_onnx.json."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lrdeploy.errors import LrdError
from lrdeploy.exporters.onnx.fused import build_fused_decoder, fused_problem
from lrdeploy.exporters.onnx.graph import IR_VERSION, MS_DOMAIN, OPSET, Graph
from lrdeploy.exporters.onnx.model import DecoderShape, decoder_shape, open_weights
from lrdeploy.exporters.onnx.nbits import ZERO_POINTS
from lrdeploy.exporters.onnx.plain import build_decoder
from lrdeploy.files import ONNX_DATA as DATA_FILE
from lrdeploy.files import ONNX_META as META_FILE
from lrdeploy.files import ONNX_MODEL as MODEL_FILE
from lrdeploy.io import output_lock, staged_output

META_FORMAT = "lrdeploy-onnx"
META_VERSION = 4  # 2: the fused graph, quantized embedding/head and L·R, weights in model.onnx.data; 3: logits_to_keep;
# 4: built for an execution provider (ep, exact, built_for; the CPU default has int8 activations)
DTYPES = {"fp32": np.float32, "fp16": np.float16}
GRAPHS = ("auto", "fused", "plain")
EPS = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class EpSettings:
    """What an export is built for: the execution provider, the float type of what stays uncompressed, and
    MatMulNBits' accuracy_level (0: float activations, the artifact's logits exactly; 4: int8 activations)."""

    ep: str
    dtype: str
    accuracy_level: int
    exact: bool

    def note(self) -> str:
        """The sentence the export's notes and `lrdeploy inspect` give."""
        if self.ep == "cuda":
            how = (f"{self.dtype} graph (onnxruntime's CUDA GroupQueryAttention runs fp16 only)" if self.dtype == "fp16"
                   else f"{self.dtype} graph: the CUDA EP has no {self.dtype} GroupQueryAttention, so a fused graph "
                        "runs its attention on the CPU EP")
            return f"built for the CUDA EP (--ep cuda): {how}, float activations (accuracy_level 0)"
        if self.exact:
            return (f"built exact (--exact): {self.dtype} graph with float activations (accuracy_level 0), so it "
                    "reproduces the artifact's logits; the default CPU export (int8 activations) decodes faster")
        return (f"built for the CPU EP (--ep cpu): {self.dtype} graph, MatMulNBits quantizes its activations to int8 "
                "(accuracy_level 4, onnxruntime-genai's builder's CPU setting): faster decode, no longer bit-exact "
                "(--exact keeps float activations)")


def ep_settings(ep: str = "auto", exact: bool = False, dtype: str | None = None) -> EpSettings:
    """The settings of an export for EP. cpu: fp32 with int8 activations, the fastest CPU setting (it cost +0.05% to
    +0.16% perplexity against the exact export, docs/results.md, "ONNX Runtime"); cuda: fp16, which the CUDA EP's
    GroupQueryAttention needs, with float activations; auto: cuda where torch sees a CUDA GPU, else cpu. EXACT: fp32
    with float activations (the tests' setting: the export reproduces the artifact's logits). DTYPE overrides the
    float type."""
    if ep not in EPS:
        raise LrdError(f"unknown execution provider '{ep}'; choose one of {', '.join(EPS)}")
    if dtype is not None and dtype not in DTYPES:
        raise LrdError(f"unknown ONNX dtype '{dtype}'; choose fp32 or fp16")
    if ep == "auto":
        ep = "cpu" if exact or not torch.cuda.is_available() else "cuda"
    if ep == "cuda":
        if exact:
            raise LrdError("--exact builds the float32 CPU graph; drop --ep cuda (the CUDA EP's GroupQueryAttention "
                           "runs fp16 only), or drop --exact")
        return EpSettings("cuda", dtype or "fp16", 0, False)
    return EpSettings("cpu", dtype or "fp32", 0 if exact else 4, exact)


def genai_config(s: DecoderShape, config, tokenizer, fused: bool = False, ep: str = "cpu") -> dict:
    """onnxruntime-genai's genai_config.json for this graph. The fused graph shares one past/present buffer per layer
    and takes no position_ids; the plain graph's cache grows by a Concat per step. A file built for the CUDA EP asks
    onnxruntime-genai for it, as the builder's `-e cuda` does."""
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    bos = getattr(config, "bos_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": s.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai",
                                    "provider_options": [{"cuda": {}}] if ep == "cuda" else []},
                "filename": MODEL_FILE,
                "head_size": s.head_dim,
                "hidden_size": s.hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    **({} if fused else {"position_ids": "position_ids"}),
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": s.heads,
                "num_hidden_layers": s.layers,
                "num_key_value_heads": s.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": s.arch,
            "vocab_size": s.vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": s.context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": fused,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _save(model, g: Graph, tmp: Path) -> None:
    """Write model.onnx beside its weights in model.onnx.data. onnxruntime maps an external data file instead of
    copying every weight out of the protobuf: SmolLM2's q4_0 export holds 90 MiB after load this way, 137 MiB
    inline."""
    import onnx

    g.close()
    onnx.save_model(model, str(tmp / MODEL_FILE))
    problem = graph_problem(tmp / MODEL_FILE)
    if problem is not None:
        raise LrdError(f"the exported graph does not validate: {problem}")


# onnxruntime registers these in the default domain, which onnx's checker knows only up to its own opsets
ORT_DEFAULT_DOMAIN_OPS = ("SimplifiedLayerNormalization",)


def graph_problem(path: Path) -> str | None:
    """onnx's checker over the graph at PATH and its weight files, or the first line of what it found.

    onnxruntime's own default-domain ops are checked as the contrib ops they are (the checker skips custom domains
    but rejects an op it does not know in its own): a copy of the graph with those nodes moved is checked beside
    the original, where its external weights resolve."""
    import tempfile

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:  # the checker looks for an external file, not at its extent
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            data = Path(path).parent / info.get("location", "")
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            if data.is_file() and data.stat().st_size < end:
                return f"initializer {t.name} ends at byte {end} of {data.name}, which holds {data.stat().st_size}"
    moved = False
    for node in model.graph.node:
        if node.op_type in ORT_DEFAULT_DOMAIN_OPS and not node.domain:
            node.domain, moved = MS_DOMAIN, True
    try:
        if not moved:
            onnx.checker.check_model(str(path))
            return None
        fd, copy = tempfile.mkstemp(suffix=".onnx", prefix=".check-", dir=Path(path).parent)
        os.close(fd)
        try:
            onnx.save_model(model, copy)
            onnx.checker.check_model(copy)
        finally:
            os.unlink(copy)
    except onnx.checker.ValidationError as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def kernel_notes(manifest: dict | None, vocab: dict[str, str], settings: EpSettings) -> list[str]:
    """What the export's MatMulNBits forms cost on onnxruntime's CPU kernels (tools/bench_nbits.py measured them):
    said in the export's JSON and by `lrdeploy inspect`. None for a file built for the CUDA EP."""
    if settings.ep != "cpu":
        return []
    formats = {e["q_format"] for e in (manifest or {}).get("linears", {}).values()}
    notes = []
    if "q2_k" in formats:
        notes.append("q2_k is stored as 4-bit codes with its offsets split off: onnxruntime's CPU MatMulNBits has "
                     "fast 2-bit kernels only for blocks of 32 or more weights with int8 activations, and q2_k's "
                     "16-weight sub-blocks at 2 bits would be dequantized on every call")
    eight = sorted(f for f in formats if f == "q8_0" or f.startswith("iq")) + sorted(
        v.split(" as ")[0] for v in vocab.values() if " as 8-bit" in v)
    if eight and settings.accuracy_level != 4:
        notes.append(f"{', '.join(dict.fromkeys(eight))} run as 8-bit MatMulNBits, which onnxruntime's CPU kernel "
                     "dequantizes on every call unless activations are int8 (the default CPU export; --exact keeps "
                     "them float): decode can fall below the fp32 export's speed; the default export without "
                     "--exact, or a 4-bit grid (--fallback q4_0, --target onnx) avoids it")
    return notes


def export_onnx(source: str, out_dir: Path, *, ep: str = "auto", exact: bool = False, dtype: str | None = None,
                force: bool = False, zero_points: str = "auto", fuse: bool = True, graph: str = "auto") -> dict:
    """Export an artifact (split Q + L·R linears) or a model source (dense baseline) to OUT_DIR/model.onnx.

    graph: "fused" (onnxruntime's GroupQueryAttention and fused RMSNorms, fused.py), "plain"
    (standard ONNX ops around MatMulNBits), or "auto": fused where the model fits it, else plain.
    ep, exact, dtype: what the file is built for (ep_settings): by default the CPU EP's fastest setting (int8
    activations, not bit-exact); exact=True reproduces the artifact's logits.
    zero_points: see nbits_from_ggml (benchmarks compare "auto" with "float"); fuse: q/k/v and gate/up as one
    wider linear each (same numbers, fewer nodes).
    """
    t0 = time.perf_counter()
    settings = ep_settings(ep, exact, dtype)
    if zero_points not in ZERO_POINTS:
        raise LrdError(f"unknown zero_points '{zero_points}'; choose one of {', '.join(ZERO_POINTS)}")
    if graph not in GRAPHS:
        raise LrdError(f"unknown ONNX graph '{graph}'; choose one of {', '.join(GRAPHS)}")
    out = Path(out_dir)
    with output_lock(out):  # before OUT and OUT.partial are looked at: a second export must not touch them
        return _export(source, out, settings, force, zero_points, fuse, graph, t0)


def _export(source: str, out: Path, settings: EpSettings, force: bool, zero_points: str, fuse: bool, graph: str,
            t0: float) -> dict:
    if out.exists() and not force:
        raise LrdError(f"{out} already exists; pass --force to overwrite it")
    config, weights, tokenizer, manifest = open_weights(source, zero_points)
    shape = decoder_shape(config)
    problem = fused_problem(shape)
    if graph == "fused" and problem is not None:
        raise LrdError(f"the fused ONNX graph does not fit {shape.arch}: {problem}; export with --graph plain")
    fused = graph != "plain" and problem is None
    with staged_output(out, force) as tmp:
        dtype = settings.dtype
        g = Graph(tmp / DATA_FILE, DTYPES[dtype], settings.accuracy_level)
        try:
            model, vocab = (build_fused_decoder if fused else build_decoder)(g, shape, weights, fuse)
        finally:
            g.close()
        _save(model, g, tmp)
        tokenizer.save_pretrained(str(tmp))
        config.save_pretrained(str(tmp))
        genai = genai_config(shape, config, tokenizer, fused, settings.ep)
        (tmp / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n")
        counts = weights.counts
        notes = kernel_notes(manifest, vocab, settings)
        bpw = None if manifest is None else manifest["summary"]["bpw"]
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {
            "format": META_FORMAT,
            "version": META_VERSION,
            "source": str(source),
            "kind": "uncompressed" if manifest is None else "artifact",
            "method": None if manifest is None else manifest.get("method"),
            "ep": settings.ep,
            "exact": settings.exact,
            "built_for": settings.note(),
            "dtype": dtype,
            "zero_points": zero_points,
            "fused": fuse,
            "graph": "fused" if fused else "plain",
            "plain_because": None if fused or graph == "plain" else problem,
            "kv_cache": "shared buffer" if fused else "grows by concatenation",
            "vocab": vocab,
            "notes": notes,
            "accuracy_level": settings.accuracy_level,
            "bpw": bpw,
            "opset": OPSET,
            "ir_version": IR_VERSION,
            "linears": counts,
            "graph_nodes": len(model.graph.node),
            "model_bytes": sum(v for k, v in files.items() if k.startswith(MODEL_FILE)),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    seconds = time.perf_counter() - t0
    iq = f" ({counts['iquant_8bit']} i-quants as exact 8-bit codes)" if counts["iquant_8bit"] else ""
    what = (f"{counts['matmulnbits']} linears as MatMulNBits{iq}, {counts['lowrank']} with L·R, artifact bpw "
            f"{bpw:.3f} (`lrdeploy inspect` gives the file's)"
            if manifest is not None else f"{counts['dense']} dense MatMuls (uncompressed baseline)")
    how = f"{meta['graph']} graph" + (f" ({meta['plain_because']})" if meta["plain_because"] else "")
    built = "exact" if settings.exact else f"for the {settings.ep.upper()} EP" + (
        ", int8 activations" if settings.accuracy_level == 4 else "")
    message = (f"wrote {out / MODEL_FILE} ({meta['model_bytes'] / 1e6:.1f} MB, {dtype}, {built}, {shape.layers} "
               f"layers, {how}): "
               f"{what}; embedding {vocab['embed']}, head {vocab['head']}; in {seconds:.1f} s")
    keys = ("kind", "ep", "exact", "accuracy_level", "built_for", "dtype", "zero_points", "bpw", "graph",
            "plain_because", "kv_cache", "vocab", "notes")
    return {"output": str(out), "format": "onnx", **{k: meta[k] for k in keys},
            "linears": counts, "model_bytes": meta["model_bytes"], "seconds": round(seconds, 2), "message": message}
