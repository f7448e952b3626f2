"""Issue 8: bad inputs, interruptions, full disks and damaged files end in one clear line and never lose work.

Every bad input in the table must print exactly one `error: ...` line naming the problem, exit non-zero, leave no
traceback and no partial output, and leave an existing output alone. Then: SIGINT and ENOSPC keep finished layers
and `--resume` finishes byte-identically; the manifest's sha256 is checked by inspect --verify, eval and export;
and hypothesis throws mutated manifests, GGUF and ONNX files at the parsers.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CHEAP, NARROW, RESUMABLE, narrow_rtn_artifact
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from interrupt import signal_after_first_block

from lrdeploy.artifact import MANIFEST, WEIGHTS, read_manifest, validate_manifest
from lrdeploy.compressor.driver import CompressOptions, compress
from lrdeploy.compressor.sources import open_source
from lrdeploy.errors import LrdError
from lrdeploy.exporters.gguf import export_gguf
from lrdeploy.exporters.onnx import export_onnx
from lrdeploy.runtime.inspect import inspect_path


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """One block, hidden 64 (q8_0 fits, K-quants don't): a model, its rtn artifact, and GGUF and ONNX exports."""
    root = tmp_path_factory.mktemp("rel")
    model, _ = narrow_rtn_artifact(root, layers=1)
    export_gguf(str(root / "art"), root / "gguf")
    export_onnx(str(root / "art"), root / "onnx", exact=True)
    return {"model": model, "art": root / "art", "gguf": root / "gguf", "onnx": root / "onnx"}


def _one_line_error(code: int, err: str, needle: str) -> None:
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in err, err


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _cut(path: Path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def _wrong_onnx(folder: Path) -> Path:
    """A valid ONNX model that is not a decoder: one float input x, Identity to logits."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir()
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["logits"])], "wrong",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    return folder


# Each case: (setup(tmp, small) -> args, the words the message must contain). `tmp / "out"` is the output an
# invocation would write: it must not exist afterwards, nor `out.partial`. `tmp / "keep"` is an existing output with
# a file in it: it must come through unchanged.
Case = Callable[[Path, dict], list]


def _gpt2(tmp: Path, s: dict) -> list:
    (tmp / "gpt2").mkdir()
    (tmp / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return ["compress", tmp / "gpt2", "-o", tmp / "out", *CHEAP]


def _text(tmp: Path, content: str) -> Path:
    (tmp / "t.txt").write_text(content)
    return tmp / "t.txt"


def _no_fallback(tmp: Path, s: dict) -> list:
    return ["compress", s["model"], "-o", tmp / "out", "--method", "rtn", "--q-format", "q2_k", "--target", "gguf",
            "--no-fallback", "-q"]


def _broken_source(tmp: Path, s: dict, how: str) -> list:
    m = _copy(s["model"], tmp / "m")
    if how == "truncated":
        _cut(m / WEIGHTS, (m / WEIGHTS).stat().st_size - 100)
    else:
        (m / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"{not json at all}")
    return ["compress", m, "-o", tmp / "out", *CHEAP]


def _art(tmp: Path, s: dict, damage: Callable[[Path], None], cmd: str = "eval") -> list:
    a = _copy(s["art"], tmp / "a")
    damage(a)
    if cmd == "eval":
        return ["eval", a, "--ctx", "32", "--windows", "1", "--device", "cpu", "-q"]
    if cmd == "inspect":
        return ["inspect", a, "--verify"]
    return ["export", a, "--format", cmd, "-o", tmp / "out"]


def _manifest(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(a: Path) -> None:
        m = json.loads((a / MANIFEST).read_text())
        (a / MANIFEST).write_text(json.dumps(edit(m)))
    return damage


def _version(m: dict) -> dict:
    m["version"] = 99
    return m


def _truncated_gguf(tmp: Path, s: dict, cmd: str) -> list:
    g = _copy(s["gguf"], tmp / "g")
    _cut(g / "model.gguf", (g / "model.gguf").stat().st_size - 4096)
    if cmd == "inspect":
        return ["inspect", g / "model.gguf"]
    return ["eval", g, "--backend", "llamacpp", "--ctx", "32", "--windows", "1", "--device", "cpu", "-q"]


CASES: dict[str, tuple[Case, str]] = {
    "missing source": (lambda t, s: ["compress", t / "nope", "-o", t / "out"], "no such file"),
    "missing inspect path": (lambda t, s: ["inspect", t / "nope.gguf"], "no such file or directory"),
    "missing eval text": (lambda t, s: ["eval", s["art"], "--text", t / "nope.txt"], "no such file"),
    "calib is a directory": (lambda t, s: ["compress", s["model"], "-o", t / "out", "--calib", t, *CHEAP],
                             "is not a text file"),
    "not a model directory": (lambda t, s: ["compress", t, "-o", t / "out"], "not a model directory"),
    "unsupported architecture": (_gpt2, "unsupported architecture 'gpt2'"),
    "rank zero": (lambda t, s: ["compress", s["model"], "-o", t / "out", "--method", "lowrank", "--rank", "0"],
                  "--rank must be positive"),
    "rank negative": (lambda t, s: ["compress", s["model"], "-o", t / "out", "--method", "lowrank", "--rank", "-3"],
                      "--rank must be positive"),
    "rank too big": (lambda t, s: ["compress", s["model"], "-o", t / "out", "--method", "lowrank", "--rank", "64"],
                     "is not below min(out, in)"),
    "tensor rank for ldlq": (lambda t, s: ["compress", s["model"], "-o", t / "out", "--method", "ldlq",
                                          "--tensor-rank", "mlp=32"], "method ldlq has no low-rank part"),
    "tensor rank not a number": (lambda t, s: ["compress", s["model"], "-o", t / "out", "--tensor-rank", "mlp=x"],
                                 "--tensor-rank expects NAME=INTEGER, got 'mlp=x'"),
    "tensor ranks differ for gguf": (lambda t, s: ["compress", s["model"], "-o", t / "out", "--rank", "32",
                                                   "--tensor-rank", "mlp=64"], "a GGUF LoRA adapter has one rank"),
    "unknown q-format": (lambda t, s: ["compress", s["model"], "-o", t / "out", "--q-format", "q9_k"],
                         "unknown format 'q9_k'"),
    "unknown lr-format": (lambda t, s: ["compress", s["model"], "-o", t / "out", "--lr-format", "q3_x"],
                          "unknown format 'q3_x' for L and R"),
    "unknown export format": (lambda t, s: ["export", s["art"], "--format", "tflite", "-o", t / "out"],
                              "unknown export format 'tflite'"),
    "k-quant without fallback": (_no_fallback, "--no-fallback forbids falling back"),
    "empty calibration text": (lambda t, s: ["compress", s["model"], "-o", t / "out", "--calib", _text(t, "\n \n"),
                                             *CHEAP], "is empty"),
    "short calibration text": (lambda t, s: ["compress", s["model"], "-o", t / "out", "--calib",
                                             _text(t, "a few words"), *CHEAP], "calibration text is too short"),
    "short eval text": (lambda t, s: ["eval", s["art"], "--text", _text(t, "a few words"), "--ctx", "64", "-q"],
                        "eval text is shorter than one window"),
    "truncated safetensors": (lambda t, s: _broken_source(t, s, "truncated"), "truncated"),
    "corrupt safetensors header": (lambda t, s: _broken_source(t, s, "header"), "corrupt safetensors file"),
    "artifact bytes flipped": (lambda t, s: _art(t, s, lambda a: _flip(a / WEIGHTS, -10)),
                               "does not match its sha256"),
    "artifact truncated": (lambda t, s: _art(t, s, lambda a: _cut(a / WEIGHTS, 1000)), "the manifest records"),
    "manifest missing (eval)": (lambda t, s: _art(t, s, lambda a: (a / MANIFEST).unlink()), "lrdeploy.json is missing"),
    "manifest missing (inspect)": (lambda t, s: _art(t, s, lambda a: (a / MANIFEST).unlink(), "inspect"),
                                   "lrdeploy.json is missing"),
    "manifest invalid json": (lambda t, s: _art(t, s, lambda a: (a / MANIFEST).write_text("{\"format\": ")),
                              "is not valid JSON"),
    "manifest unknown version": (lambda t, s: _art(t, s, _manifest(_version)), "has manifest version 99"),
    "manifest bad files table (export)": (lambda t, s: _art(t, s, _manifest(lambda m: {**m, "files": []}), "gguf"),
                                          "bad 'files' table"),
    "truncated gguf (inspect)": (lambda t, s: _truncated_gguf(t, s, "inspect"), "truncated"),
    "truncated gguf (eval llamacpp)": (lambda t, s: _truncated_gguf(t, s, "eval"), "truncated"),
    "onnx with wrong inputs": (lambda t, s: ["eval", _wrong_onnx(t / "w"), "--backend", "onnxruntime", "--device",
                                             "cpu", "-q"], "is not a decoder with a KV cache: missing input_ids"),
    "compress onto existing output": (lambda t, s: ["compress", s["model"], "-o", t / "keep", *CHEAP],
                                      "already exists; pass --force"),
    "export onto existing output": (lambda t, s: ["export", s["art"], "--format", "gguf", "-o", t / "keep"],
                                    "already exists; pass --force"),
    "onnx export onto existing output": (lambda t, s: ["export", s["art"], "--format", "onnx", "-o", t / "keep"],
                                         "already exists; pass --force"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(name, small, tmp_path, cli):
    setup, needle = CASES[name]
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("finished work")
    before = _snapshot(keep)
    code, _, err = cli(*setup(tmp_path, small))
    _one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert _snapshot(keep) == before


def test_unreadable_calibration_file(small, tmp_path, cli, monkeypatch):
    """Running as root, chmod can't make a file unreadable: make the read itself fail the way it would."""
    calib = _text(tmp_path, "text " * 200)
    real = Path.read_text

    def denied(self: Path, *a, **k) -> str:
        if self == calib:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)
    code, _, err = cli("compress", small["model"], "-o", tmp_path / "out", "--calib", calib, *CHEAP)
    _one_line_error(code, err, "Permission denied")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_force_replaces_outputs_only_when_done(small, tmp_path, cli):
    for fmt in ("gguf", "onnx"):
        out = tmp_path / fmt
        out.mkdir()
        (out / "old.txt").write_text("old")
        code, _, err = cli("export", small["art"], "--format", fmt, "-o", out, "--force")
        assert code == 0, err
        assert not (out / "old.txt").exists() and not out.with_name(fmt + ".partial").exists()


# ---------------------------------------------------------------------------------------------------------------------
# determinism, a full disk, SIGINT


@pytest.fixture(scope="module")
def two_blocks(tmp_path_factory) -> Path:
    from random_model import make_random_model

    return make_random_model(tmp_path_factory.mktemp("two") / "model", layers=2, **NARROW)


@pytest.fixture(scope="module")
def reference(two_blocks, calib_text, tmp_path_factory) -> Path:
    """An uninterrupted ldlq run (student inputs: block 1's H depends on block 0's result), the RESUMABLE options."""
    out = tmp_path_factory.mktemp("ref") / "art"
    o = CompressOptions(method="ldlq", q_format="q8_0", calib=calib_text, calib_range="0:0.02", calib_tokens=512,
                        seq_len=64, device="cpu")
    compress(open_source(str(two_blocks)), o, out)
    return out


def _without_timings(manifest: dict) -> dict:
    m = {k: v for k, v in manifest.items() if k != "timings"}
    m["linears"] = {k: {f: x for f, x in v.items() if f != "seconds"} for k, v in m["linears"].items()}
    return m


def _same_artifact(a: Path, b: Path) -> None:
    """Every file byte-identical; the manifest too, apart from wall-clock timings."""
    sa, sb = _snapshot(a), _snapshot(b)
    assert sorted(sa) == sorted(sb)
    for name in sa:
        if name == MANIFEST:
            assert _without_timings(json.loads(sa[name])) == _without_timings(json.loads(sb[name]))
        else:
            assert sa[name] == sb[name], name


def test_same_seed_same_bytes(reference, two_blocks, calib_text, tmp_path, cli):
    out = tmp_path / "again"
    code, _, err = cli("compress", two_blocks, "-o", out, "--calib", calib_text, *RESUMABLE)
    assert code == 0, err
    _same_artifact(out, reference)


def test_missing_output_parent_promises_no_resume(two_blocks, calib_text, tmp_path, cli):
    """-o under a path that cannot be a directory: one line that says nothing was written, no .partial, no --resume."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, err = cli("compress", two_blocks, "-o", blocker / "sub" / "art", "--calib", calib_text, *RESUMABLE)
    _one_line_error(code, err, "nothing was written")
    assert ".partial" not in err and "--resume" not in err, err
    assert code == 2 and blocker.read_text() == "not a directory"


def test_failure_before_any_layer_says_so(two_blocks, calib_text, tmp_path, cli, monkeypatch):
    """ENOSPC on block 0's shard: no layer had finished, and the message says so rather than 'N finished layers'."""
    import lrdeploy.compressor.rundir as rundir

    def full_disk(path: Path, *a, **k) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(rundir, "save_shard", full_disk)
    out = tmp_path / "art"
    code, _, err = cli("compress", two_blocks, "-o", out, "--calib", calib_text, *RESUMABLE)
    _one_line_error(code, err, "no layer had finished")
    assert "finished layers are kept" not in err, err
    partial = tmp_path / "art.partial"
    assert (str(partial) in err) == partial.is_dir(), err  # named only where it exists


def test_disk_full_keeps_finished_layers_then_resume(reference, two_blocks, calib_text, tmp_path, cli,
                                                     monkeypatch):
    """ENOSPC while writing block 1's shard: a clear line, block 0 kept, the old output untouched, --resume ends."""
    import lrdeploy.compressor.rundir as rundir

    out = tmp_path / "art"
    out.mkdir()
    (out / "old.txt").write_text("the previous artifact")
    real = rundir.save_shard
    calls = []

    def full_disk(path: Path, *a, **k) -> None:
        calls.append(path)
        if len(calls) == 2:
            path.with_name(path.name + ".tmp").write_bytes(b"half a shard")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path.with_name(path.name + ".tmp")))
        real(path, *a, **k)

    monkeypatch.setattr(rundir, "save_shard", full_disk)
    args = ["compress", two_blocks, "-o", out, "--calib", calib_text, *RESUMABLE]
    code, _, err = cli(*args, "--force")
    _one_line_error(code, err, "No space left on device")
    assert "1 finished layers are kept" in err and "--resume" in err and "--force" not in err
    assert (out / "old.txt").read_text() == "the previous artifact"
    partial = tmp_path / "art.partial"
    assert (partial / "layers" / "0000.safetensors").is_file() and not list(partial.rglob("*.tmp"))
    assert json.loads((partial / "state.json").read_text())["layers_done"] == 1

    monkeypatch.setattr(rundir, "save_shard", real)
    code, _, err = cli(*args, "--resume")
    assert code == 0, err
    assert not partial.exists()
    _same_artifact(out, reference)


