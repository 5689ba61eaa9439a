"""Batch-1 matrix-vector products per dtype on this CPU: why offload_moe offers fp16 non-expert
weights on CPUs whose bf16 matmul is slow (attention, router and lm_head are dense matmuls).

    python bench/dense_gemv.py [--rows 32000] [--cols 4096] [--repeats 20]
    python bench/dense_gemv.py --kernels [--tokens 1 256] [--repeats 10] [--no-lm-head-prefill]
    ATEN_CPU_CAPABILITY=avx2 python bench/dense_gemv.py --kernels   # torch and the kernel as on AVX2

Without --kernels: per dtype, the median time of `F.linear(x [1, cols], W [rows, cols])` and the
weight bytes read per second; fp32 doubles the bytes of the 16-bit types, so it is the baseline.

--kernels: offload_moe's CPU linear (offload_moe.quant.cpu_linear.CpuLinear: the dense kernel for
few tokens, fp32 tiles or torch above the measured switch) against torch's F.linear, fp16 and
bf16, on the matrices of a Qwen3-30B-A3B decode step (q 2048->4096, k/v 2048->512, o 4096->2048,
lm_head 2048->151936), engines alternated, median of --repeats: GB/s of weights at 1 token,
GFLOP/s at many. The kernel's variant follows torch's capability (ATEN_CPU_CAPABILITY).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from machine import machine_line  # bench/machine.py

from offload_moe.quant import dense_kernel
from offload_moe.quant.cpu_linear import CpuLinear
from offload_moe.quant.dense_matmul import Workspace
from offload_moe.quant.dense_switch import switch_for

QWEN_SHAPES = {"q_proj": (4096, 2048), "k_proj/v_proj": (512, 2048), "o_proj": (2048, 4096),
               "lm_head": (151936, 2048)}  # [out, in]


def _median_seconds(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):  # engines round-robin, so load changes hit all alike
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def kernels(tokens: list[int], repeats: int, lm_head_prefill: bool) -> None:
    print(f"{machine_line()}  torch capability {torch.backends.cpu.get_cpu_capability()}, "
          f"kernel variant {dense_kernel.variant()}, threads {torch.get_num_threads()}")
    print("| matrix | dtype | T | switch | torch | offload_moe | speed-up |\n|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        switch = switch_for(str(dtype).removeprefix("torch."))
        for name, (rows, cols) in QWEN_SHAPES.items():
            linear = torch.nn.Linear(cols, rows, bias=False, dtype=dtype, device="meta")
            linear.weight = torch.nn.Parameter(torch.randn(rows, cols, generator=gen).to(dtype), requires_grad=False)
            fast = CpuLinear(linear, Workspace())
            for t in tokens:
                if t > 8 and name == "lm_head" and not lm_head_prefill:
                    continue
                x = torch.randn(t, cols, generator=gen).to(dtype)
                with torch.no_grad():
                    secs = _median_seconds({"torch": lambda: F.linear(x, linear.weight), "ours": lambda: fast(x)},
                                           repeats if t <= 8 else max(2, repeats // 4))
                if t == 1:
                    unit, rate = "GB/s", {k: rows * cols * 2 / v / 1e9 for k, v in secs.items()}
                else:
                    unit, rate = "GFLOP/s", {k: 2 * t * rows * cols / v / 1e9 for k, v in secs.items()}
                print(f"| {name} [{rows}x{cols}] | {str(dtype).removeprefix('torch.')} | {t} | "
                      f"{switch.gemv_max_tokens}/{'native' if switch.native_prefill else 'tiles'} | "
                      f"{rate['torch']:.1f} {unit} | {rate['ours']:.1f} {unit} | {secs['torch'] / secs['ours']:.2f}x |",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32000)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kernels", action="store_true", help="offload_moe's CPU linear vs torch on Qwen shapes")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 256], help="with --kernels")
    parser.add_argument("--no-lm-head-prefill", action="store_true", help="with --kernels: lm_head at 1 token only")
    args = parser.parse_args()
    if args.kernels:
        kernels(args.tokens, args.repeats, not args.no_lm_head_prefill)
        return
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
