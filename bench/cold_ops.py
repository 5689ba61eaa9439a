"""What a few small ops of a decode step cost warm, and right after a weight stream.

    python bench/cold_ops.py
    ATEN_CPU_CAPABILITY=avx2 python bench/cold_ops.py

Between two kernel calls of a CPU decode step there are torch ops and Python lines that cost
microseconds when run in a loop, but each runs right after dense16_gemv has streamed a weight
matrix through the caches. Per op: the median time run back to back (warm), and run right after
dense16_gemv over one of 8 distinct 16 MB fp16 matrices (a Qwen3-30B-A3B q_proj each, 128 MB
in turn: cold). Also the step's own token pick as generate() makes it (fp32 cast and argmax over
a 151936-entry vocabulary) against amax over the same logits.
"""

from __future__ import annotations

import statistics
import time

import torch
from machine import machine_line  # bench/machine.py (scripts run as python bench/<name>.py)

from offload_moe.quant import dense_kernel

ROUNDS = 300


def median_us(op, before=None) -> float:
    times = []
    for i in range(ROUNDS):
        if before is not None:
            before(i)
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    print(machine_line())
    if not dense_kernel.available():
        raise SystemExit("offload_moe's dense CPU kernel does not run here")
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(4096, 2048, generator=gen).half() for _ in range(8)]
    x = torch.randn(1, 1, 2048, generator=gen).half()
    small = torch.randn(1, 1, 4096, generator=gen).half()
    logits = torch.randn(1, 1, 151936, generator=gen).half()
    stream = lambda i: dense_kernel.dense16_gemv(x, weights[i % len(weights)], out_dtype=torch.float16)
    ops = {
        "view + transpose + mul (attention's q)": lambda: small.view(1, 1, 32, 128).transpose(1, 2) * 2,
        "add (a residual)": lambda: small + small,
        "dense16_gemv, k_proj-sized [512x2048]": lambda: dense_kernel.dense16_gemv(x, weights[0][:512],
                                                                                  out_dtype=torch.float16),
    }
    print("| op | warm us | after a 16 MB stream us |\n|---|---|---|")
    for name, op in ops.items():
        print(f"| {name} | {median_us(op):.1f} | {median_us(op, stream):.1f} |")
    print(f"| fp32 cast + argmax of 151936 logits | {median_us(lambda: logits[:, -1:].float().argmax(-1)):.1f} | |")
    wide = logits.float()
    print(f"| argmax of 151936 fp32 logits | {median_us(lambda: wide.argmax(-1)):.1f} | |")
    print(f"| amax of 151936 fp32 logits | {median_us(lambda: wide.amax(-1)):.1f} | |")


if __name__ == "__main__":
    main()