def test_write_error_in_export_is_one_line_and_keeps_output(small, tmp_path, cli, monkeypatch):
    import lrdeploy.exporters.gguf as gg

    out = tmp_path / "g"
    out.mkdir()
    (out / "old.txt").write_text("old export")

    def full_disk(path: Path, *a, **k) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(gg, "write_gguf", full_disk)
    code, _, err = cli("export", small["art"], "--format", "gguf", "-o", out, "--force")
    _one_line_error(code, err, "No space left on device")
    assert (out / "old.txt").read_text() == "old export" and not (tmp_path / "g.partial").exists()


def test_sigint_prints_resume_and_resume_is_byte_identical(tmp_path, calib_text):
    """A real `lrdeploy compress` gets SIGINT after its first finished block: exit 130, a resume hint, same bytes."""
    from random_model import make_random_model

    model = make_random_model(tmp_path / "m", layers=6, **NARROW)
    args = ["compress", str(model), "--calib", calib_text, *RESUMABLE]
    exe = [sys.executable, "-m", "lrdeploy.cli"]
    subprocess.run(exe + args + ["-o", str(tmp_path / "full")], check=True, capture_output=True)

    out = tmp_path / "cut"
    proc = signal_after_first_block(exe + args + ["-o", str(out)], out, signal.SIGINT)
    state = tmp_path / "cut.partial" / "state.json"
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Resume with: lrdeploy compress" in err and err.strip().endswith("--resume")
    assert not out.exists() and 1 <= json.loads(state.read_text())["layers_done"] < 6

    resumed = subprocess.run(exe + args + ["-o", str(out), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    _same_artifact(out, tmp_path / "full")


def test_sigint_inside_a_tensor_read_is_still_an_interrupt(reference, two_blocks, calib_text, tmp_path, cli,
                                                         monkeypatch):
    """A real SIGINT while block 1's weights are read, which safetensors turns into a TypeError (seen in CI):
    exit 130 with the resume hint, not "cannot read"; block 0 kept; --resume ends byte-identically."""
    import safetensors

    real = safetensors.safe_open
    reads = []

    class InterruptedOpen:
        """The real safe_open; its first read of block 1 gets a real SIGINT, surfacing as the library's own error."""

        def __init__(self, *a, **k) -> None:
            self.f = real(*a, **k)

        def __enter__(self) -> InterruptedOpen:
            self.f.__enter__()
            return self

        def __exit__(self, *exc) -> None:
            self.f.__exit__(*exc)

        def get_tensor(self, name: str):
            if name.startswith("model.layers.1.") and not reads:
                reads.append(name)
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)  # the handler raises KeyboardInterrupt long before this ends
                except KeyboardInterrupt:
                    why = "could not determine the shape of object type 'torch.storage.UntypedStorage'"
                    raise TypeError(why) from None
            return self.f.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", InterruptedOpen)
    out = tmp_path / "art"
    args = ["compress", two_blocks, "-o", out, "--calib", calib_text, *RESUMABLE]
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background runner may ignore SIGINT
    try:
        code, _, err = cli(*args)
    finally:
        signal.signal(signal.SIGINT, before)
    assert reads and code == 130, err
    assert "cannot read" not in err and "Resume with: lrdeploy compress" in err
    from lrdeploy import errors

    assert not errors._sigint_seen  # forgotten once the command ends: a later error stays that error
    assert json.loads((tmp_path / "art.partial" / "state.json").read_text())["layers_done"] == 1

    monkeypatch.setattr(safetensors, "safe_open", real)
    code, _, err = cli(*args, "--resume")
    assert code == 0, err
    _same_artifact(out, reference)


def test_stopped_while_finishing_resumes(small, calib_text, tmp_path):
    """Killed after the manifest is written but before the rename: --resume just completes the move."""
    import lrdeploy.compressor.rundir as rundir

    o = CompressOptions(method="rtn", q_format="q8_0", calib=calib_text, calib_range="0:0.02", calib_tokens=256,
                        seq_len=64, device="cpu")
    src = open_source(str(small["model"]))
    real = rundir.replace_dir

    def killed(tmp: Path, out: Path) -> None:
        raise KeyboardInterrupt

    rundir.replace_dir = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            compress(src, o, tmp_path / "a")
    finally:
        rundir.replace_dir = real
    assert (tmp_path / "a.partial" / MANIFEST).is_file()
    result = compress(src, o, tmp_path / "a", resume=True)
    assert result.manifest["files"][WEIGHTS]["sha256"] and read_manifest(tmp_path / "a")


# ---------------------------------------------------------------------------------------------------------------------
# integrity


def test_inspect_verify_checks_digests(small, tmp_path, cli):
    code, stdout, err = cli("inspect", small["art"], "--verify", "--json")
    assert code == 0, err
    assert json.loads(stdout)["verified"] == [WEIGHTS]
    bad = _copy(small["art"], tmp_path / "bad")
    _flip(bad / WEIGHTS, (bad / WEIGHTS).stat().st_size // 2)
    code, _, err = cli("inspect", bad)  # without --verify only the header is read
    assert code == 0, err
    code, _, err = cli("inspect", bad, "--verify")
    _one_line_error(code, err, f"{bad / WEIGHTS} does not match its sha256")
    code, _, err = cli("export", bad, "--format", "onnx", "-o", tmp_path / "o")
    _one_line_error(code, err, "does not match its sha256")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_inspect_onnx(small, cli):
    code, stdout, err = cli("inspect", small["onnx"], "--verify", "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["kind"] == "onnx export" and info["verified"] == ["model.onnx"] and info["tensor_count"] > 0
    types = {r["type"] for r in info["tensors"]}
    assert "uint8" in types  # MatMulNBits blocks
    assert info["bytes"] <= info["file_bytes"]
    # the file's own linear bpw, from the graph: q8_0 as 8-bit MatMulNBits codes and an fp32 scale per 32 weights
    # (the op's default zero point) = 8 + 1, not the artifact's 8.5
    assert info["bpw_linears_from"] == "tensors" and info["bpw_linears"] == pytest.approx(9.0)


# ---------------------------------------------------------------------------------------------------------------------
# fuzzing

FUZZ = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=20)


@FUZZ
@given(JSON)
def test_fuzz_manifest_random_json(value):
    try:
        validate_manifest(value)
    except LrdError:
        pass


def _mutations() -> st.SearchStrategy:
    """Paths into a real manifest and what to put there (JSON, deletion) or how to damage its text."""
    return st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["set", "delete"]), JSON), min_size=1,
                    max_size=4)


