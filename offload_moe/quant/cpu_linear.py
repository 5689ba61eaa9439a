"""Linear layers on offload_moe's dense CPU kernels: `CpuLinear` (16-bit, the weight as it is) and
`Q8Linear` (the q8 format, for attention="q8").

`use_fast_linears(model)` swaps every nn.Linear whose weight is fp16/bf16 on the CPU (attention
projections, routers where they are nn.Linear, shared experts, dense MLPs, lm_head; never the offloaded experts, which are
no nn.Linear) for a CpuLinear holding the very same weight Parameter (no copy; ties to the
embeddings stay), so state_dict, tie_weights and anything reading `.weight` see no change.
Their products are offload_moe.quant.dense_matmul's, fp32 sums of the 16-bit weights: close to
torch's 16-bit ones, not bit-identical (offload_moe.options: cpu_kernels).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from offload_moe.quant.dense_matmul import Switch, Workspace, dense_matmul, q8_matmul
from offload_moe.quant.dense_switch import kind_of, switch_for
from offload_moe.quant.q8 import BLOCK as Q8_BLOCK, quantize_q8

FAST_DTYPES = (torch.float16, torch.bfloat16)


class CpuLinear(nn.Linear):
    """nn.Linear (same weight and bias Parameters) whose forward runs offload_moe.quant.dense_matmul.
    `switch` None asks offload_moe.quant.dense_switch (measured on this CPU); a test may pin one."""

    def __init__(self, linear: nn.Linear, workspace: Workspace, switch: Switch | None = None):
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a new weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.workspace, self.switch = workspace, switch

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out], x's dtype
        switch = self.switch or switch_for(kind_of(self.weight.dtype))
        return dense_matmul(x, self.weight, self.bias, self.workspace, switch)


class Q8Linear(nn.Module):
    """y = x @ W^T (+ b) with W in the q8 format (offload_moe.quant.q8), for the CPU."""

    def __init__(self, linear: nn.Linear, workspace: Workspace, switch: Switch | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, scales = quantize_q8(linear.weight.detach())
        self.register_buffer("codes", codes, persistent=False)  # int8 [out, in]
        self.register_buffer("scales", scales, persistent=False)  # fp32 [out, in / 32]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.workspace, self.switch = workspace, switch

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format=q8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out], x's dtype
        flat = x.reshape(-1, self.in_features)
        y = q8_matmul(flat, self.codes, self.scales, self.bias, self.workspace, self.switch or switch_for("q8"))
        return y.to(x.dtype, memory_format=torch.contiguous_format).reshape(*x.shape[:-1], self.out_features)


def q8_fits(linear: nn.Linear) -> bool:
    """A q8 weight needs whole blocks of 32 input columns."""
    return linear.in_features % Q8_BLOCK == 0


def swap_modules(model: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> int:
    """Put replacement(child) in place of every submodule of `model` it gives one for (None: keep
    the child); the children are listed before any is replaced. Returns how many were replaced.
    The one walk behind use_fast_linears, cpu_norm.use_fast_norms and cpu_router.use_fast_routers."""
    children = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    replaced = 0
    for parent, name, child in children:
        new = replacement(child)
        if new is not None:
            setattr(parent, name, new)
            replaced += 1
    return replaced


@functools.cache
def subclass_of(replacement: type[nn.Module], original: type[nn.Module]) -> type[nn.Module]:
    """`replacement` as a subclass of the replaced module's own class as well: transformers finds
    some modules by class (output_router_logits' and output_attentions' recorders hook every
    isinstance(m, MixtralTopKRouter) / MixtralAttention), so a swapped module is still found. The
    replacement calls nn.Module.__init__ only, never the original class's (which builds weights).
    One class per pair, made once."""
    return type(f"{original.__name__}OnCpu", (replacement, original),
                {"__doc__": replacement.__doc__, "__module__": replacement.__module__})


def use_fast_linears(model: nn.Module, workspace: Workspace | None = None) -> int:
    """Replace every nn.Linear (exactly that type) with a 16-bit weight on the CPU by a CpuLinear
    sharing one Workspace; returns how many were replaced."""
    workspace = Workspace() if workspace is None else workspace

    def fast(child: nn.Module) -> CpuLinear | None:
        if (type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype in FAST_DTYPES
                and child.weight.stride(-1) == 1):
            return CpuLinear(child, workspace)
        return None

    return swap_modules(model, fast)
