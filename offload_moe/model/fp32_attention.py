"""Attention math in fp32 for 16-bit models on the CPU.

torch's scaled-dot-product attention in fp16/bf16 on the CPU is slow on CPUs without native
16-bit arithmetic (AVX2), while its fp32 kernels are fast everywhere; the inputs are small next
to the weights, so widening q, k and v costs little. `sdpa_fp32` is transformers' own SDPA
attention with q, k, v (and a float mask) widened to fp32 and the result cast back (at decode too:
torch's 16-bit CPU attention for one query was measured slower than widening the cache and
running fp32).

`use_fp32_attention(model)` registers it with transformers' AttentionInterface and
AttentionMaskInterface (the mask is SDPA's) under FP32_SDPA and switches the model to it, only
where the model runs SDPA now and its classes take their attention from the interface; it is
called when a model is loaded, never at import. transformers is imported where it is used, as
in offload_moe.model.build: looking up offload_moe.load does not pay for it.
"""

from __future__ import annotations

import torch
from torch import nn

FP32_SDPA = "offload_moe_sdpa_fp32"


def sdpa_fp32(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, heads, q, d], key/value [B, kv_heads, kv, d] -> ([B, q, heads, d_v] in query's dtype, None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.dtype == torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    mask = attention_mask
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    out, _ = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, **kwargs)
    return out.to(query.dtype), None


def use_fp32_attention(model: nn.Module) -> bool:
    """Switch `model` from SDPA to `sdpa_fp32`; True if it was switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation != "sdpa" or not model._can_set_attn_implementation():
        return False
    AttentionInterface.register(FP32_SDPA, sdpa_fp32)
    AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)
    model.set_attn_implementation(FP32_SDPA)
    return True