def _walk(doc: object, pick: int) -> tuple[object, object] | None:
    """A (container, key) inside DOC chosen by PICK, so every level of a real manifest gets mutated."""
    spots: list[tuple[object, object]] = []

    def visit(node: object) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            spots.append((node, k))
            visit(v)

    visit(doc)
    return spots[pick % len(spots)] if spots else None


@FUZZ
@given(muts=_mutations(), cut=st.none() | st.integers(0, 4000), flip=st.none() | st.integers(0, 4000))
def test_fuzz_manifest_mutations(small, muts, cut, flip):
    doc = json.loads((small["art"] / MANIFEST).read_text())
    for pick, op, value in muts:
        spot = _walk(doc, pick)
        if spot is None:
            break
        node, key = spot
        if op == "delete" and isinstance(node, dict):
            del node[key]
        else:
            node[key] = value
    raw = json.dumps(doc).encode()
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    if flip is not None and raw:
        b = bytearray(raw)
        b[flip % len(b)] ^= 0x80
        raw = bytes(b)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / MANIFEST).write_bytes(raw)
        try:
            read_manifest(Path(d))
        except LrdError:
            pass


def _mutated_copy(data: bytes, flips: list[tuple[int, int]], cut: int | None, region: int, folder: Path,
                  name: str) -> Path:
    """DATA with byte flips in its first REGION bytes (where the parsers look) and an optional truncation."""
    b = bytearray(data[:region])
    for at, x in flips:
        b[at % region] ^= x or 1
    path = folder / name
    with open(path, "wb") as f:
        f.write(b)
        f.write(data[region:])
    if cut is not None:
        _cut(path, cut % (len(data) + 1))
    return path


