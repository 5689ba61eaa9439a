"""QuantizedLinear: a drop-in for nn.Linear whose weight is quantized (for attention on small
cards). Routers, norms, embeddings and lm_head are never quantized; only the modules the loader
hands to `quantize_linears` are."""

from __future__ import annotations

import torch
from torch import nn

from offload_moe.errors import ConfigError
from offload_moe.quant.int4_layout import cpu_int4_block_n, uses_int4_kernel
from offload_moe.quant.cuda_int4 import check_cuda_layout, cuda_layout
from offload_moe.quant.matmul import linear, prepare_for_cpu
from offload_moe.quant.quantize import pack, quantize
from offload_moe.quant.formats import FormatKind, QuantFormat, check_shape
from offload_moe.quant.cpu_linear import Q8Linear, q8_fits
from offload_moe.quant.dense_matmul import Workspace


class QuantizedLinear(nn.Module):
    """y = x @ W^T (+ b) with W stored packed in `fmt`, re-laid once for the kernel of `weight`'s
    device (CPU: int4layout; CUDA: the same, then converted on the GPU for torch's CUDA int4 kernel)."""

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
                prepared = cuda_layout(prepared, fmt, self.in_features, block_n)
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


ATTENTION_NAMES = ("self_attn", "attn", "attention")  # what the families call their attention modules


def quantize_attention(model: nn.Module, fmt: QuantFormat, optimize: bool = False,
                       workspace: Workspace | None = None) -> int:
    """Replace the linear layers directly inside every attention module (q/k/v/o projections,
    DBRX's Wqkv/out_proj, DeepSeek's MLA projections) with QuantizedLinear (Q8Linear for q8,
    CPU only, sharing `workspace`); a projection whose input width the format's groups do not
    divide stays 16-bit. Returns how many were replaced."""
    targets = [
        (attn, name, child)
        for path, attn in model.named_modules()
        if path.rpartition(".")[2] in ATTENTION_NAMES
        for name, child in attn.named_children()
        if isinstance(child, nn.Linear)
    ]
    if fmt.kind is FormatKind.INT8:
        workspace = Workspace() if workspace is None else workspace
        fitting = [(attn, name, child) for attn, name, child in targets if q8_fits(child)]
        for attn, name, linear_layer in fitting:
            setattr(attn, name, Q8Linear(linear_layer, workspace))
        return len(fitting)
    count = 0
    for attn, name, linear_layer in targets:
        try:
            check_shape(fmt, linear_layer.out_features, linear_layer.in_features)
        except ConfigError:
            continue
        setattr(attn, name, QuantizedLinear(linear_layer.weight, linear_layer.bias, fmt, optimize))
        count += 1
    return count
