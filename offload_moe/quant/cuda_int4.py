"""The CUDA int4 path: torch's `_weight_int4pack_mm` on GPU slots filled from the host store.

Which layout the host store holds, and why. The store keeps every quantized expert in the CPU
kernel's layout (offload_moe.quant.int4_layout) whatever the device, because

* hybrid compute of a miss reads the store in place with the CPU kernel (no per-call
  re-layout on the host), and
* one expert stays one contiguous buffer, so one transfer is still one copy.

After an expert's bytes land in a GPU slot, `prepare_expert_slot_` rewrites the slot's qweight
on the GPU, in the copy's stream order, into `_convert_weight_to_int4pack`'s tensor-core layout:
CPU layout -> slot codes (`kernel_codes_from_cpu`, plain tensor ops) -> two codes per byte, the
first in the high nibble (the op's uint8 input) -> the op -> bytes copied back over the slot's
qweight. Both layouts take N*K'/2 bytes (CUDA: int32 [N/8, K'/(16 t), 32, t/2], t inner
k-tiles), so the slot layout is the store's and the fields keep their shapes; only qweight's
bytes differ. scales_and_zeros are the same for both kernels ([K/group, N, 2] bf16,
w = (q - 8) * S + Z) and stay as copied. Per miss that is a few elementwise kernels over the
expert's bytes on the GPU; nothing is re-laid on the host after load.

Rejected: canonical packing in the store (hybrid CPU compute would re-lay it per call, or need
a second host copy); the CUDA layout in the store (the CPU kernel cannot read it).

torch builds these ops for compute capability 8.0+ (Ampere or newer) only.

UNTESTED ON A GPU: the development machines have none. tests/test_gpu.py runs it where CUDA
exists; the parts that are plain tensor code (`cuda_input_from_cpu`, shapes, views) are tested
on the CPU. Signatures used (torch 2.13):
``_convert_weight_to_int4pack(Tensor self /*uint8 [N, K/2]*/, int innerKTiles) -> Tensor``,
``_weight_int4pack_mm(Tensor self /*bf16 [M, K]*/, Tensor mat2, int qGroupSize,
Tensor qScaleAndZeros) -> Tensor``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from offload_moe.errors import ConfigError
from offload_moe.quant.int4_layout import (
    cpu_int4_block_n, expand_input, expanded_groups, kernel_codes_from_cpu, kernel_group, kernel_in_features,
    uses_int4_kernel,
)
from offload_moe.quant.formats import QuantFormat, parse_format
from offload_moe.model.arch import matrix_fields
from offload_moe.model.arch import expert_matrices


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


def convert_matrix_(prepared: dict[str, torch.Tensor], fmt: QuantFormat, in_features: int, block_n: int) -> None:
    """Rewrite one matrix's qweight (on the GPU) from the CPU kernel's layout to the CUDA one."""
    qweight = prepared["qweight"]  # [N, K'/2] uint8
    kernel_in = kernel_in_features(fmt, in_features)
    packed = torch.ops.aten._convert_weight_to_int4pack(
        cuda_input_from_cpu(qweight, kernel_in, block_n), inner_k_tiles(kernel_in)
    )
    qweight.view(-1).copy_(packed.view(torch.uint8).view(-1))


def prepare_expert_slot_(
    fields: dict[str, torch.Tensor], fmt: str | QuantFormat, hidden: int, intermediate: int, block_n: int,
    gated: bool = True,
) -> None:
    """`convert_matrix_` on both matrices of an expert in a GPU slot (prefixed field views).

    Formats off the int4 kernel (nf4, dense) are left as copied."""
    fmt = parse_format(fmt)
    for m in expert_matrices(hidden, intermediate, gated):
        if uses_int4_kernel(fmt, m.out_features):
            convert_matrix_(matrix_fields(fields, m.name), fmt, m.in_features, block_n)


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


def expert_slot_preparer(
    fmt: QuantFormat, hidden: int, intermediate: int, where: str, gated: bool = True
) -> Callable[[dict[str, torch.Tensor]], None] | None:
    """The step every GPU slot gets after an expert is copied in (`prepare_expert_slot_` bound
    to this model's shapes and this host's layout), or None when the format needs none (nf4).
    ConfigError, naming `where`, when the host layout cannot be converted."""
    block_n = cpu_int4_block_n()
    shapes = [m.shape for m in expert_matrices(hidden, intermediate, gated)]
    problem = check_cuda_layout(fmt, shapes, block_n)
    if problem is not None:
        raise ConfigError(f"{where}: {fmt.name} experts cannot take the CUDA int4 kernel: {problem}; "
                          "use device='cpu', experts='nf4' or unquantized experts")
    if not any(uses_int4_kernel(fmt, out_f) for out_f, _ in shapes):
        return None
    return functools.partial(prepare_expert_slot_, fmt=fmt, hidden=hidden, intermediate=intermediate, block_n=block_n,
                             gated=gated)


def int4_linear_cuda(x: torch.Tensor, prepared: dict[str, torch.Tensor], fmt: QuantFormat) -> torch.Tensor:
    """x [T, in] @ W^T -> [T, out] in x's dtype, from a slot converted by `convert_matrix_`."""
    xb = x.to(torch.bfloat16).contiguous()
    if expanded_groups(fmt):
        xb = expand_input(xb, fmt.group_size)
    weight = qweight_view(prepared["qweight"], xb.shape[1])
    y = torch.ops.aten._weight_int4pack_mm(xb, weight, kernel_group(fmt), prepared["scales_and_zeros"])
    return y.to(x.dtype)
