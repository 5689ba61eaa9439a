"""Expert-matrix kernels on the CPU: time per matmul, weight GB/s, against bf16 and memcpy.

One Mixtral-sized expert matrix (out 14336, in 4096) at batch 1 and 8, in each format:
bf16 dense (F.linear), hqq4/hqq3/hqq2g64 through torch's int4 kernel and through offload_moe's
own int8-activation kernel (offload_moe.quant.int4_gemv, where it runs), hqq2 (group 16) through
both with expanded groups and, for comparison, by dequantize-then-matmul, nf4 by
dequantize-then-matmul (and bitsandbytes' own, if installed). Next to every format, a plain
`copy_` of the same number of bytes, timed in the same rounds, is the bandwidth reference.

Every configuration cycles through enough copies of its weights (> 8x the 32 MiB L3 here) that
each call reads them from DRAM, as an expert miss would. Configurations are timed round-robin so
that load from other processes hits all of them alike; the table shows medians. Then the time
to quantize (round-to-nearest and HQQ's optimiser) and to re-lay one matrix.

    python bench/kernels.py              # ~2-4 minutes on 2 cores
    python bench/kernels.py --no-hqq     # skip the (slow, 10-40 s) HQQ optimiser timing
    ATEN_CPU_CAPABILITY=avx2 python bench/kernels.py --no-hqq   # torch's and our kernel as on an AVX2-only CPU

`--prefill` times the many-token case instead (default batches 16, 32, 64, 128, 256): bf16
dense against the int4 kernels (torch's and offload_moe's own) and against the prefill path (dequantize the prepared weights
once per call, then a dense matmul), for hqq4 (hqq3 and hqq2g64 run the same code) and hqq2
(expanded groups); quant.matmul measures its prefill thresholds the same way at first use.

    python bench/kernels.py --prefill --no-hqq --seconds 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from machine import machine_line  # bench/machine.py, imported before this folder leaves sys.path

# This file is called kernels.py and Python puts its folder first on sys.path, where it would
# shadow the `kernels` package that bitsandbytes tries to import. Take the folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch
import torch.nn.functional as F

from offload_moe.quant.quantize import QTensor, dequantize, pack, quantize
from offload_moe.quant.formats import parse_format
from offload_moe.quant import int4_gemv
from offload_moe.quant.matmul import (
    cpu_int4_block_n, dequant_linear, int4_cpu_linear, int8_cpu_linear, linear, prefill_linear, prepare_for_cpu,
)
from offload_moe.quant.formats import FormatKind

OUT, IN = 14336, 4096
ROTATE_BYTES = 256 * 2**20  # cycle through at least this many bytes of weight copies


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def random_qtensor(name: str, gen: torch.Generator) -> QTensor:
    """Random codes and plausible parameters: kernel speed does not depend on the values."""
    fmt = parse_format(name)
    codes = torch.randint(0, 2**fmt.bits, (OUT, IN), generator=gen, dtype=torch.uint8)
    groups = IN // fmt.group_size
    scale = (torch.rand(OUT, groups, generator=gen) * 2e-3 + 1e-3).half()
    if fmt.kind is FormatKind.NF4:
        return QTensor(fmt, (OUT, IN), codes, scale.float() * 8)
    zero = (torch.rand(OUT, groups, generator=gen) * fmt.max_code).half()
    return QTensor(fmt, (OUT, IN), codes, scale, zero)


class Config:
    """One timed thing: `call(i)` uses the i-th weight copy; `weight_bytes` read per call."""

    def __init__(self, label: str, weight_bytes: int, copies: list, call: Callable[[object], object]):
        self.label, self.weight_bytes, self.copies, self._call = label, weight_bytes, copies, call
        self.samples: list[float] = []
        self._next = 0

    def run(self) -> float:
        weights = self.copies[self._next % len(self.copies)]
        self._next += 1
        start = time.perf_counter()
        self._call(weights)
        return time.perf_counter() - start

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples)


def n_copies(weight_bytes: int) -> int:
    return max(2, -(-ROTATE_BYTES // weight_bytes))


def timed_pair(label: str, one: dict[str, torch.Tensor], call: Callable[[dict], object]) -> tuple[Config, Config]:
    """A matmul over n_copies of `one`'s weights, and a copy_ of the same number of bytes."""
    size = nbytes(one)
    copies = [one] + [{k: v.clone() for k, v in one.items()} for _ in range(n_copies(size) - 1)]
    srcs = [torch.empty(size, dtype=torch.uint8).fill_(i) for i in range(n_copies(size))]
    dst = torch.empty(size, dtype=torch.uint8).fill_(0)
    return Config(label, size, copies, call), Config(f"copy {size / 1e6:.1f} MB", size, srcs, lambda src: dst.copy_(src))


