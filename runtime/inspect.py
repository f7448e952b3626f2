"""What a file really holds: tensors, types, bytes and bits per weight of a GGUF, an export or an artifact.

Two bpw, both 8·bytes / weights. `bpw_file` counts every tensor's bytes (embeddings, norms, an adapter's L and R)
over every weight of the model: what the file costs. `bpw_linears` is the README's bpw: bytes of Q + L + R, scales
included, over Σ out·in of the decoder linears (q, k, v, o, gate, up, down); for a GGUF export it adds the adapter's L
and R bytes to the base file's linears, so it is the same number as the artifact's manifest bpw, computed from what
llama.cpp loads instead of what the compressor says. Low-rank factors and quantization side tensors (MatMulNBits
scales and zero points) add bytes but no weights.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from lrdeploy.errors import LrdError
from lrdeploy.files import GGUF_ADAPTER, GGUF_BASE, ONNX_MODEL

# attn_qkv: phi3's fused q, k and v; its ffn_up holds gate and up
LINEAR_GGUF = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LORA_SUFFIXES = (".lora_a", ".lora_b")


def is_linear_gguf(name: str) -> bool:
    """blk.N.<linear>.weight, optionally with a LoRA suffix."""
    for suffix in LORA_SUFFIXES:
        name = name.removesuffix(suffix)
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in LINEAR_GGUF and parts[3] == "weight"


def _row(name: str, type_: str, shape: tuple[int, ...], nbytes: int, weights: int | None = None) -> dict:
    """WEIGHTS: the model weights the tensor holds (default: its elements; 0 for low-rank factors and quantization side
    tensors, K·N for packed MatMulNBits blocks). bpw is per weight where it has weights, else per element."""
    n = math.prod(shape) if shape else 1
    weights = n if weights is None else weights
    per = weights or n
    return {"name": name, "type": type_, "shape": list(shape), "bytes": int(nbytes), "weights": int(weights),
            "bpw": 8 * nbytes / per if per else 0.0}


def gguf_tensors(path: Path) -> list[dict]:
    """One row per tensor of a GGUF file (shape in numpy order: rows first), from the header only."""
    import gguf

    from lrdeploy.compressor.sources import read_gguf_index

    _, index = read_gguf_index(Path(path))
    return [_row(name, gguf.GGMLQuantizationType(t.qtype).name.lower(), t.shape, t.nbytes,
                 0 if name.endswith(LORA_SUFFIXES) else None)
            for name, t in index.items()]


def linear_bpw(rows: list[dict]) -> float | None:
    """bpw over the decoder linears: their base bytes plus their LoRA bytes, over the base weights' count."""
    params = sum(math.prod(r["shape"]) for r in rows if is_linear_gguf(r["name"]) and
                 not r["name"].endswith(LORA_SUFFIXES))
    nbytes = sum(r["bytes"] for r in rows if is_linear_gguf(r["name"]))
    return 8 * nbytes / params if params else None


def export_bpw(model: Path, adapter: Path | None) -> float | None:
    """linear_bpw of a base GGUF plus its optional LoRA adapter: what llama.cpp stores per linear weight."""
    rows = gguf_tensors(model) + (gguf_tensors(adapter) if adapter is not None else [])
    return linear_bpw(rows)


def _summary(rows: list[dict], bpw_linears: float | None, bpw_linears_from: str | None, **extra: object) -> dict:
    nbytes = sum(r["bytes"] for r in rows)
    weights = sum(r["weights"] for r in rows)
    return {"tensor_count": len(rows), "bytes": nbytes, "weights": weights,
            "bpw_file": 8 * nbytes / weights if weights else None, "bpw_linears": bpw_linears,
            "bpw_linears_from": bpw_linears_from if bpw_linears is not None else None, **extra, "tensors": rows}


