"""Fit a model to a device-memory budget: how many expert slots each MoE layer gets.

The arithmetic, all from the config (no weights read):
    budget = non-expert weights + KV cache for `context` tokens + scratch
             + slots * layers * bytes per expert
where scratch is the fused device path's dequantization tile (runtime.fused_torch.planned_tile_bytes:
quantized experts on a GPU), preallocated once per device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from offload_moe.errors import ConfigError
from offload_moe.units import format_bytes

DEFAULT_CONTEXT = 4096  # tokens of KV cache a budget keeps room for, unless told otherwise


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
    scratch_bytes: int = 0  # device scratch besides the slots (the fused path's dequant tile)

    @property
    def slot_bytes(self) -> int:
        return self.slots_per_layer * self.moe_layers * self.expert_bytes



def non_expert_bytes(expected: dict[str, tuple[str, tuple[int, ...]]], dtype_size: int) -> int:
    """Bytes of the non-expert weights (loader.expected_tensors' shapes) at `dtype_size` bytes each."""
    return sum(math.prod(shape) for _, shape in expected.values()) * dtype_size



def kv_cache_bytes(config, context: int, dtype_size: int) -> int:
    """Keys and values of every layer for `context` tokens."""
    if getattr(config, "is_encoder_decoder", False):
        return encoder_decoder_kv_bytes(config, context, dtype_size)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * context * heads * head_dim * dtype_size



def encoder_decoder_kv_bytes(config, context: int, dtype_size: int) -> int:
    """An encoder-decoder model's cache: each decoder layer keeps keys and values of its self
    attention over the `context` tokens it generates and of its cross attention over a source of
    up to `context` tokens. Heads of T5's d_kv (switch-c-2048: 32 x 64 = 2048, not d_model 2080)."""
    layers = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) or config.num_hidden_layers
    heads = getattr(config, "decoder_attention_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "d_kv", None) or config.hidden_size // heads
    return 2 * 2 * layers * context * heads * head_dim * dtype_size


def plan_slots(
    budget: int, non_expert_bytes: int, kv_bytes: int, expert_bytes: int, moe_layers: int, num_experts: int,
    scratch_bytes: int = 0,
) -> SlotPlan:
    """Most slots per layer (at most num_experts) that fit `budget` next to `scratch_bytes` of
    device scratch; a refusal that says what would fit."""
    room = budget - non_expert_bytes - kv_bytes - scratch_bytes
    slots = min(num_experts, room // (moe_layers * expert_bytes)) if room > 0 else 0
    if slots < 1:
        need = non_expert_bytes + kv_bytes + scratch_bytes + moe_layers * expert_bytes
        scratch = f", the dequantization tile {format_bytes(scratch_bytes)}" if scratch_bytes else ""
        raise ConfigError(
            f"gpu_memory={format_bytes(budget)} cannot fit this model: non-expert weights need "
            f"{format_bytes(non_expert_bytes)}, the KV cache {format_bytes(kv_bytes)}{scratch}, and one expert slot "
            f"per layer {format_bytes(moe_layers * expert_bytes)}; give at least {format_bytes(need)} "
            "(or a shorter context)"
        )
    return SlotPlan(budget, non_expert_bytes, kv_bytes, expert_bytes, moe_layers, num_experts, int(slots),
                    scratch_bytes)
