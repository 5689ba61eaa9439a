"""The machine line every benchmark prints first (RESULTS.md records it with each run)."""

from __future__ import annotations

import datetime
import os

import torch

from offload_moe.quant.native import cpu_model  # re-exported: the benchmarks import it from here


def machine_line() -> str:
    """Date, nproc, torch threads, CPU model, SIMD level and torch version, on one line."""
    return (
        f"{datetime.datetime.now().isoformat(timespec='seconds')}  nproc={os.cpu_count()}  "
        f"threads={torch.get_num_threads()}  cpu={cpu_model()!r}  "
        f"isa={torch.backends.cpu.get_cpu_capability()}  torch={torch.__version__}"
    )
