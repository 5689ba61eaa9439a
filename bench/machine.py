"""The machine line every benchmark prints first (RESULTS.md records it with each run)."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (what `lscpu` shows as "Model name")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line() -> str:
    """Date, nproc, torch threads, CPU model, SIMD level and torch version, on one line."""
    return (
        f"{datetime.datetime.now().isoformat(timespec='seconds')}  nproc={os.cpu_count()}  "
        f"threads={torch.get_num_threads()}  cpu={cpu_model()!r}  "
        f"isa={torch.backends.cpu.get_cpu_capability()}  torch={torch.__version__}"
    )
