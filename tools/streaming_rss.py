"""Peak memory must not grow with depth: compress random 8- and 32-layer models of the same width, compare RSS.

    .venv/bin/python tools/streaming_rss.py [--hidden 1024 --ffn 2816 --method rtn]

Each model is written as one safetensors shard per block (like a large hub checkpoint), then compressed by
`lrdeploy compress` in a child process whose peak RSS (ru_maxrss from wait4) is read when it exits. This parent
never imports torch: Linux carries the parent's high-water mark into a vfork+exec child's ru_maxrss. Exits
non-zero when the 32-layer peak exceeds 1.3x the 8-layer one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RANDOM_MODEL = Path(__file__).resolve().parents[1] / "tests" / "random_model.py"


def peak_rss_mib(cmd: list[str]) -> float:
    """Run CMD and return its peak resident set size in MiB, as the kernel accounted it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--method", default="rtn")
    p.add_argument("--layers", default="8,32")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lrd-rss-"))
    rows = []
    try:
        for n in map(int, a.layers.split(",")):
            model = work / f"m{n}"
            subprocess.run([sys.executable, str(RANDOM_MODEL), str(model), "--hidden", str(a.hidden),
                            "--layers", str(n), "--ffn", str(a.ffn), "--heads", str(a.heads), "--kv-heads",
                            str(a.heads), "--shard-layers"], check=True, capture_output=True)
            size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
            cmd = [sys.executable, "-m", "lrdeploy.cli", "compress", str(model), "-o", str(work / f"o{n}"),
                   "--method", a.method, "--calib-tokens", "2048", "--seq-len", "256", "--device", "cpu", "-q"]
            rss = peak_rss_mib(cmd)
            rows.append((n, size, rss))
            print(f"{n:3d} layers  weights {size:8.0f} MiB  peak RSS {rss:8.0f} MiB", flush=True)
            shutil.rmtree(model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = rows[-1][2] / rows[0][2]
    print(f"peak RSS ratio {rows[-1][0]} vs {rows[0][0]} layers: {ratio:.3f} (limit 1.3; weights ratio "
          f"{rows[-1][1] / rows[0][1]:.2f})")
    sys.exit(0 if ratio <= 1.3 else 1)


if __name__ == "__main__":
    main()
