"""Fit a model to a device-memory budget: how many expert slots each MoE layer gets.

The arithmetic, all from the config (no weights read):
    budget = non-expert weights + KV cache for `context` tokens + slots * layers * bytes per expert
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(value: str | int | float, what: str = "memory") -> int:
    """'22GiB', '500MB', '1.5g' or a number of bytes -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"{what}={value!r} must be positive")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"{what}={value!r} is not a size; write e.g. '22GiB', '16GB' or '512MiB'")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ConfigError(f"{what}={value!r} must be positive")
    return size


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


@dataclass(frozen=True)
class SlotPlan:
    """How a device budget splits between fixed weights, KV cache and expert slots."""

    budget: int
    non_expert_bytes: int
    kv_cache_bytes: int
    expert_bytes: int  # one expert's buffer
    moe_layers: int
    num_experts: int
    slots_per_layer: int

    @property
    def slot_bytes(self) -> int:
        return self.slots_per_layer * self.moe_layers * self.expert_bytes


def kv_cache_bytes(config, context: int, dtype_size: int) -> int:
    """Keys and values of every layer for `context` tokens."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * context * heads * head_dim * dtype_size


def plan_slots(
    budget: int, non_expert_bytes: int, kv_bytes: int, expert_bytes: int, moe_layers: int, num_experts: int
) -> SlotPlan:
    """Most slots per layer (at most num_experts) that fit `budget`; a refusal that says what would fit."""
    room = budget - non_expert_bytes - kv_bytes
    slots = min(num_experts, room // (moe_layers * expert_bytes)) if room > 0 else 0
    if slots < 1:
        need = non_expert_bytes + kv_bytes + moe_layers * expert_bytes
        raise ConfigError(
            f"gpu_memory={format_bytes(budget)} cannot fit this model: non-expert weights need "
            f"{format_bytes(non_expert_bytes)}, the KV cache {format_bytes(kv_bytes)}, and one expert slot per "
            f"layer {format_bytes(moe_layers * expert_bytes)}; give at least {format_bytes(need)} "
            "(or a shorter context)"
        )
    return SlotPlan(budget, non_expert_bytes, kv_bytes, expert_bytes, moe_layers, num_experts, int(slots))