def own_kernel_line() -> str:
    """Which variants of offload_moe's own kernel run here, and how long a fresh build takes."""
    cc = int4_gemv.compiler()
    if cc is None:
        return "own int8 kernel: no C compiler, torch's int4 kernel only"
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        int4_gemv.build(Path(scratch), cc)
        seconds = time.perf_counter() - start
    variants = sorted(int4_gemv.block_ns()) or "none on this CPU"
    return (f"own int8 kernel: fresh build with {cc} {seconds:.2f} s; layouts (BLOCK_N) it runs here: {variants}; "
            f"{call_overhead_line()}")


def call_overhead_line() -> str:
    """Per-call cost of `qkernels.linear` on a 64 x 64 hqq4 matrix (almost no arithmetic), by kernel."""
    fmt = parse_format("hqq4")
    prepared = prepare_for_cpu(pack(quantize(torch.randn(64, 64) * 0.02, fmt, optimize=False)), fmt, 64, 64)
    x = torch.randn(1, 64).to(torch.bfloat16)
    calls = {"own": lambda: int8_cpu_linear(x, prepared, fmt) if int4_gemv.available(cpu_int4_block_n(), 64) else None,
             "torch's": lambda: int4_cpu_linear(x, prepared, fmt), "linear()": lambda: linear(x, prepared, fmt)}
    micros = {}
    for name, call in calls.items():
        call()
        start = time.perf_counter()
        for _ in range(5000):
            call()
        micros[name] = (time.perf_counter() - start) / 5000 * 1e6
    return "per call on a 64x64 matrix: " + ", ".join(f"{name} {us:.1f} us" for name, us in micros.items())


