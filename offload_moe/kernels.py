"""Expert matmuls: one routed expert applied to the tokens sent to it (quantized formats: qkernels).

Unquantized experts reproduce transformers' eager experts forward operation for operation
(fused gate_up matmul, chunk, act(gate) * up, down matmul), which is what makes the offloaded
model's logits equal the reference bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .qkernels import expert_forward as quantized_expert_forward
from .quant import QuantFormat


def dense_expert_forward(
    x: torch.Tensor,  # [T_e, H] tokens routed to this expert
    weights: dict[str, torch.Tensor],  # gate_up [2F, H], down [H, F]
    act_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:  # [T_e, H]
    gate, up = F.linear(x, weights["gate_up"]).chunk(2, dim=-1)  # [T_e, F] each
    return F.linear(act_fn(gate) * up, weights["down"])


def expert_forward(
    x: torch.Tensor,  # [T_e, H]
    weights: dict[str, torch.Tensor],  # an expert's store or slot views
    fmt: QuantFormat | None,  # None: unquantized
    act_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:  # [T_e, H]
    """One expert in any format: the unquantized path above, or the quantized kernels."""
    if fmt is None:
        return dense_expert_forward(x, weights, act_fn)
    return quantized_expert_forward(x, weights, fmt, act_fn).to(x.dtype)