@pytest.fixture(scope="module")
def gguf_bytes(small) -> bytes:
    return (small["gguf"] / "model.gguf").read_bytes()


@pytest.fixture(scope="module")
def onnx_bytes(small) -> bytes:
    return (small["onnx"] / "model.onnx").read_bytes()


FLIPS = st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), max_size=6)


@FUZZ
@given(flips=FLIPS, cut=st.none() | st.integers(0, 10**9), early=st.booleans())
def test_fuzz_inspect_gguf(gguf_bytes, flips, cut, early):
    """Flips land in the fixed header (first 64 bytes) or anywhere in the metadata and tensor index."""
    region = 64 if early else min(len(gguf_bytes), 1 << 21)
    with tempfile.TemporaryDirectory() as d:
        path = _mutated_copy(gguf_bytes, flips, cut, region, Path(d), "model.gguf")
        try:
            info = inspect_path(path)
            assert info["tensor_count"] == len(info["tensors"])  # a file that reads lists every tensor it declares
        except LrdError as e:
            assert str(path) in str(e)


@FUZZ
@given(flips=FLIPS, cut=st.none() | st.integers(0, 10**9), verify=st.booleans(), whole=st.booleans())
def test_fuzz_inspect_onnx(onnx_bytes, flips, cut, verify, whole):
    """Flips land anywhere in the file or in its first 4 KiB (the graph's header and first nodes)."""
    region = len(onnx_bytes) if whole else min(len(onnx_bytes), 4096)
    with tempfile.TemporaryDirectory() as d:
        path = _mutated_copy(onnx_bytes, flips, cut, region, Path(d), "model.onnx")
        try:
            inspect_path(path, verify=verify)
        except LrdError as e:
            assert str(path) in str(e)
