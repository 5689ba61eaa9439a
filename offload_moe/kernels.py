"""Expert matmuls: one routed expert applied to the tokens sent to it.

Unquantized experts reproduce transformers' eager experts forward operation for operation
(fused gate_up matmul, chunk, act(gate) * up, down matmul), which is what makes the offloaded
model's logits equal the reference bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def dense_expert_forward(
    x: torch.Tensor,  # [T_e, H] tokens routed to this expert
    weights: dict[str, torch.Tensor],  # gate_up [2F, H], down [H, F]
    act_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:  # [T_e, H]
    gate, up = F.linear(x, weights["gate_up"]).chunk(2, dim=-1)  # [T_e, F] each
    return F.linear(act_fn(gate) * up, weights["down"])