def _artifact_rows(path: Path) -> tuple[list[dict], dict]:
    from lrdeploy.artifact import WEIGHTS, read_manifest
    from lrdeploy.io import read_safetensors_header

    manifest = read_manifest(path)
    header, _ = read_safetensors_header(path / WEIGHTS)
    rows = []
    for name, info in header.items():
        base, _, kind = name.rpartition(".")
        nbytes = info["data_offsets"][1] - info["data_offsets"][0]
        entry = manifest["linears"].get(base)
        if entry is not None and kind in ("q", "lora_l", "lora_r"):
            out, in_ = entry["shape"]
            r = entry["rank"]
            shape = {"q": (out, in_), "lora_l": (out, r), "lora_r": (r, in_)}[kind]
            fmt = entry["q_format"] if kind == "q" else (entry.get("lr_format") or "f16")
            rows.append(_row(name, fmt, shape, nbytes, None if kind == "q" else 0))
        elif kind == "q" and (manifest.get("tensors") or {}).get(base, {}).get("q_format"):  # embedding/head blocks
            t = manifest["tensors"][base]
            rows.append(_row(name, t["q_format"], tuple(t["shape"]), nbytes))
        else:
            rows.append(_row(name, str(info["dtype"]).lower(), tuple(info["shape"]), nbytes))
    return rows, manifest


ONNX_FACTOR_SUFFIXES = (".lora_l_t", ".lora_r_t", ".q.offsets_t")  # lrdeploy's ONNX export: L, R and Q's offsets
ONNX_LOWRANK = (".lora_l.q.", ".lora_r.q.")  # L and R stored as MatMulNBits blocks
ONNX_VOCAB = ("model.embed_tokens.", "lm_head.")  # a quantized embedding or head: not a decoder linear


def _matmulnbits_weights(graph) -> dict[str, int]:
    """Weights held by MatMulNBits inputs: K·N for the packed blocks B, none for scales and zero points."""
    packed: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 2:
            continue
        attrs = {a.name: a.i for a in node.attribute if a.name in ("K", "N")}
        if attrs.get("K", 0) > 0 and attrs.get("N", 0) > 0:  # L and R: their linear's bytes, none of its weights
            packed[node.input[1]] = 0 if any(m in node.input[1] for m in ONNX_LOWRANK) else attrs["K"] * attrs["N"]
        packed.update({name: 0 for name in node.input[2:] if name})
    return packed


def _onnx_side_weights(name: str) -> int | None:
    """0 for the low-rank factors and offsets of lrdeploy's ONNX export (bytes, not weights), else None (elements)."""
    base = name.rstrip("0123456789").removesuffix("_") if name[-1:].isdigit() else name  # Graph.fresh's '_N'
    return 0 if base.endswith(ONNX_FACTOR_SUFFIXES) else None


def onnx_tensors(path: Path, verify: bool = False) -> list[dict]:
    """One row per initializer of an ONNX model (weights inline or external), from the protobuf only.

    VERIFY also runs onnx's checker over the graph. A damaged file is one clear error: protobuf reports damage
    with several exception types, so every failure to parse is caught here, at the file boundary.
    """
    import onnx
    from onnx import helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError, RuntimeWarning-as-error, OSError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LrdError(f"cannot read ONNX {path}: {first}") from None
    names = [t.name for t in model.graph.initializer] + [n for node in model.graph.node for n in node.input]
    if not all(isinstance(n, str) for n in names):  # protobuf hands back bytes where a name is not valid UTF-8
        raise LrdError(f"cannot read ONNX {path}: a tensor name is not valid UTF-8")
    packed = _matmulnbits_weights(model.graph)
    rows = []
    for t in model.graph.initializer:
        try:
            type_ = onnx.TensorProto.DataType.Name(t.data_type).lower()
        except ValueError:
            raise LrdError(f"cannot read ONNX {path}: initializer {t.name} has unknown type {t.data_type}") from None
        shape = tuple(int(d) for d in t.dims)
        if any(d < 0 for d in shape):
            raise LrdError(f"cannot read ONNX {path}: initializer {t.name} has a negative dimension {shape}")
        external = {e.key: e.value for e in t.external_data}
        if t.HasField("raw_data"):
            nbytes = len(t.raw_data)
        elif "length" in external and external["length"].isdigit():
            nbytes = int(external["length"])
        else:
            try:
                nbytes = math.prod(shape) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            except (KeyError, TypeError, ValueError):
                nbytes = 0
        row = _row(t.name, type_, shape, nbytes, packed.get(t.name, _onnx_side_weights(t.name)))
        row["linear"] = ((t.name in packed or _onnx_side_weights(t.name) == 0)  # a quantized linear's bytes
                         and not t.name.startswith(ONNX_VOCAB))
        rows.append(row)
    if verify:
        from lrdeploy.exporters.onnx import graph_problem

        try:
            problem = graph_problem(path)
        except Exception as e:  # protobuf errors on what load let through
            problem = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if problem is not None:
            raise LrdError(f"ONNX {path} does not validate: {problem}")
    return rows


