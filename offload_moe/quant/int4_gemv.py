"""The int4 x int8 CPU kernel on one prepared matrix (AVX-512 VNNI, AVX2): `int4_gemv`.

torch's ``_weight_int4pack_mm_for_cpu`` reads the prepared int4 weights at batch 1 well under
the memory bandwidth llama.cpp reads its Q4_0 weights at. `moe_kernel.c`'s ``int4_gemv`` reads
the very same prepared layout (offload_moe.quant.int4_layout: 64-row blocks where torch runs
AVX-512, 32-row blocks with AVX2) and, like llama.cpp's Q4_0 x Q8_0 dot product, rounds each
block of 32 activations to int8 with one fp32 scale, so its inner loop is an integer dot product
(vpdpbusd with AVX-512 VNNI, vpmaddubsw + vpmaddwd with AVX2). From
`moe_kernel.tile_threshold` tokens it takes the kernel's tiled (GEMM) loop, which reads the
weights once for all the tokens. Used for single matrices: quantized attention
(QuantizedLinear), experts computed one by one, through offload_moe.quant.matmul.
`python bench/kernels.py` measures it against torch's kernel (figures in bench/RESULTS.md;
`ATEN_CPU_CAPABILITY=avx2` runs torch, and so this, as on an AVX2-only CPU).

What it computes is the exact product of the dequantized weights with the int8-rounded inputs
(up to fp32 summation order), an error far below the 4-bit weights' own (`python
bench/quality.py`); the tests check it against that definition to 1e-6.

The C file is offload_moe.quant.moe_kernel's (one library for all the int4 x int8 math), built
and loaded by offload_moe.quant.native (once per machine, cached). It runs on x86-64 CPUs with
AVX2 (AVX-512 BW/VNNI/VBMI for the 64-row layout); elsewhere, when no compiler is found, or with
``OFFLOAD_MOE_CPU_KERNEL=torch`` in the environment, torch's kernel is used (with one warning
when the compiler is missing or failed).
"""

from __future__ import annotations

from pathlib import Path

import torch

from offload_moe.quant import moe_kernel, native

X_BLOCK = moe_kernel.X_BLOCK  # activations per int8 scale; the kernel's groups must be multiples of it
DISABLE_ENV = native.DISABLE_ENV  # set to "torch" to use torch's int4 kernel only
compiler = native.compiler
load_kernel = moe_kernel.load_kernel  # the one library (memoised: a fact of the machine)
block_ns = moe_kernel.block_ns  # the layouts (BLOCK_N) it runs here: {64, 32} on AVX-512 VNNI, {32} on AVX2


def build(cache_dir: Path, cc: str) -> Path:
    """Compile the kernel's C file into cache_dir (reused if already there); the path of the library."""
    return native.build(moe_kernel.SOURCE, cache_dir, cc)


def available(block_n: int | None, group: int) -> bool:
    """True if `int4_gemv` can run here on prepared weights of this layout and kernel group."""
    if native.disabled():
        return False
    return group % X_BLOCK == 0 and block_n in block_ns()


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
              block_n: int, tile_min: int | None = None) -> torch.Tensor:
    """x [T, K] @ W^T -> fp32 [T, N] for prepared int4 weights, activations rounded to int8.

    qweight uint8 [N, K/2] and scales_and_zeros bf16 [K/group, N, 2] as int4layout.prepare_for_cpu
    makes them with `block_n` (64 or 32). From `tile_min` tokens (default
    moe_kernel.tile_threshold(block_n), measured) the tiled loop runs. Only call where
    `available(block_n, group)` is True.
    """
    if block_n not in block_ns():
        raise RuntimeError(f"offload_moe's int4 CPU kernel does not run on layout BLOCK_N={block_n} here")
    tokens, in_features = x.shape
    out_features = scales_and_zeros.shape[1]
    if (qweight.dtype != torch.uint8 or qweight.shape != (out_features, in_features // 2)
            or scales_and_zeros.dtype != torch.bfloat16
            or scales_and_zeros.shape != (in_features // group, out_features, 2)
            or in_features % group or group % X_BLOCK or out_features % block_n):
        raise ValueError(f"int4_gemv: inconsistent shapes x {tuple(x.shape)}, qweight {tuple(qweight.shape)} "
                         f"{qweight.dtype}, scales_and_zeros {tuple(scales_and_zeros.shape)} "
                         f"{scales_and_zeros.dtype}, group {group}")
    if not (qweight.is_contiguous() and scales_and_zeros.is_contiguous()):
        raise ValueError("int4_gemv: qweight and scales_and_zeros must be contiguous")
    if not (x.device.type == qweight.device.type == scales_and_zeros.device.type == "cpu"):
        raise ValueError("int4_gemv: x, qweight and scales_and_zeros must be CPU tensors")
    tile = moe_kernel.tile_threshold(block_n) if tile_min is None else tile_min
    xf = x.to(torch.float32).contiguous()
    y = torch.empty(tokens, out_features, dtype=torch.float32)
    status = native.call("offload_moe::int4_gemv", load_kernel().int4_gemv,
        xf.data_ptr(), tokens, in_features, out_features, group, block_n, qweight.data_ptr(),
        scales_and_zeros.data_ptr(), tile, y.data_ptr())
    if status != 0:
        raise MemoryError(f"int4_gemv: could not allocate scratch for {tokens} x {in_features} activations")
    return y
