"""Batch-1 matrix-vector products per dtype on this CPU: why offload_moe offers fp16 non-expert
weights on CPUs whose bf16 matmul is slow (attention, router and lm_head are dense matmuls).

    python bench/dense_gemv.py [--rows 32000] [--cols 4096] [--repeats 20]

Prints, per dtype, the median time of `F.linear(x [1, cols], W [rows, cols])` and the weight
bytes read per second; fp32 doubles the bytes of the 16-bit types, so it is the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from machine import machine_line  # bench/machine.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32000)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"{machine_line()}  W [{args.rows}, {args.cols}]")
    weight = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, args.cols)
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    weights = {dtype: weight.to(dtype) for dtype in times}
    inputs = {dtype: x.to(dtype) for dtype in times}
    for _ in range(3):
        for dtype in times:
            F.linear(inputs[dtype], weights[dtype])
    for _ in range(args.repeats):  # dtypes round-robin, so load changes hit all alike
        for dtype in times:
            start = time.perf_counter()
            F.linear(inputs[dtype], weights[dtype])
            times[dtype].append(time.perf_counter() - start)
    base = statistics.median(times[torch.float32])
    print("| dtype | ms | GB/s of weights | speed vs fp32 |\n|---|---|---|---|")
    for dtype, ts in times.items():
        t = statistics.median(ts)
        gbs = weights[dtype].numel() * weights[dtype].element_size() / t / 1e9
        print(f"| {str(dtype).removeprefix('torch.')} | {t * 1e3:.1f} | {gbs:.1f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