# fp16 fields (byte offsets in a block) that hold a ggml block's scales, d and dmin or m where there is one, for the
# types lrdeploy does not write (a source's or a peer's file); each of its own formats says where its own are
OTHER_SCALES = {"Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@functools.cache
def gguf_scales() -> dict[str, tuple[int, ...]]:
    from lrdeploy.compressor.grids import GRIDS

    return {**OTHER_SCALES, **{g.ggml_type.name: g.scale_fields for g in GRIDS.values()}}


GGUF_FLOATS = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}
CHUNK = 1 << 26  # bytes per numpy pass


def _nonfinite(raw, type_name: str, type_size: int) -> int | None:
    """NaN/Inf count in a tensor's bytes: every value of a float tensor, the fp16 scales of a quantized one; None when
    the type has neither (integers, types without an fp16 scale)."""
    import numpy as np

    if type_name in GGUF_FLOATS:
        values = raw.view(GGUF_FLOATS[type_name])
        if type_name == "BF16":  # exponent all ones
            return int(np.count_nonzero((values & 0x7F80) == 0x7F80))
        return int(values.size - np.count_nonzero(np.isfinite(values)))
    scales = gguf_scales()
    if type_name in scales:
        blocks = raw.reshape(-1, type_size)
        return sum(int(blocks.shape[0] - np.count_nonzero(np.isfinite(
            np.ascontiguousarray(blocks[:, off:off + 2]).view("<f2")))) for off in scales[type_name])
    return None


