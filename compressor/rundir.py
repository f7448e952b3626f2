"""The run directory OUT.partial/: shards, run state, resume and the final move to OUT.

base.safetensors (embedding, final norm, head), one shard per finished decoder block in layers/, head.safetensors for
a head rounded with its input importance, and state.json recording what is done. Every file is written as a *.tmp
sibling and renamed into place, so a killed run leaves only whole files and resumes from its last finished block.
"""

from __future__ import annotations

import copy
import platform
import shutil
from pathlib import Path

import torch
from torch import nn

from lrdeploy.artifact import MANIFEST
from lrdeploy.compressor import embeddings as emb
from lrdeploy.compressor.arch import Arch
from lrdeploy.compressor.options import CompressOptions
from lrdeploy.errors import LrdError
from lrdeploy.io import atomic_write_json, partial_dir, replace_dir


def start_or_resume(tmp: Path, state_file: Path, o: CompressOptions, resume: bool, force: bool) -> dict:
    fresh = {"options": o.to_json(), "layers_done": 0, "linears": {}, "seconds": 0.0}
    if tmp.exists():
        if resume:
            import json

            try:
                state = json.loads(state_file.read_text())
            except (OSError, ValueError):
                state = None
            if state is None or not isinstance(state, dict) or "layers_done" not in state:
                raise LrdError(f"cannot resume: {state_file} is missing or corrupt; pass --force to start over")
            if state.get("options") != o.to_json():
                raise LrdError(f"cannot resume {tmp}: it was started with other options; pass --force to start over")
            return state
        if not force:
            raise LrdError(f"an unfinished run is in {tmp}; pass --resume to continue it or --force to start over")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "layers").mkdir()
    atomic_write_json(state_file, fresh)
    return fresh


def save_vocab(path: Path, tensors: dict[str, torch.Tensor | emb.Stored], state: dict, state_file: Path) -> None:
    """Write one shard; the manifest records of its embedding/head go into the state first (a kill between the two
    writes leaves a state whose shard is rewritten on resume, never a shard without its record)."""
    from safetensors.torch import save_file

    records = {n: t.entry() for n, t in tensors.items() if isinstance(t, emb.Stored)}
    if records:
        state.setdefault("tensors", {}).update(records)
        atomic_write_json(state_file, state)
    flat: dict[str, torch.Tensor] = {}
    for n, t in tensors.items():
        flat.update(t.tensors(n) if isinstance(t, emb.Stored) else {n: t.contiguous()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(flat, str(tmp))
    tmp.replace(path)


def save_shard(path: Path, tensors: dict[str, torch.Tensor], teacher: nn.Module, prefix: str,
                arch: Arch) -> None:
    """One finished block: its compressed linears plus its other tensors (norms) as they were."""
    from safetensors.torch import save_file

    compressed = {prefix + n for n in arch.linears}
    for name, p in teacher.named_parameters():
        full = prefix + name
        if full.rpartition(".")[0] not in compressed:
            tensors[full] = p.detach().cpu().contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def student_block(teacher: nn.Module, prefix: str, shard: Path, linears: dict, device) -> nn.Module:
    """The compressed block rebuilt from its shard: the same code path for a fresh run and a resumed one."""
    from lrdeploy.artifact import ArtifactTensors, install_qlr

    sub = {k[len(prefix):]: v for k, v in linears.items() if k.startswith(prefix)}
    student = copy.deepcopy(teacher)
    install_qlr(student, sub)
    get = ArtifactTensors(shard.parent.parent, {"linears": linears}, device, weights=shard)
    with torch.no_grad():
        for name in sub:
            module = student.get_submodule(name)
            module.to_empty(device=device)
            for key in ("q", "lora_l", "lora_r", "bias"):
                if getattr(module, key) is not None:
                    getattr(module, key).copy_(get(f"{prefix}{name}.{key}"))
    return student.eval()


def finalize(tmp: Path, out: Path) -> dict:
    """Drop the shards and the run state once the manifest is written, then move TMP to OUT (safe to repeat)."""
    import json

    (tmp / "base.safetensors").unlink(missing_ok=True)
    (tmp / "head.safetensors").unlink(missing_ok=True)
    if (tmp / "layers").is_dir():
        shutil.rmtree(tmp / "layers")
    (tmp / "state.json").unlink(missing_ok=True)
    manifest = json.loads((tmp / MANIFEST).read_text())
    replace_dir(tmp, out)
    return manifest


def tidy_partial(out: Path) -> int:
    """After a failed write: drop half-written *.tmp files from OUT.partial, keep finished layers; returns how many.

    Every finished file was renamed into place whole, so only the *.tmp siblings can be damaged. Call it while
    holding OUT's lock: another run's *.tmp files are not strays.
    """
    tmp = partial_dir(out)
    if tmp.is_dir():
        for stray in tmp.rglob("*.tmp"):
            stray.unlink(missing_ok=True)
    return finished_layers(out)


def finished_layers(out: Path) -> int:
    """How many blocks OUT.partial holds finished (0 when there is no readable run state)."""
    import json

    tmp = partial_dir(out)
    try:
        return int(json.loads((tmp / "state.json").read_text())["layers_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def add_seconds(state: dict, stage: str, seconds: float) -> None:
    stages = state.setdefault("stage_seconds", {})
    stages[stage] = stages.get(stage, 0.0) + seconds


def note_peak(state: dict, where: str) -> None:
    """Record WHERE the process's peak resident set grew, if it did: the manifest's `peak_rss` then says which
    stage of which block set the run's memory high-water mark (getrusage; nothing off POSIX)."""
    try:
        import resource
    except ImportError:
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mib = peak / 2**20 if platform.system() == "Darwin" else peak / 1024  # bytes on macOS, KiB elsewhere
    old = state.get("peak_rss")
    if old is None or mib > old["mib"] + 0.5:
        state["peak_rss"] = {"mib": round(mib, 1), "at": where}


def stage_seconds(state: dict) -> dict:
    """Where the time went, summed over blocks: H collection (the block's forward passes, XᵀX and its Cholesky
    factors), decomposition per linear type, distillation, the compressed block's forward that feeds the next
    block (student inputs), and --mix-bpw's sensitivity pass."""
    by_type: dict[str, float] = {}
    for name, e in state["linears"].items():
        kind = name.rsplit(".", 1)[-1]
        by_type[kind] = by_type.get(kind, 0.0) + (e.get("seconds") or 0.0)
    spent = {k: round(v, 2) for k, v in state.get("stage_seconds", {}).items()}
    distill = sum(r.get("seconds", 0.0) for r in state.get("distill", []))
    return {**spent, "decompose": {k: round(v, 2) for k, v in by_type.items()},
            **({"distill": round(distill, 2)} if state.get("distill") else {})}
