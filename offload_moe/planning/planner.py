"""Fit a model to a device-memory budget: how many expert slots each MoE layer gets.

The arithmetic (planning.budget), all from the config (no weights read).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from offload_moe.checkpoint.validate import expected_tensors
from offload_moe.model.arch import describe_model
from offload_moe.model.build import build_shape_model
from offload_moe.errors import ConfigError
from offload_moe.quant.formats import check_shape, parse_format
from offload_moe.runtime.disk_store import spills_to_disk
from offload_moe.runtime.fused_torch import planned_tile_bytes
from offload_moe.runtime.store import ExpertLayout
from offload_moe.planning.perfmodel import DERATING, HARDWARE, Costs, Workload, expected_token, pcie_bandwidth
from offload_moe.planning.perfmodel import tokens_per_s as perf_tokens_per_s
from offload_moe.planning.budget import SlotPlan, kv_cache_bytes, non_expert_bytes, plan_slots


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
    # Encoder-decoder models: the MoE layer keys of each stack ({"encoder": [...], "decoder": [...]});
    # empty for decoder-only models.
    stacks: dict[str, list[int]] = field(default_factory=dict)

    @property
    def decode_layers(self) -> int:
        """MoE layers a generated token passes: all of them, or an encoder-decoder's decoder ones
        (its encoder runs once per prompt)."""
        return len(self.stacks.get("decoder", [])) if self.stacks else self.moe_layers

    @property
    def bytes_moved_per_token(self) -> float:
        return self.decode_layers * self.experts_per_token * (1 - self.hit_rate) * self.expert_bytes

    def workload(self) -> Workload:
        """What a decode token moves, for the cost model: every non-expert weight is read once
        per token (counting the whole embedding table stands in for the KV-cache reads; for an
        encoder-decoder model the encoder's weights stand in for the cross-attention reads)."""
        return Workload(self.decode_layers, self.expert_bytes, self.non_expert_bytes)

    def tokens_per_s(self, pcie: float, gpu: float, cpu: float | None = None, *, prefetch_recall: float = 0.0,
                     overhead_per_layer: float = 0.0) -> float:
        """Modeled decode speed (`perfmodel`, the one cost model) with every layer at the expected
        hit rate: device reads of the non-expert weights and of each routed expert, each miss
        copied over PCIe at `pcie` bytes/s, or with `cpu` (hybrid compute) computed on the CPU
        when that is sooner; `prefetch_recall` of the misses prefetched during the layer before;
        `overhead_per_layer` seconds of framework time per layer. Bandwidths are effective ones."""
        if self.decode_layers == 0:  # an encoder-only MoE (switch-c-2048 as configured): no expert per token
            return gpu / self.non_expert_bytes
        costs = Costs.from_bandwidths(self.workload(), gpu, pcie, cpu, overhead_per_layer)
        token = expected_token(self.decode_layers, self.experts_per_token, self.hit_rate)
        return perf_tokens_per_s([token], costs, prefetch_recall)

    def as_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "experts": {"format": self.expert_format, "bytes_per_expert": self.expert_bytes,
                        "per_layer": self.num_experts, "per_token": self.experts_per_token,
                        "moe_layers": self.moe_layers},
            "device": {"budget": self.slots.budget, "non_expert_bytes": self.non_expert_bytes,
                       "kv_cache_bytes": self.slots.kv_cache_bytes, "scratch_bytes": self.slots.scratch_bytes,
                       "slots_per_layer": self.slots.slots_per_layer,
                       "slot_bytes": self.slots.slot_bytes},
            "host": {"budget": self.host_budget, "pinned_expert_bytes": self.host_expert_bytes,
                     "disk_expert_bytes": self.disk_expert_bytes},
            "expected_hit_rate": self.hit_rate,
            "bytes_moved_per_token": self.bytes_moved_per_token,
            **({"stacks": {name: {"moe_layers": len(keys), "layer_keys": keys} for name, keys in self.stacks.items()}}
               if self.stacks else {}),
        }


def plan_model(config, expert_format: str, gpu_memory: int, cpu_memory: int, context: int,
               fallback_format: str | None = None, where: str = "config.json") -> ModelPlan:
    """Plan a model from its transformers config alone (shapes; no weights are read).
    `fallback_format`: the format planned instead when `expert_format`'s groups do not divide
    the experts' input dimensions (switch-c-2048's 2080 for hqq4's groups of 64), as load()'s
    automatic choice keeps such experts 16-bit; ModelPlan.expert_format says which was used."""
    model = build_shape_model(config, torch.bfloat16)
    spec = describe_model(model, where)  # `where` names the config in a refusal
    non_expert = non_expert_bytes(expected_tensors(model, config, spec), 2)
    fmt = parse_format(expert_format)
    if fallback_format is not None and not _format_fits(fmt, spec):
        fmt = parse_format(fallback_format)
    layout = ExpertLayout.for_experts(spec, fmt, torch.bfloat16, prepared=False)
    layers, experts = len(spec.moe_layers), spec.num_experts
    tile = planned_tile_bytes(fmt, spec.hidden, spec.intermediate, spec.gated, spec.top_k, torch.bfloat16)
    slots = plan_slots(gpu_memory, non_expert, kv_cache_bytes(config, context, 2), layout.nbytes, layers, experts, tile)
    # The host store holds the CPU kernel's layout, which `load` compares with cpu_memory.
    store_layout = ExpertLayout.for_experts(spec, fmt, torch.bfloat16, prepared=True)
    all_experts = layers * experts * store_layout.nbytes
    in_ram = min(all_experts, max(0, cpu_memory)) if spills_to_disk(all_experts, cpu_memory) else all_experts
    return ModelPlan(
        model_type=config.model_type, moe_layers=layers, num_experts=experts,
        experts_per_token=spec.top_k, expert_format=fmt.name,
        expert_bytes=layout.nbytes, non_expert_bytes=non_expert, slots=slots, host_budget=cpu_memory,
        host_expert_bytes=in_ram, disk_expert_bytes=all_experts - in_ram,
        hit_rate=expected_hit_rate(slots.slots_per_layer, experts),
        stacks={name: keys for name, keys in spec.stack_layers().items() if name},
    )


def _format_fits(fmt, spec) -> bool:
    try:
        for m in spec.matrices:
            check_shape(fmt, m.out_features, m.in_features)
    except ConfigError:
        return False
    return True
