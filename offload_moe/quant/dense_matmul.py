"""y = x @ W^T on the CPU for 16-bit and q8 weights: the few-token kernel or the many-token path.

Few tokens (decode): offload_moe.quant.dense_kernel reads the weight once at memory speed.
Many tokens (prefill): torch's fp32 matmul is fast on every x86 CPU while its 16-bit one often is
not (on AVX2 a fraction of it), so the weight is widened to fp32 256 rows at a time into a buffer
the model's linears share (`Workspace`, allocated once at its largest size) and multiplied there
with torch.mm, the tokens widened once. Where torch's own 16-bit matmul is the faster (CPUs with
AMX or AVX512-FP16 paths) it is used instead. Which path a call takes is a `Switch`, measured on
the running CPU (offload_moe.quant.dense_switch).

`dense_matmul` returns its product in the dtype asked for (the kernel rounds its fp32 sums
once, into it); `q8_matmul` returns fp32 and the caller casts. Inference only: nothing here
records gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from offload_moe.quant import dense_kernel
from offload_moe.quant.q8 import BLOCK as Q8_BLOCK

TILE_ROWS = 256  # weight rows widened to fp32 per torch.mm: 2 MiB at K = 2048, cache-sized


@dataclass(frozen=True)
class Switch:
    """Which path a product takes. gemv_max_tokens: the few-token kernel up to this many tokens
    (0: never); native_prefill: above it, torch's own 16-bit matmul rather than fp32 tiles."""

    gemv_max_tokens: int
    native_prefill: bool = False


class Workspace:
    """One fp32 scratch buffer for the tiles of many linears (one model runs one product at a time)."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.float32)

    def tile(self, rows: int, cols: int) -> torch.Tensor:  # [rows, cols] fp32, valid until the next call
        if self._buffer.numel() < rows * cols:
            self._buffer = torch.empty(rows * cols, dtype=torch.float32)
        return self._buffer[: rows * cols].view(rows, cols)


TileFill = Callable[[int, int, torch.Tensor], None]  # (n0, n1, out [n1 - n0, K] fp32): rows n0..n1 of W


def tiled_fp32(x: torch.Tensor, fill: TileFill, out_features: int, workspace: Workspace) -> torch.Tensor:
    """x [T, K] @ W^T -> fp32 [T, N], W given by `fill` in fp32 tiles of TILE_ROWS rows."""
    xf = x.to(torch.float32)
    y_t = torch.empty(out_features, xf.shape[0], dtype=torch.float32)  # [N, T]: each tile's rows contiguous
    for n0 in range(0, out_features, TILE_ROWS):
        n1 = min(out_features, n0 + TILE_ROWS)
        tile = workspace.tile(n1 - n0, xf.shape[1])
        fill(n0, n1, tile)
        torch.mm(tile, xf.t(), out=y_t[n0:n1])
    return y_t.t()


def widen_rows(weight: torch.Tensor) -> TileFill:
    return lambda n0, n1, out: out.copy_(weight[n0:n1])


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor) -> TileFill:
    """offload_moe.quant.q8.dequantize_q8 of rows n0..n1, written into the tile."""
    def fill(n0: int, n1: int, out: torch.Tensor) -> None:
        blocks = out.view(n1 - n0, -1, Q8_BLOCK)  # [rows, K / 32, 32]
        torch.mul(codes[n0:n1].view(n1 - n0, -1, Q8_BLOCK), scales[n0:n1].unsqueeze(-1), out=blocks)
    return fill


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, workspace: Workspace,
                 switch: Switch, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ weight.T + bias -> [..., N] of out_dtype (default x's), contiguous, for a 16-bit
    weight [N, K] (nn.Linear's)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    tokens = x.numel() // weight.shape[1] if weight.shape[1] else 0
    use = dense_kernel.variant() if tokens <= switch.gemv_max_tokens else None  # (the environment read once)
    if use is not None:
        return dense_kernel.dense16_gemv(x, weight, use, bias=bias, out_dtype=out_dtype)
    flat = x.reshape(-1, weight.shape[1])
    weight, bias = weight.detach(), None if bias is None else bias.detach()  # inference only (see above)
    if switch.native_prefill or tokens <= switch.gemv_max_tokens:
        y = F.linear(flat.to(weight.dtype), weight, bias)
    else:
        y = tiled_fp32(flat, widen_rows(weight), weight.shape[0], workspace)
        y = y if bias is None else y.add_(bias)
    y = y.contiguous() if y.dtype == out_dtype else y.to(out_dtype, memory_format=torch.contiguous_format)
    return y.view(*x.shape[:-1], weight.shape[0])


def q8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
              workspace: Workspace, switch: Switch) -> torch.Tensor:
    """x [T, K] @ W^T + bias -> fp32 [T, N] for q8 weights: the kernel (tokens rounded to int8) for
    few tokens, else exact fp32 products with the dequantized tiles."""
    bias = None if bias is None else bias.detach()
    if x.shape[0] <= switch.gemv_max_tokens and dense_kernel.available():
        y = dense_kernel.q8_gemv(x, codes, scales)
    else:
        y = tiled_fp32(x, dequantize_rows(codes, scales), codes.shape[0], workspace)
    return y if bias is None else y.add_(bias)
