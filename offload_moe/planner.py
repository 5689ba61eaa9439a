"""Fit a model to a device-memory budget: how many expert slots each MoE layer gets.

The arithmetic, all from the config (no weights read):
    budget = non-expert weights + KV cache for `context` tokens + slots * layers * bytes per expert
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .perfmodel import DERATING, HARDWARE, Costs, Workload, expected_token, pcie_bandwidth
from .perfmodel import tokens_per_s as perf_tokens_per_s

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


def non_expert_bytes(expected: dict[str, tuple[str, tuple[int, ...]]], dtype_size: int) -> int:
    """Bytes of the non-expert weights (loader.expected_tensors' shapes) at `dtype_size` bytes each."""
    return sum(math.prod(shape) for _, shape in expected.values()) * dtype_size


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


# ---------------------------------------------------------------------------------------------
# The whole-model plan behind `offload-moe plan`: config only, no weights.

# Hit rate of the default policy (markov) on real Mixtral-8x7B routing, by slots per layer:
# `python bench/replay_policies.py --slots 1 2 3 4 5 6 7 --policies markov` (cold caches). With
# all 8 slots the runtime preloads every expert, so nothing ever misses. Other expert counts
# fall back to slots / experts, what random routing gives.
MIXTRAL_HIT_RATE = {1: 0.197, 2: 0.397, 3: 0.540, 4: 0.655, 5: 0.749, 6: 0.836, 7: 0.917, 8: 1.0}

# Named hardware: effective bandwidths in bytes/s, the data-sheet peaks of perfmodel.HARDWARE and
# perfmodel.pcie_bandwidth derated as perfmodel.DERATING states (PCIe 80%, GPU memory 80%).
PCIE = {f"pcie{gen}": pcie_bandwidth(gen) * DERATING.pcie for gen in (3, 4, 5)}
GPUS = {name: hw.gpu_bandwidth * DERATING.gpu for name, hw in HARDWARE.items()}


def expected_hit_rate(slots: int, num_experts: int) -> float:
    if num_experts == 8 and slots in MIXTRAL_HIT_RATE:
        return MIXTRAL_HIT_RATE[slots]
    return min(1.0, slots / num_experts)


@dataclass(frozen=True)
class ModelPlan:
    """Where every part of a model lives, and what a token costs."""

    model_type: str
    moe_layers: int
    num_experts: int
    experts_per_token: int
    expert_format: str
    expert_bytes: int
    non_expert_bytes: int
    slots: SlotPlan
    host_budget: int
    host_expert_bytes: int  # experts in pinned RAM
    disk_expert_bytes: int  # experts beyond the host budget: served memory-mapped from disk (diskstore)
    hit_rate: float

    @property
    def bytes_moved_per_token(self) -> float:
        return self.moe_layers * self.experts_per_token * (1 - self.hit_rate) * self.expert_bytes

    def workload(self) -> Workload:
        """What a decode token moves, for the cost model: every non-expert weight is read once
        per token (counting the whole embedding table stands in for the KV-cache reads)."""
        return Workload(self.moe_layers, self.expert_bytes, self.non_expert_bytes)

    def tokens_per_s(self, pcie: float, gpu: float, cpu: float | None = None, *, prefetch_recall: float = 0.0,
                     overhead_per_layer: float = 0.0) -> float:
        """Modeled decode speed (`perfmodel`, the one cost model) with every layer at the expected
        hit rate: device reads of the non-expert weights and of each routed expert, each miss
        copied over PCIe at `pcie` bytes/s, or with `cpu` (hybrid compute) computed on the CPU
        when that is sooner; `prefetch_recall` of the misses prefetched during the layer before;
        `overhead_per_layer` seconds of framework time per layer. Bandwidths are effective ones."""
        costs = Costs.from_bandwidths(self.workload(), gpu, pcie, cpu, overhead_per_layer)
        token = expected_token(self.moe_layers, self.experts_per_token, self.hit_rate)
        return perf_tokens_per_s([token], costs, prefetch_recall)

    def as_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "experts": {"format": self.expert_format, "bytes_per_expert": self.expert_bytes,
                        "per_layer": self.num_experts, "per_token": self.experts_per_token,
                        "moe_layers": self.moe_layers},
            "device": {"budget": self.slots.budget, "non_expert_bytes": self.non_expert_bytes,
                       "kv_cache_bytes": self.slots.kv_cache_bytes, "slots_per_layer": self.slots.slots_per_layer,
                       "slot_bytes": self.slots.slot_bytes},
            "host": {"budget": self.host_budget, "pinned_expert_bytes": self.host_expert_bytes,
                     "disk_expert_bytes": self.disk_expert_bytes},
            "expected_hit_rate": self.hit_rate,
            "bytes_moved_per_token": self.bytes_moved_per_token,
        }


def plan_model(config, expert_format: str, gpu_memory: int, cpu_memory: int, context: int) -> ModelPlan:
    """Plan a model from its transformers config alone (shapes; no weights are read)."""
    from .arch import describe_model
    from .diskstore import spills_to_disk
    from .loader import build_empty_model, expected_tensors
    from .qkernels import expert_fields
    from .quant import parse_format
    from .store import ExpertLayout

    model = build_empty_model(config, torch.bfloat16)
    spec = describe_model(model)
    non_expert = non_expert_bytes(expected_tensors(model, config, spec), 2)
    fmt = parse_format(expert_format)
    hidden, ffn = spec.hidden, spec.intermediate
    layout = ExpertLayout(expert_fields(fmt, hidden, ffn, prepared=False) + spec.bias_fields(torch.bfloat16)
                          if fmt.quantized else spec.dense_fields(fmt.dtype))
    layers, experts = len(spec.moe_layers), spec.num_experts
    slots = plan_slots(gpu_memory, non_expert, kv_cache_bytes(config, context, 2), layout.nbytes, layers, experts)
    # The host store holds the CPU kernel's layout, which `load` compares with cpu_memory.
    store_layout = layout if not fmt.quantized else ExpertLayout(expert_fields(fmt, hidden, ffn, prepared=True)
                                                                 + spec.bias_fields(torch.bfloat16))
    all_experts = layers * experts * store_layout.nbytes
    in_ram = min(all_experts, max(0, cpu_memory)) if spills_to_disk(all_experts, cpu_memory) else all_experts
    return ModelPlan(
        model_type=config.model_type, moe_layers=layers, num_experts=experts,
        experts_per_token=spec.top_k, expert_format=fmt.name,
        expert_bytes=layout.nbytes, non_expert_bytes=non_expert, slots=slots, host_budget=cpu_memory,
        host_expert_bytes=in_ram, disk_expert_bytes=all_experts - in_ram,
        hit_rate=expected_hit_rate(slots.slots_per_layer, experts),
    )
