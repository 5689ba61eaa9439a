"""Hybrid compute: serve a missing expert by copying it to the device, or compute it on the CPU.

The choice is per expert and per call, by a cost model calibrated once at load:

    copy:  seconds to move one expert host -> device  +  device compute for T tokens
    cpu:   CPU compute for T tokens straight from the host store (no copy)

Each compute time is a + b*T, fitted from timings at T=1 and T=8. On a CPU-only machine the
"device" is the CPU and the store already sits in its memory, so computing from the store always
wins (it skips a memcpy): hybrid then simply means "never copy a miss".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from offload_moe.runtime.store import ExpertStore
from offload_moe.runtime.transfer import TransferEngine


@dataclass(frozen=True)
class LinearTime:
    """seconds(T) = fixed + per_token * T."""

    fixed: float
    per_token: float

    def __call__(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens

    @classmethod
    def fit(cls, t1: float, t8: float) -> "LinearTime":
        per_token = max(0.0, (t8 - t1) / 7)
        return cls(max(0.0, t1 - per_token), per_token)


@dataclass(frozen=True)
class HybridCostModel:
    """Calibrated costs of the two ways to serve a miss."""

    copy_seconds: float
    cpu: LinearTime
    device: LinearTime
    same_memory: bool = False  # the device is the CPU: the store is already where compute runs

    def prefer_cpu(self, tokens: int) -> bool:
        if self.same_memory:
            return True
        return self.cpu(tokens) < self.copy_seconds + self.device(tokens)

    def as_dict(self) -> dict[str, float | bool]:
        return {
            "copy_ms": self.copy_seconds * 1e3,
            "cpu_ms_1_token": self.cpu(1) * 1e3,
            "device_ms_1_token": self.device(1) * 1e3,
            "same_memory": self.same_memory,
        }


def _best_of(fn: Callable[[], object], sync: Callable[[], None], repeats: int = 3) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def calibrate(
    store: ExpertStore,
    layer: int,
    device: torch.device,
    engine: TransferEngine,
    forward: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    hidden_size: int,
    dtype: torch.dtype,
) -> HybridCostModel:
    """Time one expert's copy and its compute on both sides (a few milliseconds per layer shape)."""
    if device.type == "cpu":
        return HybridCostModel(0.0, LinearTime(0.0, 0.0), LinearTime(0.0, 0.0), same_memory=True)
    src = store.buffer(layer, 0)
    scratch = torch.empty_like(src, device=device)
    host_views, device_views = store.views(layer, 0), store.layout.views(scratch)
    copy = _best_of(lambda: engine.copy(src, scratch).wait(), engine.synchronize)
    times = {}
    for tokens in (1, 8):
        x_cpu = torch.randn(tokens, hidden_size, dtype=dtype)
        x_dev = x_cpu.to(device)
        times["cpu", tokens] = _best_of(lambda: forward(x_cpu, host_views), lambda: None)
        times["dev", tokens] = _best_of(lambda: forward(x_dev, device_views), engine.synchronize)
    return HybridCostModel(
        copy_seconds=copy,
        cpu=LinearTime.fit(times["cpu", 1], times["cpu", 8]),
        device=LinearTime.fit(times["dev", 1], times["dev", 8]),
    )
