"""Dequantize the same matrix of n experts at once, with a fixed number of tensor ops.

The fused device path (offload_moe.runtime.fused_torch) turns the packed matrices of all the
experts of a call into one dense tile and multiplies with batched matmuls, so the number of
kernel launches does not depend on how many experts were routed. Each function here is a few
elementwise ops over [n, ...] tensors, writing straight into a preallocated output (the tile),
on whatever device the inputs live; no loop over experts or rows, no host sync.

* CPU int4 layout (offload_moe.quant.int4_layout, what the store holds for the affine formats):
  the weight is ``(q - 8) * S + Z``, computed here as ``q * S + (Z - 8 S)`` in fp32 by one
  ``addcmul`` per nibble (``Z - 8 S`` is exact in fp32 for bf16 S and Z of comparable size,
  and ``q * S`` is exact, so the one rounding is the add's, as in `dequantize_cpu_blocks`),
  rounded once to the tile's dtype. The result is W^T ``[n, in, out]``: each block of the
  layout is already ``[K', BLOCK_N]``, so writes are runs of BLOCK_N/2 values.
* nf4 (canonical bytes, first code in the high nibble): one gather per byte from the 256-entry
  table of value pairs (`matmul.nf4_byte_table`, kept on the device), times the block's absmax;
  the result is W ``[n, out, in]``.
"""

from __future__ import annotations

import torch

from offload_moe.quant.formats import QuantFormat
from offload_moe.quant.int4_layout import kernel_group


def dequantize_int4_experts(
    qweight: torch.Tensor,  # uint8 [n, out, K'/2]: n matrices in the CPU kernel's layout
    sz: torch.Tensor,  # bf16 [n, in/group, out, 2]: their scales_and_zeros (S, Z)
    fmt: QuantFormat,
    in_features: int,
    block_n: int,
    out: torch.Tensor,  # [n, in, out] contiguous, any float dtype: receives W^T
) -> torch.Tensor:
    """W^T of n matrices straight from the CPU int4 layout (6 tensor ops, any n); returns `out`."""
    n, out_features = qweight.shape[:2]
    if out_features % block_n:
        raise ValueError(f"{out_features} rows are not whole blocks of {block_n}")
    blocks, half = out_features // block_n, block_n // 2
    group, groups = fmt.group_size, in_features // fmt.group_size
    # [n, nb, G, kernel group, half] -> the real columns, ordered as W^T: [n, G, group, nb, half]
    codes = qweight.view(n, blocks, groups, kernel_group(fmt), half)[:, :, :, :group].permute(0, 2, 3, 1, 4)
    params = sz.float()  # [n, G, out, 2]
    scale = params[..., 0].view(n, groups, 1, blocks, 2, half)  # lo/hi nibble rows of each block
    offset = torch.sub(params[..., 1], params[..., 0], alpha=8).view(n, groups, 1, blocks, 2, half)  # Z - 8 S
    target = out.view(n, groups, group, blocks, 2, half)
    torch.addcmul(offset[..., 0, :], codes & 0x0F, scale[..., 0, :], out=target[..., 0, :])
    torch.addcmul(offset[..., 1, :], codes >> 4, scale[..., 1, :], out=target[..., 1, :])
    return out


def dequantize_nf4_experts(
    qweight: torch.Tensor,  # uint8 [n, out, in/2]: canonical nf4 bytes
    absmax: torch.Tensor,  # fp32 [n, out, in/64]
    table: torch.Tensor,  # int64 [256] on the same device: matmul.nf4_byte_table
    out: torch.Tensor,  # [n, out, in] contiguous, any float dtype: receives W
) -> torch.Tensor:
    """W of n nf4 matrices (3 tensor ops, any n); returns `out`."""
    n, out_features, groups = absmax.shape
    pairs = table.index_select(0, qweight.reshape(-1).to(torch.int32)).view(torch.float32)  # [n*out*in]
    torch.mul(pairs.view(n, out_features, groups, -1), absmax.unsqueeze(-1), out=out.view(n, out_features, groups, -1))
    return out