def bf16_baseline(batch: int) -> tuple[torch.Generator, torch.Tensor, dict[str, torch.Tensor], list[tuple[Config, Config]]]:
    """What every table starts from: the generator, x [batch, IN] bf16, the bf16 weight and its timed row."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, IN, generator=gen).to(torch.bfloat16)
    dense = {"weight": (torch.randn(OUT, IN, generator=gen) * 0.02).to(torch.bfloat16)}
    return gen, x, dense, [timed_pair("bf16 dense (F.linear)", dense, lambda w: F.linear(x, w["weight"]))]


def build_configs(batch: int, with_bnb: bool) -> list[tuple[Config, Config]]:
    """(matmul, copy-of-the-same-bytes) pairs."""
    gen, x, dense, pairs = bf16_baseline(batch)

    def add(label: str, one: dict[str, torch.Tensor], call: Callable[[dict], object]) -> None:
        pairs.append(timed_pair(label, one, call))

    block_n = cpu_int4_block_n()
    own_kernel = int4_gemv.available(block_n, 32)
    for name, label in [
        ("hqq4", "hqq4 int4 kernel"),
        ("hqq3", "hqq3 int4 kernel"),
        ("hqq2g64", "hqq2g64 int4 kernel"),
        ("hqq2", "hqq2 g16 int4 kernel (expanded)"),
    ]:
        fmt = parse_format(name)
        prepared = prepare_for_cpu(pack(random_qtensor(name, gen)), fmt, OUT, IN, block_n=block_n)
        add(label, prepared, lambda w, fmt=fmt: int4_cpu_linear(x, w, fmt))
        if own_kernel:
            add(label.replace("int4 kernel", "own int8 kernel"), prepared, lambda w, fmt=fmt: int8_cpu_linear(x, w, fmt))
    hqq2 = parse_format("hqq2")
    add("hqq2 g16 dequant+matmul", pack(random_qtensor("hqq2", gen)), lambda w: dequant_linear(x, w, hqq2))
    nf4 = parse_format("nf4")
    add("nf4 dequant+matmul", pack(random_qtensor("nf4", gen)), lambda w: linear(x, w, nf4))
    if with_bnb:
        import bitsandbytes.functional as bnbf

        q, state = bnbf.quantize_4bit(dense["weight"], blocksize=64, quant_type="nf4")
        add(
            "nf4 bitsandbytes dequant+matmul",
            {"q": q, "absmax": state.absmax},
            lambda w: F.linear(x, bnbf.dequantize_4bit(w["q"], state)),
        )
    return pairs


def build_prefill_configs(batch: int) -> list[tuple[Config, Config]]:
    """(matmul, copy-of-the-same-bytes) pairs for the many-token paths."""
    gen, x, _, pairs = bf16_baseline(batch)

    def add(label: str, one: dict[str, torch.Tensor], call: Callable[[dict], object]) -> None:
        pairs.append(timed_pair(label, one, call))

    block_n = cpu_int4_block_n()
    own_kernel = int4_gemv.available(block_n, 32)
    for name in ("hqq4", "hqq2"):
        fmt = parse_format(name)
        prepared = prepare_for_cpu(pack(random_qtensor(name, gen)), fmt, OUT, IN, block_n=block_n)
        add(f"{name} int4 kernel", prepared, lambda w, fmt=fmt: int4_cpu_linear(x, w, fmt))
        if own_kernel:
            add(f"{name} own int8 kernel", prepared, lambda w, fmt=fmt: int8_cpu_linear(x, w, fmt))
        add(f"{name} prefill (dequant + matmul)", prepared,
            lambda w, fmt=fmt: prefill_linear(x, w, fmt, block_n))
    return pairs


def time_round_robin(pairs: list[tuple[Config, Config]], budget_s: float) -> None:
    configs = [c for pair in pairs for c in pair]
    for c in configs:  # warm-up: one pass over every copy (first touch, allocator)
        for _ in range(len(c.copies)):
            c.run()
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < 3 or (time.perf_counter() < deadline and rounds < 200):
        for c in configs:
            # ~50 ms of calls per config per round, at least one
            first = c.run()
            c.samples.append(first)
            for _ in range(min(int(0.05 / max(first, 1e-6)), 20)):
                c.samples.append(c.run())
        rounds += 1


def print_table(batch: int, pairs: list[tuple[Config, Config]]) -> None:
    base = pairs[0][0].median_s
    print(f"\nbatch {batch}: [{OUT} x {IN}] weight, median of n calls, each reading its weights from DRAM")
    print("GB/s = weight bytes read / time; x bf16 = speed-up over bf16 dense; copy = copy_ of the same")
    print("bytes in the same rounds; % copy bw = matmul GB/s / copy GB/s; min ms = fastest call (less noise)")
    head = (
        f"{'format / path':34s} {'MB':>6s} {'ms':>8s} {'min ms':>7s} {'GB/s':>6s} {'x bf16':>7s} "
        f"{'copy ms':>8s} {'copy GB/s':>9s} {'% copy bw':>9s} {'n':>4s}"
    )
    print(head)
    print("-" * len(head))
    for mm, cp in pairs:
        t, tc = mm.median_s, cp.median_s
        print(
            f"{mm.label:34s} {mm.weight_bytes / 1e6:6.1f} {t * 1e3:8.2f} {min(mm.samples) * 1e3:7.2f} "
            f"{mm.weight_bytes / t / 1e9:6.1f} {base / t:7.2f} {tc * 1e3:8.2f} {cp.weight_bytes / tc / 1e9:9.1f} "
            f"{100 * tc / t:8.0f}% {len(mm.samples):4d}"
        )


def time_quantization(with_hqq: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(OUT, IN, generator=gen) * 0.02).to(torch.bfloat16)
    print(f"\nquantizing one [{OUT} x {IN}] bf16 matrix (N(0, 0.02) weights)")
    print(f"{'format':10s} {'method':6s} {'seconds':>8s} {'rel. RMS error':>15s} {'re-lay ms':>10s}  (re-lay: prepare_for_cpu)")
    block_n = cpu_int4_block_n()
    wf = w.float()
    for name in ("hqq4", "hqq3", "hqq2", "hqq2g64", "nf4"):
        fmt = parse_format(name)
        methods = [False, True] if (with_hqq and name == "hqq4") else [False]
        for optimize in methods:
            start = time.perf_counter()
            qt = quantize(w, fmt, optimize=optimize)
            seconds = time.perf_counter() - start
            err = ((dequantize(qt) - wf).pow(2).mean().sqrt() / wf.pow(2).mean().sqrt()).item()
            relay = ""
            if fmt.kind is FormatKind.AFFINE and not optimize:
                packed = pack(qt)
                dest = prepare_for_cpu(packed, fmt, OUT, IN, block_n=block_n)
                times = []
                for _ in range(5):  # into the same (slot-like) buffers
                    start = time.perf_counter()
                    prepare_for_cpu(packed, fmt, OUT, IN, dest=dest, block_n=block_n)
                    times.append(time.perf_counter() - start)
                relay = f"{statistics.median(times) * 1e3:10.1f}"
            print(f"{name:10s} {'hqq' if optimize else 'RTN':6s} {seconds:8.2f} {err:15.4f} {relay:>10s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=20.0, help="timing budget per batch size")
    parser.add_argument("--no-hqq", action="store_true", help="skip the HQQ optimiser timing")
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes even if installed")
    parser.add_argument("--prefill", action="store_true", help="time the many-token paths instead")
    args = parser.parse_args()
    print(machine_line())
    print(own_kernel_line())
    torch.set_grad_enabled(False)
    if args.prefill:
        for batch in args.batches if args.batches != [1, 8] else [16, 32, 64, 128, 256]:
            pairs = build_prefill_configs(batch)
            time_round_robin(pairs, args.seconds)
            print_table(batch, pairs)
            del pairs
        return

    try:
        import bitsandbytes  # noqa: F401

        with_bnb = not args.no_bnb
    except ImportError:
        with_bnb = False
    try:
        import hqq  # noqa: F401

        with_hqq = not args.no_hqq
    except ImportError:
        with_hqq = False

    for batch in args.batches:
        pairs = build_configs(batch, with_bnb)
        time_round_robin(pairs, args.seconds)
        print_table(batch, pairs)
        del pairs
    time_quantization(with_hqq)


if __name__ == "__main__":
    main()
