"""Where the dense CPU products switch from the few-token kernel to the many-token path, measured.

The crossing point depends on the CPU (its vector width, torch's kernels for it, the cores), so
it is measured at first use on a [1024, 2048] matrix (~0.1-0.5 s) rather than fixed: the kernel
against fp32 tiles at growing token counts until the tiles win twice in a row, then torch's own
16-bit matmul against the tiles at PREFILL_TOKENS. The answer is cached as JSON next to the built
kernel (native.kernel_dir()), keyed by the kernel's build key, the CPU model, torch's CPU
capability, the kernel variant, the thread count and the weight kind; a file that does not parse
is measured over and rewritten (native.cached_measurement).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import torch

from offload_moe.quant import dense_kernel, native
from offload_moe.quant.dense_matmul import Switch, Workspace, dense_matmul, q8_matmul
from offload_moe.quant.q8 import quantize_q8

KINDS = ("float16", "bfloat16", "q8")  # the weight kinds a switch is measured for
TOKEN_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
PREFILL_TOKENS = 128
SHAPE = (1024, 2048)  # [N, K] of the measured matrix (N = 256 for the slow 16-bit prefill check)


def cache_name() -> str:
    """The cache file (in native.kernel_dir()), one per build of the dense kernel."""
    cc = native.compiler()
    build = native.build_key(dense_kernel.SOURCE, cc) if cc else "no-compiler"
    return f"dense_switch-{build}.json"


def cache_key(kind: str) -> str:
    return "|".join((native.cpu_model(), torch.backends.cpu.get_cpu_capability(),
                     f"variant={dense_kernel.variant()}", f"threads={torch.get_num_threads()}", kind))


def _seconds(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(kind: str) -> Switch:
    """The switch for weights of `kind`, measured now (see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(SHAPE, generator=gen)
    workspace = Workspace()
    if kind == "q8":
        codes, scales = quantize_q8(weight)
        run = lambda x, switch: q8_matmul(x, codes, scales, None, workspace, switch)  # noqa: E731
    else:
        weight = weight.to(getattr(torch, kind))
        run = lambda x, switch: dense_matmul(x, weight, None, workspace, switch)  # noqa: E731
    gemv_max, tiles_won = 0, 0
    if dense_kernel.available():
        for tokens in TOKEN_STEPS:
            x = torch.randn(tokens, SHAPE[1], generator=gen)
            if _seconds(lambda: run(x, Switch(tokens))) <= _seconds(lambda: run(x, Switch(0))):
                gemv_max, tiles_won = tokens, 0
            else:
                tiles_won += 1
                if tiles_won == 2:
                    break
    native_prefill = False
    if kind != "q8":
        small = weight[: SHAPE[0] // 4]
        x = torch.randn(PREFILL_TOKENS, SHAPE[1], generator=gen).to(small.dtype)
        tiles = _seconds(lambda: dense_matmul(x, small, None, workspace, Switch(0)), repeats=2)
        native_prefill = _seconds(lambda: dense_matmul(x, small, None, workspace, Switch(0, True)), repeats=2) < tiles
    return Switch(gemv_max, native_prefill)


def _from_entry(entry: object) -> Switch | None:
    if not isinstance(entry, dict):
        return None
    gemv, native_prefill = entry.get("gemv_max_tokens"), entry.get("native_prefill")
    if isinstance(gemv, bool) or not isinstance(gemv, int) or gemv < 0 or not isinstance(native_prefill, bool):
        return None
    return Switch(gemv, native_prefill)


def cached_switch(kind: str) -> Switch:
    """The cached switch for `kind` on this machine, measured and stored if missing or unreadable."""
    if kind not in KINDS:
        raise ValueError(f"no dense switch for weight kind {kind!r}; kinds: {', '.join(KINDS)}")
    return native.cached_measurement(cache_name(), cache_key(kind), lambda: dataclasses.asdict(measure(kind)),
                                     _from_entry)


@functools.cache
def _memoised(kind: str, threads: int) -> Switch:
    return cached_switch(kind)


def kind_of(dtype: torch.dtype) -> str:
    """The switch kind of a 16-bit weight dtype ("float16", "bfloat16")."""
    return str(dtype).removeprefix("torch.")


def switch_for(kind: str) -> Switch:
    """`cached_switch`, memoised per process and thread count (the rest of the key is fixed for a
    process): asked on every product."""
    return _memoised(kind, torch.get_num_threads())
