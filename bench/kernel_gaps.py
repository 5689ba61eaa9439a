"""Where a decode step's time outside offload_moe's kernels goes, without the profiler.

    python bench/kernel_gaps.py --shape qwen3-30b-a3b           # side_by_side's hqq4 model folder
    ATEN_CPU_CAPABILITY=avx2 python bench/kernel_gaps.py --shape qwen3-30b-a3b

Greedy decode steps as bench/profile_decode.py runs them, with every call into offload_moe's C
kernels (TIMED below) timed by a wrapper around the loaded libraries: this script's
instrumentation, installed after loading, nothing the package does. Per position in the step
(kernel call i), the median gap before it and its median duration are printed, then the step's
time outside matmul kernels (wall time minus the matmul calls, as profile_decode counts it:
decode_attention, which runs the output projection too, is a matmul kernel, its time printed on
its own; rms_norm16, rope16 and route_topk are overhead; a router's
torch matmul, where a router is not swapped, counts as overhead too) and the step. The profiler charges its own
per-op cost to the gaps; this does not, so the two scripts bracket the true figure.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import defaultdict

import torch
from machine import machine_line  # bench/machine.py (scripts run as python bench/<name>.py)
from moe_shapes import OFFLOAD_DTYPE, add_model_args, build_all

import offload_moe
from offload_moe.quant import dense_kernel, moe_kernel

# as profile_decode counts them: decode_attention (q . K, p . V and the output projection in one call)
# a matmul kernel
MATMULS = ("dense16_gemv", "dense16_gemv_many", "moe_experts", "moe_experts_topk", "q8_gemv", "decode_attention")
TIMED = (*MATMULS, "rms_norm16", "route_topk", "rope16")


class TimedLibrary:
    """A loaded kernel library whose TIMED entry points append (name, start, end) to `log`."""

    def __init__(self, lib, log: list[tuple[str, float, float]]):
        self._lib, self._log = lib, log

    def __getattr__(self, name: str):
        entry = getattr(self._lib, name)
        if name not in TIMED:
            return entry

        def timed(*args):
            start = time.perf_counter()
            status = entry(*args)
            self._log.append((name, start, time.perf_counter()))
            return status

        return timed


def timed_steps(llm, steps: int, log: list) -> list[tuple[float, float, list]]:
    """(start, end, that step's kernel calls) of `steps` greedy steps after a 16-token prompt and 5 warm-up steps."""
    ids = torch.randint(3, llm.model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    out, found = llm.model(ids, use_cache=True), []
    for i in range(steps + 5):
        log.clear()
        start = time.perf_counter()
        token = out.logits[:, -1:].float().argmax(-1)  # generate()'s scores are fp32
        out = llm.model(token, cache=out.cache, use_cache=True, logits_to_keep=1)
        if i >= 5:
            found.append((start, time.perf_counter(), list(log)))
    return found


def report(found: list[tuple[float, float, list]], rows: int) -> None:
    gaps, durations = defaultdict(list), defaultdict(list)
    for start, end, calls in found:
        previous = start
        for i, (_, a, b) in enumerate(calls):
            gaps[i].append(a - previous)
            durations[i].append(b - a)
            previous = b
        gaps[len(calls)].append(end - previous)
    names = [name for name, _, _ in found[0][2]] + ["(end of step)"]
    for i in [*range(min(rows, len(names) - 1)), len(names) - 1]:
        duration = statistics.median(durations[i]) * 1e6 if i in durations else 0.0
        print(f"{i:3d} {names[i]:14s} gap before {statistics.median(gaps[i]) * 1e6:8.1f} us   call {duration:8.1f} us")
    total = [end - start - sum(b - a for name, a, b in calls if name in MATMULS) for start, end, calls in found]
    wall = [end - start for start, end, _ in found]
    print(f"per step outside matmul kernels (gaps, norm and top-k calls): {statistics.median(total) * 1e3:.2f} ms "
          f"of {statistics.median(wall) * 1e3:.1f} ms "
          f"({100 * statistics.median(total) / statistics.median(wall):.1f}%; medians of {len(found)} steps)")
    attention = [sum(b - a for name, a, b in calls if name == "decode_attention") for _, _, calls in found]
    if any(attention):
        print(f"  of the matmul kernels, decode_attention (attention and the output projection): "
              f"{statistics.median(attention) * 1e3:.2f} ms per step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, default_shape="qwen3-30b-a3b")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rows", type=int, default=16, help="kernel calls listed (the first ones of a step)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(machine_line())
    llm = offload_moe.load(build_all(args).hqq4, device="cpu", dtype=OFFLOAD_DTYPE, progress=False)
    log: list = []
    dense, fused = dense_kernel.load_kernel(), moe_kernel.load_kernel()
    dense_kernel.load_kernel = lambda: TimedLibrary(dense, log)  # this script's instrumentation only
    moe_kernel.load_kernel = lambda: TimedLibrary(fused, log)
    with torch.inference_mode():
        found = timed_steps(llm, args.steps, log)
    report(found, args.rows)


if __name__ == "__main__":
    main()
