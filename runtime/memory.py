"""Memory probes for one measured process: RSS now, its high-water mark and how to restart it, CUDA's peak."""

from __future__ import annotations

import sys
from pathlib import Path


def reset_peak() -> None:
    """Restart the RSS high-water mark (Linux: VmHWM), so the next peak belongs to what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def rss_peak() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def gpu_peak(runner) -> int | None:
    if getattr(runner, "device", None) is not None and str(runner.device).startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    return None
