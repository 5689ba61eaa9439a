"""QuantizedLinear: a drop-in for nn.Linear whose weight is quantized (for attention on small
cards). Routers, norms, embeddings and lm_head are never quantized; only the modules the loader
hands to `quantize_linears` are."""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .int4layout import cpu_int4_block_n, uses_int4_kernel
from .qcuda import check_cuda_layout, convert_matrix_
from .qkernels import linear, prepare_for_cpu
from .quant import QuantFormat, pack, quantize


class QuantizedLinear(nn.Module):
    """y = x @ W^T (+ b) with W stored packed in `fmt`, re-laid once for the kernel of `weight`'s
    device (CPU: int4layout; CUDA: the same, then converted on the GPU as expert slots are)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: QuantFormat, optimize: bool = False):
        super().__init__()
        self.fmt = fmt
        self.out_features, self.in_features = weight.shape
        block_n = cpu_int4_block_n()
        prepared = prepare_for_cpu(pack(quantize(weight.detach().float().cpu(), fmt, optimize=optimize)), fmt,
                                   self.out_features, self.in_features, block_n=block_n)
        if weight.device.type == "cuda":
            prepared = {name: t.to(weight.device) for name, t in prepared.items()}
            if uses_int4_kernel(fmt, self.out_features):
                problem = check_cuda_layout(fmt, [(self.out_features, self.in_features)], block_n)
                if problem is not None:
                    raise ConfigError(f"attention={fmt.name!r} cannot take the CUDA int4 kernel: {problem}")
                convert_matrix_(prepared, fmt, self.in_features, block_n)
        for name, tensor in prepared.items():
            self.register_buffer(name, tensor, persistent=False)
        self._names = list(prepared)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        flat = x.reshape(-1, self.in_features)
        y = linear(flat, {n: getattr(self, n) for n in self._names}, self.fmt).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def quantize_attention(layers: nn.ModuleList, fmt: QuantFormat, optimize: bool = False) -> int:
    """Replace every decoder layer's attention projections with QuantizedLinear; returns how many."""
    count = 0
    for layer in layers:
        attn = layer.self_attn
        for name in ATTENTION_PROJECTIONS:
            module = getattr(attn, name, None)
            if isinstance(module, nn.Linear):
                setattr(attn, name, QuantizedLinear(module.weight, module.bias, fmt, optimize))
                count += 1
    return count
