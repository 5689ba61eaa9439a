"""Attention that gives a sequence the same bits whatever batch it decodes in.

A batched decode step holds the KV caches of several sequences left-padded to one length.
torch's SDPA over a padded row with a mask takes other kernels (and another summation order)
than over that sequence's own keys alone, so a greedy reply would drift from the one the same
request gets alone. Here a decode step (one query per row) calls transformers' own SDPA
attention once per row on that row's unpadded keys and values, exactly the call a sequence
decoding alone makes; prompts (many queries, always one sequence in the engine) go to SDPA
unchanged.

`use_rowwise_attention(model)` registers this function under ROWWISE with transformers'
attention and mask interfaces (their extension point; the mask is SDPA's, from which each
row's padding is read) and switches the model to it; it returns the implementation to restore.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ROWWISE = "offload_moe_rowwise"


def _paddings(attention_mask: torch.Tensor | None, rows: int) -> list[int]:
    """Leading masked keys of each row in an SDPA mask [B, 1, q, kv] (bool: True attends; float:
    0 attends), read back once per call."""
    if attention_mask is None:
        return [0] * rows
    last = attention_mask[:, 0, -1]
    visible = last if last.dtype == torch.bool else last == 0
    pads = visible.to(torch.int8).argmax(-1).tolist()
    return pads * rows if len(pads) == 1 else pads


def rowwise_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, heads, q, d], key/value [B, kv_heads, kv, d] -> ([B, q, heads, d_v], None).
    Each row's keys and values are a view of the batch's (no copy)."""
    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for row, pad in enumerate(_paddings(attention_mask, query.shape[0])):
        out, _ = sdpa_attention_forward(module, query[row : row + 1], key[row : row + 1, :, pad:],
                                        value[row : row + 1, :, pad:], None, **kwargs)
        rows.append(out)
    return torch.cat(rows), None


def use_rowwise_attention(model: nn.Module) -> str:
    """Switch `model` to rowwise attention; returns its previous implementation."""
    AttentionInterface.register(ROWWISE, rowwise_attention)
    AttentionMaskInterface.register(ROWWISE, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ROWWISE)
    return previous
