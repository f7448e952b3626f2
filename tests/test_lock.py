"""One run per output: OUT.lock holds the writer's pid, a second run is refused, a dead run's lock is taken over.

Also: a compress prints nothing on stderr but lrdeploy's own lines (no library warnings).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CHEAP, NARROW, RESUMABLE, narrow_rtn_artifact
from interrupt import signal_after_first_block

from lrdeploy.artifact import read_manifest
from lrdeploy.compressor.driver import CompressOptions, compress
from lrdeploy.compressor.sources import open_source
from lrdeploy.errors import LrdError
from lrdeploy.io import lock_path, output_lock

EXE = [sys.executable, "-m", "lrdeploy.cli"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """Two narrow blocks (rtn takes a few seconds) and their rtn artifact."""
    model, art = narrow_rtn_artifact(tmp_path_factory.mktemp("lock"), layers=2)
    return {"model": model, "art": art}


def _refused(code: int, err: str, out: Path, pid: int) -> None:
    assert code == 2, err
    assert err.strip() == (f"error: {out} is being written by another lrdeploy run (pid {pid}); "
                           "wait for it or stop it"), err


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_second_compress_is_refused_while_a_real_run_writes(tmp_path, calib_text, cli):
    """A real `lrdeploy compress`, frozen after its first block: a second run (even --force) is refused and leaves
    its OUT.partial alone; Ctrl-C then ends the first run and frees the lock, and --resume finishes the artifact."""
    from random_model import make_random_model

    # 12 blocks of 2048 calibration tokens: a block takes ~0.25 s, so the run is still seconds from its end when it
    # is stopped, however late the poll sees its first block (6 blocks of 512 tokens finished in 0.5 s, and a busy
    # machine once let the whole run end before the stop)
    model = make_random_model(tmp_path / "m", layers=12, **NARROW)
    out = tmp_path / "cc"
    resumable = [a if a != "512" else "2048" for a in RESUMABLE]
    assert resumable[resumable.index("--calib-tokens") + 1] == "2048"
    args = ["compress", str(model), "-o", str(out), "--calib", calib_text, *resumable]
    proc = signal_after_first_block(EXE + args, out, signal.SIGSTOP)
    try:
        assert lock_path(out).read_text() == f"{proc.pid}\n"
        assert json.loads((tmp_path / "cc.partial" / "state.json").read_text())["layers_done"] < 12
        before = _snapshot(tmp_path / "cc.partial")
        for extra in ("--force", "--resume"):
            code, _, err = cli(*args, extra)
            _refused(code, err, out, proc.pid)
        assert _snapshot(tmp_path / "cc.partial") == before
        assert lock_path(out).read_text() == f"{proc.pid}\n"
        # resume it, then Ctrl-C it while it runs, as test_reliability's resume tests do: a SIGINT left pending on a
        # stopped process was lost twice in full-suite runs (the run went on to exit 0), never when running
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert _names(tmp_path) == ["cc.partial", "m"]  # the lock went with the interrupted run
    code, _, err = cli(*args, "--resume")
    assert code == 0, err
    assert _names(tmp_path) == ["cc", "m"]
    assert json.loads((out / "lrdeploy.json").read_text())["summary"]["linears"] == 12 * 7


def test_lock_held_in_process_refuses_compress(small, tmp_path, cli):
    out = tmp_path / "art"
    with output_lock(out) as lock:
        assert lock == tmp_path / "art.lock" and lock.read_text() == f"{os.getpid()}\n"
        code, _, err = cli("compress", small["model"], "-o", out, *CHEAP, "--force")
        _refused(code, err, out, os.getpid())
        assert lock.is_file() and not out.exists() and not (tmp_path / "art.partial").exists()
    assert _names(tmp_path) == []


@pytest.mark.parametrize("content", ["dead", "", "12ab\x00\n", "0\n", "-1\n"])
def test_stale_lock_is_taken_over(small, tmp_path, cli, content):
    """A lock whose process has exited, or that holds no pid (a crash mid-write), does not block the next run."""
    out = tmp_path / "art"
    lock_path(out).write_text(f"{_dead_pid()}\n" if content == "dead" else content)
    code, _, err = cli("compress", small["model"], "-o", out, *CHEAP)
    assert code == 0, err
    assert _names(tmp_path) == ["art"] and read_manifest(out)


def test_lock_of_a_live_process_is_kept(small, tmp_path, cli):
    """A lock naming a live process that is not this one (here a sleeping child) refuses the run."""
    out = tmp_path / "art"
    child = subprocess.Popen(["sleep", "60"])
    try:
        lock_path(out).write_text(f"{child.pid}\n")
        code, _, err = cli("compress", small["model"], "-o", out, *CHEAP)
        _refused(code, err, out, child.pid)
        assert lock_path(out).read_text() == f"{child.pid}\n"
    finally:
        child.kill()
        child.wait()
    code, _, err = cli("compress", small["model"], "-o", out, *CHEAP)  # the child is gone: its lock is stale
    assert code == 0, err


def test_lock_released_on_every_exit(small, calib_text, tmp_path, monkeypatch):
    """Success, an LrdError, Ctrl-C (KeyboardInterrupt) and a failed write each leave no lock behind."""
    import lrdeploy.compressor.rundir as rundir

    model = open_source(str(small["model"]))
    o = CompressOptions(method="rtn", q_format="q8_0", calib=calib_text, calib_range="0:0.02", calib_tokens=256,
                        seq_len=64, device="cpu")
    out = tmp_path / "art"
    compress(model, o, out)
    assert _names(tmp_path) == ["art"]
    with pytest.raises(LrdError, match="already exists"):
        compress(model, o, out)
    assert _names(tmp_path) == ["art"]
    with pytest.raises(KeyboardInterrupt):
        compress(model, o, out, force=True, stop_after=1)
    assert _names(tmp_path) == ["art", "art.partial"]

    def full_disk(path: Path, *a, **k) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(rundir, "save_shard", full_disk)
    with pytest.raises(OSError):
        compress(model, o, out, resume=True)
    assert _names(tmp_path) == ["art", "art.partial"]
    monkeypatch.undo()
    compress(model, o, out, resume=True)
    assert _names(tmp_path) == ["art"]


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_export_is_locked(small, tmp_path, cli, fmt):
    """A held lock refuses an export (its --force cannot remove the first one's OUT.partial); a stale one does not;
    the lock is gone after a refused, a failed and a finished export."""
    out = tmp_path / fmt
    partial = tmp_path / f"{fmt}.partial"
    with output_lock(out):
        partial.mkdir()
        (partial / "half.bin").write_bytes(b"the first export's work")
        code, _, err = cli("export", small["art"], "--format", fmt, "-o", out, "--force")
        _refused(code, err, out, os.getpid())
        assert _snapshot(partial) == {"half.bin": b"the first export's work"} and not out.exists()
    lock_path(out).write_text(f"{_dead_pid()}\n")
    code, _, err = cli("export", small["art"], "--format", fmt, "-o", out, "--force")
    assert code == 0, err
    assert _names(tmp_path) == [fmt]
    code, _, err = cli("export", small["art"], "--format", fmt, "-o", out)
    assert code == 2 and "already exists" in err
    assert _names(tmp_path) == [fmt]


_TAKER = """
import os, sys, time
from pathlib import Path
from lrdeploy.errors import LrdError
from lrdeploy.io import output_lock
out, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
try:
    with output_lock(out):
        print("won", flush=True)
        time.sleep(2.0)
except LrdError as e:
    print("refused", e)
"""


def test_racing_takeovers_of_one_stale_lock_have_one_winner(tmp_path):
    """Eight processes find the same dead run's lock at the same moment: exactly one takes it over."""
    out = tmp_path / "art"
    lock_path(out).write_text(f"{_dead_pid()}\n")
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _TAKER, str(out), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    time.sleep(1.0)  # let every child import and reach the start line
    go.touch()
    results = {p.pid: p.communicate(timeout=60) for p in procs}
    assert all(p.returncode == 0 for p in procs), results
    winners = [pid for pid, (stdout, _) in results.items() if stdout.startswith("won")]
    assert len(winners) == 1, results
    for pid, (stdout, _) in results.items():
        if pid != winners[0]:
            assert stdout.strip() == (f"refused {out} is being written by another lrdeploy run (pid {winners[0]}); "
                                      "wait for it or stop it"), results
    assert _names(tmp_path) == ["go"]


def test_compress_prints_no_library_warnings(small, tmp_path):
    """A real `lrdeploy compress` (no pytest warning filters in the child) writes nothing to stderr: no library
    warning such as transformers' FutureWarning for create_causal_mask's old `past_key_values` keyword."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    out = tmp_path / "art"
    res = subprocess.run(EXE + ["compress", str(small["model"]), "-o", str(out), "--calib-tokens", "256", "--seq-len",
                                "128", "--iters", "1", "--lplr-iters", "1", "--rank", "16", "--lr-format", "f16",
                                "--device", "cpu"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr and res.stderr.strip() == "", res.stderr  # the progress bar leaves no line
