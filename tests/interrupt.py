"""Stop a real `lrdeploy compress` child once its first block is finished: the shared step of the resume tests."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path


def signal_after_first_block(cmd: list[str], out: Path, sig: int) -> subprocess.Popen:
    """Start CMD (a compress writing OUT), send SIG once OUT.partial records a finished block; returns the process.

    The child gets SIGINT's default disposition, unblocked: a runner that starts the tests in the background leaves
    SIGINT ignored, and an ignored or blocked signal survives exec, so Python would never raise KeyboardInterrupt.
    """

    def deliverable() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=deliverable)
    state = out.with_name(out.name + ".partial") / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if state.exists() and json.loads(state.read_text())["layers_done"] >= 1:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(sig)
    return proc