def verify_gguf(path: Path) -> str:
    """Check a GGUF beyond its header; returns what was checked, in one line.

    The tensors, in offset order, must not overlap, and no bytes may lie before, between or after them beyond
    alignment padding: the tensor table accounts for the whole data section. Every tensor's bytes are then read:
    float tensors and the fp16 scales of quantized blocks must hold no NaN or Inf. GGUF has no checksum, so a changed
    quantized value (a flipped bit in a code) cannot be detected.
    """
    import gguf
    import numpy as np

    from lrdeploy.compressor.sources import read_gguf_layout

    path = Path(path)
    _, index, pos, align = read_gguf_layout(path)  # it already refuses a tensor that runs past the end of the file
    tensors = sorted(index.items(), key=lambda item: item[1].offset)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    before = "the start of the tensor data"
    floats = scaled = nbytes = 0
    unchecked: set[str] = set()
    for name, t in tensors:
        start, size = t.offset, t.nbytes
        if start < pos:
            raise LrdError(f"cannot verify GGUF {path}: tensor {name} overlaps {before}")
        if start - pos >= align:
            raise LrdError(f"cannot verify GGUF {path}: {start - pos} bytes before tensor {name} belong to no "
                           f"tensor (alignment {align})")
        qtype = gguf.GGMLQuantizationType(t.qtype)
        type_name, (_, type_size) = qtype.name, gguf.GGML_QUANT_SIZES[qtype]
        step = max(type_size, CHUNK // type_size * type_size)
        bad = 0
        for i in range(start, start + size, step):
            chunk = np.asarray(data[i : min(i + step, start + size)])
            n = _nonfinite(chunk, type_name, type_size)
            if n is None:  # nothing to check in this type: read its bytes all the same (I/O errors surface here)
                np.bitwise_or.reduce(chunk)
            bad += n or 0
        if bad:
            where = "values" if type_name in GGUF_FLOATS else "block scales"
            raise LrdError(f"GGUF {path}: tensor {name} ({type_name.lower()}) has {bad} NaN/Inf {where} (corrupt)")
        if type_name in GGUF_FLOATS:
            floats += 1
        elif type_name in gguf_scales():
            scaled += 1
        elif size:
            unchecked.add(type_name.lower())
        nbytes += size
        pos, before = start + size, f"tensor {name}"
    if len(data) - pos >= align:
        raise LrdError(f"cannot verify GGUF {path}: {len(data) - pos} bytes after {before} belong to no tensor "
                       f"(alignment {align})")
    line = (f"{path.name}: header and tensor table; {len(tensors)} tensors fill the data section exactly (no "
            f"overlap, nothing but alignment padding between them or after the last); {nbytes:,} tensor bytes read; "
            f"no NaN/Inf in {floats} float tensors or in the fp16 scales of {scaled} quantized tensors")
    if unchecked:
        line += f" ({', '.join(sorted(unchecked))}: no fp16 scale to check)"
    return line + ". Not checkable: quantized codes (GGUF has no checksum)"


def onnx_linear_bpw(rows: list[dict]) -> float | None:
    """bpw of the compressed linears as the ONNX file stores them: MatMulNBits blocks with their scales and zero
    points, plus lrdeploy's low-rank factors and offsets, over the blocks' K·N weights (None: no such linear)."""
    weights = sum(r["weights"] for r in rows if r.get("linear"))
    return 8 * sum(r["bytes"] for r in rows if r.get("linear")) / weights if weights else None


def _onnx_linears(rows: list[dict], folder: Path) -> tuple[float | None, str]:
    """The file's own linear bpw where it has MatMulNBits linears, else what lrdeploy_onnx.json records."""
    bpw = onnx_linear_bpw(rows)
    return (bpw, "tensors") if bpw is not None else (_onnx_bpw(folder), "lrdeploy_onnx.json")


def _onnx_meta(folder: Path) -> dict:
    """lrdeploy_onnx.json of an export ({} where it is missing or unreadable)."""
    import json

    meta = folder / "lrdeploy_onnx.json"
    try:
        data = json.loads(meta.read_text()) if meta.is_file() else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _onnx_notes(meta: dict) -> list[str]:
    """What an export's record says of it: the settings it was built for (exports since --ep), then its kernel
    notes."""
    built = meta.get("built_for")
    return ([built] if isinstance(built, str) else []) + list(meta.get("notes") or [])


def _onnx_bpw(folder: Path) -> float | None:
    """The linears' bpw an ONNX export records (its artifact's: Q + L + R as the compressor stored them)."""
    bpw = _onnx_meta(folder).get("bpw")
    return float(bpw) if isinstance(bpw, (int, float)) else None


def _gguf_magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def mix_notes(manifest: dict) -> list[str]:
    """What a --mix-bpw run chose: its formats' counts and how many linears it moved up."""
    m = manifest.get("mix")
    if not m:
        return []
    counts = ", ".join(f"{n} {f}" for f, n in sorted(m["counts"].items()))
    return [f"sensitivity mix for {m['mix_bpw']} bpw: {counts} ({len(m['moved'])} linears moved up; the manifest's "
            "mix says which and why)"]


def rotation_notes(manifest: dict) -> list[str]:
    """The rotations a compress folded in (--rotate) and the one it left for run time (--rotate-down)."""
    o, notes = manifest.get("options") or {}, []
    if o.get("rotate", "none") != "none":
        notes.append(f"residual stream rotated ({o['rotate']}, seed {o.get('rotate_seed', 0)}), folded into the "
                     "weights: every runtime runs it as is")
    down = manifest.get("rotate_down")
    if down:
        notes.append(f"down_proj's input rotated online (randomized Hadamard in blocks of {down['block']}, seed "
                     f"{down['seed']}): torch and ONNX run it, the GGUF export refuses it")
    return notes


def inspect_path(path: Path, verify: bool = False) -> dict:
    """Tensors of a .gguf or .onnx file, an export directory (GGUF or ONNX) or an artifact directory.

    A GGUF's header is always checked (every tensor must lie inside the file). VERIFY checks more, and `checks` says
    what, one line per file: an artifact's files against the size and sha256 its manifest records, an ONNX graph
    with onnx's checker, a GGUF as `verify_gguf` does.
    """
    from lrdeploy.artifact import MANIFEST, WEIGHTS, is_artifact, verify_files

    path = Path(path)
    if not path.exists():
        raise LrdError(f"no such file or directory: {path}")
    if path.is_file():
        if path.suffix == ".onnx":
            rows = onnx_tensors(path, verify)
            return _summary(rows, *_onnx_linears(rows, path.parent), kind="onnx",
                            file_bytes=path.stat().st_size, **_onnx_checks([path.name] if verify else []))
        if path.suffix != ".gguf" and _gguf_magic(path) != b"GGUF":
            raise LrdError(f"{path} is neither a GGUF file (magic 'GGUF') nor an ONNX model (.onnx) nor an lrdeploy "
                           "artifact or export directory")
        rows = gguf_tensors(path)
        return _summary(rows, linear_bpw(rows), "tensors", kind="gguf", file_bytes=path.stat().st_size,
                        **_gguf_checks([path] if verify else []))
    if is_artifact(path):
        rows, manifest = _artifact_rows(path)
        checked = verify_files(path, manifest) if verify else []
        checks = [f"{name}: size and sha256 match the manifest" for name in checked]
        return _summary(rows, (manifest.get("summary") or {}).get("bpw"), "manifest", kind="artifact",
                        verified=checked, checks=checks, notes=mix_notes(manifest) + rotation_notes(manifest))
    model = path / GGUF_BASE
    if model.is_file():
        files = [model] + [p for p in (path / GGUF_ADAPTER,) if p.is_file()]
        rows = [row for f in files for row in gguf_tensors(f)]
        return _summary(rows, linear_bpw(rows), "tensors", kind="gguf export",
                        file_bytes=sum(f.stat().st_size for f in files), **_gguf_checks(files if verify else []))
    if (path / ONNX_MODEL).is_file():
        files = [f for f in path.iterdir() if f.name.startswith(ONNX_MODEL)]
        rows = onnx_tensors(path / ONNX_MODEL, verify)
        return _summary(rows, *_onnx_linears(rows, path), kind="onnx export",
                        file_bytes=sum(f.stat().st_size for f in files), notes=_onnx_notes(_onnx_meta(path)),
                        **_onnx_checks([ONNX_MODEL] if verify else []))
    if (path / WEIGHTS).is_file():
        raise LrdError(f"{path} is not an lrdeploy artifact: {MANIFEST} is missing")
    raise LrdError(f"{path} is neither an lrdeploy artifact ({MANIFEST}) nor an export directory (model.gguf or "
                   "model.onnx), and not a .gguf or .onnx file")


def _gguf_checks(files: list[Path]) -> dict:
    return {"verified": [f.name for f in files], "checks": [verify_gguf(f) for f in files]}


def _onnx_checks(names: list[str]) -> dict:
    return {"verified": names, "checks": [f"{n}: onnx.checker (graph, operator schemas, initializer types); weight "
                                          "values not checked" for n in names]}
