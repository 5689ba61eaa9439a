"""RMSNorm on offload_moe's CPU kernel: `CpuRMSNorm`, and `use_fast_norms(model)` to swap them in.

A decode step runs two norms per decoder layer (four with Qwen3's q/k norms), each eight small
torch ops in transformers' code (casts, pow, mean, rsqrt, two products); offload_moe.quant.
dense_kernel's `rms_norm16` is one call with the same fp32 arithmetic. Families write RMSNorm in
two ways (the normalised x rounded to the activations' dtype before the weight, or the product in
fp32), and some differently still (Gemma's 1 + weight), so a module is swapped only after the
kernel, in one of its two modes, reproduces that module's own forward on a random input: at
least 99% of the outputs bit-equal (the rest differ by the fp32 sum's order, one rounding step)
and none further than that. What does not match keeps transformers' forward.
"""

from __future__ import annotations

import torch
from torch import nn

from offload_moe.quant import dense_kernel
from offload_moe.quant.cpu_linear import swap_modules

MODES = (0, 1)  # dense_kernel.rms_norm16's: round to x's dtype before the weight / one rounding
_EPS_ATTRS = ("variance_epsilon", "eps")


class CpuRMSNorm(nn.Module):
    """An RMSNorm module's weight Parameter (the same object) and epsilon, computed by rms_norm16."""

    def __init__(self, norm: nn.Module, eps: float, mode: int):
        super().__init__()
        self.weight, self.eps, self.mode = norm.weight, eps, mode
        self.variance_epsilon = eps  # read by code that inspects transformers' norms

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, mode={self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not dense_kernel.available():  # OFFLOAD_MOE_CPU_KERNEL=torch, read per call as by CpuLinear
            return rms_norm_reference(x, self.weight, self.eps, self.mode)
        return dense_kernel.rms_norm16(x, self.weight, self.eps, self.mode, self.out_dtype(x))

    def out_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The output dtype for activations x, as transformers' norm gives it (mode 0: the weight
        times x's dtype, promoted; mode 1: x's)."""
        return torch.promote_types(self.weight.dtype, x.dtype) if self.mode == 0 else x.dtype


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: int) -> torch.Tensor:
    """What rms_norm16 computes, in torch ops (transformers' two ways of writing RMSNorm)."""
    wide = x.float()
    h = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype) if mode == 0 else (weight * h).to(x.dtype)


def norm_epsilon(module: nn.Module) -> float | None:
    """The epsilon of a module that looks like an RMSNorm (a 1-D 16-bit CPU weight Parameter, a
    float epsilon, 'RMSNorm' in its class name), else None."""
    weight = getattr(module, "weight", None)
    eps = next((getattr(module, a) for a in _EPS_ATTRS if isinstance(getattr(module, a, None), float)), None)
    if ("RMSNorm" not in type(module).__name__ or not isinstance(weight, nn.Parameter) or weight.dim() != 1
            or weight.device.type != "cpu" or weight.dtype not in dense_kernel.IO_DTYPES or eps is None):
        return None
    return eps


def matching_mode(module: nn.Module, eps: float, dtype: torch.dtype) -> int | None:
    """The mode in which rms_norm16 reproduces `module` on a random [8, H] input of `dtype` (see
    the module docstring), or None."""
    hidden = module.weight.shape[0]
    x = (torch.randn(8, hidden, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    with torch.no_grad():
        try:
            want = module(x)
        except (RuntimeError, ValueError, TypeError):
            return None
    for mode in MODES:
        fast = CpuRMSNorm(module, eps, mode)(x)
        if fast.shape != want.shape or fast.dtype != want.dtype or not torch.isfinite(want).all():
            continue
        step = torch.finfo(want.dtype).eps * want.float().abs().clamp(min=torch.finfo(want.dtype).tiny)
        close = ((fast.float() - want.float()).abs() <= 2 * step).all()
        if close and (fast == want).float().mean() >= 0.99:
            return mode
    return None


def use_fast_norms(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every RMSNorm module of `model` on the CPU that rms_norm16 reproduces (activations of
    `dtype`, 16-bit: fp32 models are left to torch) by a CpuRMSNorm sharing its weight; returns how
    many were replaced."""
    if dtype not in (torch.float16, torch.bfloat16) or not dense_kernel.available():
        return 0

    def fast(child: nn.Module) -> CpuRMSNorm | None:
        eps = norm_epsilon(child)
        mode = None if eps is None else matching_mode(child, eps, dtype)
        return None if mode is None else CpuRMSNorm(child, eps, mode)

    return swap_modules(model, fast)
