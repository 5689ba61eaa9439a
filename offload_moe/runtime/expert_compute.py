"""Expert matmuls: one routed expert applied to the tokens sent to it (quantized formats: qkernels).

Unquantized experts reproduce the model's eager experts forward operation for operation, for each
kind of experts module (arch.ExpertsKind), which is what makes the offloaded model's logits equal
the reference bit for bit:

  FUSED       gate, up = linear(x, gate_up).chunk(2); linear(act(gate) * up, down)
  TRANSPOSED  apply_gate(x @ gate_up + gate_up_bias) @ down + down_bias        (gpt-oss)
  DBRX        act(x @ w1.T) * (x @ v1.T) @ w2
  DENSE_ACT_DENSE  linear(act(linear(x, wi)), wo)                 (Switch; no gate, apply_gate = act)
                   linear(act(linear(x, fc1, b1)), fc2, b2)       (NLLB-MoE: nn.Linear's biases)

Quantized experts hold canonical [out, in] matrices whatever the kind, so one path serves all:
linear(x, gate_up) (+ bias), apply_gate, linear(., down) (+ bias).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from offload_moe.model.arch import ExpertsKind
from offload_moe.quant.matmul import linear as quantized_linear
from offload_moe.model.arch import matrix_fields
from offload_moe.quant.formats import QuantFormat
from offload_moe.model.arch import GateFn


def dense_expert_forward(
    x: torch.Tensor,  # [T_e, H] tokens routed to this expert
    weights: dict[str, torch.Tensor],  # the kind's fields (arch.ArchSpec.dense_fields)
    apply_gate: GateFn,
    kind: ExpertsKind = ExpertsKind.FUSED,
) -> torch.Tensor:  # [T_e, H]
    if kind is ExpertsKind.FUSED:
        return F.linear(apply_gate(F.linear(x, weights["gate_up"])), weights["down"])  # [2F, H], [H, F]
    if kind is ExpertsKind.DENSE_ACT_DENSE:
        # wi/fc1 [F, H], apply_gate the activation alone, wo/fc2 [H, F]; the biases (NLLB-MoE) inside
        # F.linear, as nn.Linear adds them
        up = F.linear(x, weights["gate_up"], weights.get("gate_up_bias"))
        return F.linear(apply_gate(up), weights["down"], weights.get("down_bias"))
    if kind is ExpertsKind.TRANSPOSED:
        gate_up = x @ weights["gate_up"] + weights["gate_up_bias"]  # [H, 2F]
        return apply_gate(gate_up) @ weights["down"] + weights["down_bias"]  # [F, H]
    w1, v1 = weights["gate_up"].chunk(2)  # [F, H] each
    gate_up = torch.cat([x.matmul(w1.T), x.matmul(v1.T)], dim=-1)  # [T_e, 2F]
    return apply_gate(gate_up).matmul(weights["down"])  # [F, H]


def quantized_expert_forward(
    x: torch.Tensor,  # [T_e, H]
    weights: dict[str, torch.Tensor],  # "gate_up.*", "down.*" prepared fields, optional "*_bias"
    fmt: QuantFormat,
    apply_gate: GateFn,
) -> torch.Tensor:  # [T_e, H]
    gate_up = quantized_linear(x, matrix_fields(weights, "gate_up"), fmt)  # [T_e, 2F]
    if "gate_up_bias" in weights:
        gate_up = gate_up + weights["gate_up_bias"]
    out = quantized_linear(apply_gate(gate_up).to(x.dtype), matrix_fields(weights, "down"), fmt)
    if "down_bias" in weights:
        out = out + weights["down_bias"]
    return out.to(x.dtype)


def expert_forward(
    x: torch.Tensor,  # [T_e, H]
    weights: dict[str, torch.Tensor],  # an expert's store or slot views
    fmt: QuantFormat,
    apply_gate: GateFn,
    kind: ExpertsKind = ExpertsKind.FUSED,
) -> torch.Tensor:  # [T_e, H]
    """One expert in any format: the exact unquantized path above, or the quantized kernels."""
    if not fmt.quantized:
        return dense_expert_forward(x, weights, apply_gate, kind)
    return quantized_expert_forward(x, weights, fmt, apply_gate)
