"""The CUDA int4 path of QuantizedLinear (quantized attention): torch's `_weight_int4pack_mm`.

Expert slots do not use it: they keep the store's CPU-kernel layout (offload_moe.quant.int4_layout),
dequantized on the GPU by the fused path (offload_moe.runtime.fused_torch), so nothing is re-laid
after a copy. A QuantizedLinear on a GPU is prepared once, at load: the CPU layout ->
codes (`kernel_codes_from_cpu`, plain tensor ops) -> two codes per byte, the first in the high
nibble (the op's uint8 input) -> `_convert_weight_to_int4pack` -> its int32
[N/8, K'/(16 t), 32, t/2] tensor (t inner k-tiles), kept as the module's qweight. The int32
dtype is what tells `matmul.linear` this layout from the CPU one (uint8 [N, K'/2]).
scales_and_zeros are the same for both kernels ([K/group, N, 2] bf16, w = (q - 8) * S + Z).

torch builds these ops for compute capability 8.0+ (Ampere or newer) only.

The parts that are plain tensor code (`cuda_input_from_cpu`, shapes, views) are tested on the
CPU; tests/test_gpu.py runs the rest where CUDA exists. Signatures used (torch 2.13):
``_convert_weight_to_int4pack(Tensor self /*uint8 [N, K/2]*/, int innerKTiles) -> Tensor``,
``_weight_int4pack_mm(Tensor self /*bf16 [M, K]*/, Tensor mat2, int qGroupSize,
Tensor qScaleAndZeros) -> Tensor``.
"""

from __future__ import annotations

import torch

from offload_moe.quant.int4_layout import (
    expand_input, expanded_groups, kernel_codes_from_cpu, kernel_group, kernel_in_features, uses_int4_kernel,
)
from offload_moe.quant.formats import QuantFormat, parse_format


def inner_k_tiles(kernel_in: int) -> int:
    """The most 16-column k-tiles (8, 4 or 2) packed together that divide `kernel_in`."""
    for tiles in (8, 4, 2):
        if kernel_in % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"the CUDA int4 kernel needs the input dimension to be a multiple of 32, got {kernel_in}")


def int4pack_shape(out_features: int, kernel_in: int) -> tuple[int, int, int, int]:
    """Shape of `_convert_weight_to_int4pack`'s int32 output for a [out, kernel_in] matrix."""
    tiles = inner_k_tiles(kernel_in)
    return (out_features // 8, kernel_in // (16 * tiles), 32, tiles // 2)


def cuda_input_from_cpu(qweight: torch.Tensor, kernel_in: int, block_n: int) -> torch.Tensor:
    """CPU-kernel qweight [N, K'/2] -> `_convert_weight_to_int4pack`'s input, uint8 [N, K'/2]:
    byte (n, i) = code[n, 2i] << 4 | code[n, 2i + 1]. Plain tensor ops, on `qweight`'s device."""
    codes = kernel_codes_from_cpu(qweight, kernel_in, block_n)  # [N, K']
    return ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()


def qweight_view(qweight: torch.Tensor, kernel_in: int) -> torch.Tensor:
    """A slot's qweight bytes [N, K'/2] uint8 seen as the CUDA kernel's int32 tensor (no copy)."""
    return qweight.view(torch.int32).view(int4pack_shape(qweight.shape[0], kernel_in))


def cuda_layout(prepared: dict[str, torch.Tensor], fmt: QuantFormat, in_features: int, block_n: int) -> dict[str, torch.Tensor]:
    """One matrix's CPU-layout fields (on the GPU) -> the CUDA kernel's: qweight int32 (see above)."""
    kernel_in = kernel_in_features(fmt, in_features)
    packed = torch.ops.aten._convert_weight_to_int4pack(
        cuda_input_from_cpu(prepared["qweight"], kernel_in, block_n), inner_k_tiles(kernel_in)
    )
    return {"qweight": packed, "scales_and_zeros": prepared["scales_and_zeros"]}


def check_cuda_layout(fmt: str | QuantFormat, shapes: list[tuple[int, int]], block_n: int | None) -> str | None:
    """Why [out, in] matrices in `fmt` cannot take the CUDA int4 path on this host, or None."""
    fmt = parse_format(fmt)
    for out_f, in_f in shapes:
        if not uses_int4_kernel(fmt, out_f):
            continue
        if block_n is None:
            return "this CPU's int4 packing layout is not one offload_moe can read back"
        if out_f % block_n:
            return f"{out_f} output rows are not whole blocks of {block_n}"
        if kernel_in_features(fmt, in_f) % 32:
            return f"input dimension {in_f} is not a multiple of 32"
    return None


def int4_linear_cuda(x: torch.Tensor, prepared: dict[str, torch.Tensor], fmt: QuantFormat) -> torch.Tensor:
    """x [T, in] @ W^T -> [T, out] in x's dtype, from fields made by `cuda_layout`."""
    xb = x.to(torch.bfloat16).contiguous()
    if expanded_groups(fmt):
        xb = expand_input(xb, fmt.group_size)
    y = torch.ops.aten._weight_int4pack_mm(xb, prepared["qweight"], kernel_group(fmt), prepared["scales_and_zeros"])
    return y.to(x.dtype)
