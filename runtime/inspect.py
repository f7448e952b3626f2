"""What a file really holds: tensors, types, bytes and bits per weight of a GGUF, an export or an artifact.

bpw is 8·bytes / weights. `linear_bpw` counts only the decoder linears (q, k, v, o, gate, up, down) and, for an
export, adds the adapter's L and R bytes to them: it is the same number as the artifact's manifest bpw, computed from
what llama.cpp loads instead of what the compressor says.
"""

from __future__ import annotations

import math
from pathlib import Path

from lrdeploy.errors import LrdError

LINEAR_GGUF = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LORA_SUFFIXES = (".lora_a", ".lora_b")


def is_linear_gguf(name: str) -> bool:
    """blk.N.<linear>.weight, optionally with a LoRA suffix."""
    for suffix in LORA_SUFFIXES:
        name = name.removesuffix(suffix)
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in LINEAR_GGUF and parts[3] == "weight"


def _row(name: str, type_: str, shape: tuple[int, ...], nbytes: int) -> dict:
    n = math.prod(shape) if shape else 1
    bpw = 8 * nbytes / n if n else 0.0
    return {"name": name, "type": type_, "shape": list(shape), "bytes": int(nbytes), "bpw": bpw}


def gguf_tensors(path: Path) -> list[dict]:
    """One row per tensor of a GGUF file (shape in numpy order: rows first), from the header only."""
    import gguf

    from lrdeploy.compressor.sources import read_gguf_index

    _, index = read_gguf_index(Path(path))
    return [_row(name, gguf.GGMLQuantizationType(t.qtype).name.lower(), t.shape, t.nbytes)
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


def _summary(rows: list[dict], **extra: object) -> dict:
    nbytes = sum(r["bytes"] for r in rows)
    params = sum(math.prod(r["shape"]) for r in rows)
    return {"tensor_count": len(rows), "bytes": nbytes, "bpw": 8 * nbytes / params if params else 0.0,
            **extra, "tensors": rows}


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
            rows.append(_row(name, fmt, shape, nbytes))
        else:
            rows.append(_row(name, str(info["dtype"]).lower(), tuple(info["shape"]), nbytes))
    return rows, manifest


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
        rows.append(_row(t.name, type_, shape, nbytes))
    if verify:
        try:
            onnx.checker.check_model(str(path))
        except Exception as e:  # ValidationError, and protobuf errors on what load let through
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LrdError(f"ONNX {path} does not validate: {first}") from None
    return rows


def inspect_path(path: Path, verify: bool = False) -> dict:
    """Tensors of a .gguf or .onnx file, an export directory (GGUF or ONNX) or an artifact directory.

    VERIFY checks an artifact's files against the sha256 its manifest records, and an ONNX graph with onnx's
    checker; a GGUF's header is always checked (every tensor must lie inside the file).
    """
    from lrdeploy.artifact import MANIFEST, WEIGHTS, is_artifact, verify_files

    path = Path(path)
    if not path.exists():
        raise LrdError(f"no such file or directory: {path}")
    if path.is_file():
        if path.suffix == ".onnx":
            return _summary(onnx_tensors(path, verify), kind="onnx", file_bytes=path.stat().st_size,
                            verified=[path.name] if verify else [])
        rows = gguf_tensors(path)
        return _summary(rows, kind="gguf", file_bytes=path.stat().st_size, linear_bpw=linear_bpw(rows),
                        verified=[path.name] if verify else [])
    if is_artifact(path):
        rows, manifest = _artifact_rows(path)
        checked = verify_files(path, manifest) if verify else []
        return _summary(rows, kind="artifact", linear_bpw=(manifest.get("summary") or {}).get("bpw"),
                        verified=checked)
    model = path / "model.gguf"
    if model.is_file():
        files = [model] + [p for p in (path / "adapter.gguf",) if p.is_file()]
        rows = [row for f in files for row in gguf_tensors(f)]
        return _summary(rows, kind="gguf export", file_bytes=sum(f.stat().st_size for f in files),
                        linear_bpw=linear_bpw(rows), verified=[f.name for f in files] if verify else [])
    if (path / "model.onnx").is_file():
        files = [f for f in path.iterdir() if f.name.startswith("model.onnx")]
        return _summary(onnx_tensors(path / "model.onnx", verify), kind="onnx export",
                        file_bytes=sum(f.stat().st_size for f in files), verified=["model.onnx"] if verify else [])
    if (path / WEIGHTS).is_file():
        raise LrdError(f"{path} is not an lrdeploy artifact: {MANIFEST} is missing")
    raise LrdError(f"{path} is not a .gguf or .onnx file, an export directory or an lrdeploy artifact")
