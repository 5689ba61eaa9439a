"""offload_moe's CPU kernels for few-token products with dense 16-bit and q8 weights.

torch's fp16/bf16 matrix-vector products on the CPU read the weights well under the memory
bandwidth (on AVX2 CPUs several times under it), and attention projections, routers and the LM
head are exactly such products at decode. `dense_kernel.c` widens each fp16 (F16C) or bf16
(a shift) weight to fp32 as it loads it and multiplies with fp32 FMAs, reading nn.Linear's
weight [N, K] where it lies, once per call, each row dotted with every token; q8 weights
(offload_moe.quant.q8) are multiplied with int8-rounded tokens by integer dot products.

Two variants: AVX-512 (F, BW, VL, VNNI) and AVX2 + F16C + FMA. `variant()` follows torch's own
CPU capability, so ``ATEN_CPU_CAPABILITY=avx2`` runs this kernel as on an AVX2-only CPU too.
Built and loaded by offload_moe.quant.native; where it cannot run (not x86-64, no compiler,
``OFFLOAD_MOE_CPU_KERNEL=torch``) `available()` is False and callers use torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from pathlib import Path

import torch

from offload_moe.quant import native

SOURCE = Path(__file__).with_name("dense_kernel.c")
AVX512, AVX2 = 1, 2  # dense_supported() bits, and the variant numbers the C functions take
DTYPES = {torch.float16: 0, torch.bfloat16: 1}  # the 16-bit weight dtypes, as dense16_gemv's flag
IO_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # x, bias and y: the C file's enum dtype
_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot run. Memoised: a fact of the machine."""
    lib = native.load_library(SOURCE, "dense CPU kernel")
    if lib is None or not lib.dense_supported() & AVX2:
        return None
    lib.dense16_gemv.argtypes = [_ptr, _int, _i64, _i64, _i64, _i64, _ptr, _i64, _int, _ptr, _int, _ptr, _int, _int]
    lib.q8_gemv.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _ptr, ctypes.c_int, _ptr]
    lib.rms_norm16.argtypes = [_ptr, _int, _i64, _i64, _ptr, _int, ctypes.c_float, _int, _ptr, _int]
    lib.route_topk.argtypes = [_ptr, _int, _i64, _i64, _i64, _int, _int, _ptr, _ptr, _int]
    lib.dense16_gemv.restype = lib.q8_gemv.restype = lib.rms_norm16.restype = lib.route_topk.restype = ctypes.c_int
    return lib


@functools.cache
def supported_variants() -> frozenset[int]:
    """The variants this CPU runs ({AVX512, AVX2}, {AVX2} or none)."""
    lib = load_kernel()
    bits = lib.dense_supported() if lib is not None else 0
    return frozenset(v for v in (AVX512, AVX2) if bits & v)


@functools.cache
def _native_variant() -> int | None:
    """AVX-512 where both this CPU and torch's capability (fixed when torch starts) have it, else
    AVX2; None where the kernel does not run. Memoised: asked on every 16-bit matmul."""
    if not supported_variants():
        return None
    wide = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return AVX512 if wide and AVX512 in supported_variants() else AVX2


def variant() -> int | None:
    """The variant to run (see `_native_variant`); None also with ``OFFLOAD_MOE_CPU_KERNEL=torch``."""
    return None if native.disabled() else _native_variant()


def available() -> bool:
    return variant() is not None


def _tokens(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != in_features or x.device.type != "cpu":
        raise ValueError(f"dense kernel: x must be a CPU [T, {in_features}] tensor, got {tuple(x.shape)} on {x.device}")
    return x.to(torch.float32).contiguous()


def _profiled(name: str):
    # A named row in torch.profiler tables, only while one records (record_function costs about
    # as much as a small kernel call).
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", True):
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def dense16_gemv(x: torch.Tensor, weight: torch.Tensor, use: int | None = None, *, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x [..., K] (fp32/fp16/bf16, any strides) @ weight.T (+ bias) -> [..., N] of out_dtype (fp32/
    fp16/bf16), weight fp16/bf16 [N, K] with unit column stride (nn.Linear's, as it is), bias [N]
    of any of those dtypes: fp32 sums, rounded once to out_dtype. `use`: the variant (default
    `variant()`)."""
    use = variant() if use is None else use
    if use not in supported_variants():
        raise RuntimeError(f"offload_moe's dense CPU kernel does not run variant {use} here")
    if weight.dtype not in DTYPES or weight.dim() != 2 or weight.stride(1) != 1 or not weight.is_cpu:
        raise ValueError(f"dense16_gemv: weight must be a CPU fp16/bf16 [N, K] matrix with unit column stride, "
                         f"got {weight.dtype} {tuple(weight.shape)} strides {weight.stride()}")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features or not x.is_cpu or x.dtype not in IO_DTYPES:
        raise ValueError(f"dense kernel: x must be a CPU fp32/fp16/bf16 [..., {in_features}] tensor, got "
                         f"{x.dtype} {tuple(x.shape)} on {x.device}")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype not in IO_DTYPES or not bias.is_cpu):
        raise ValueError(f"dense16_gemv: bias must be a CPU fp32/fp16/bf16 [{out_features}] tensor, got "
                         f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")
    if out_dtype not in IO_DTYPES:
        raise ValueError(f"dense16_gemv: out_dtype must be fp32, fp16 or bf16, got {out_dtype}")
    tokens = x.numel() // in_features if in_features else 0
    if x.dim() == 2 and x.stride(1) == 1 and (tokens <= 1 or x.stride(0) >= in_features):
        ldx = x.stride(0) if tokens > 1 else in_features  # rows read in place
    else:
        x, ldx = x.contiguous(), in_features
    bias = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    y = torch.empty(*x.shape[:-1], out_features, dtype=out_dtype)
    if tokens and out_features:
        with _profiled("offload_moe::dense16_gemv"):
            status = load_kernel().dense16_gemv(
                x.data_ptr(), IO_DTYPES[x.dtype], ldx, tokens, in_features, out_features,
                weight.data_ptr(), max(weight.stride(0), 1), DTYPES[weight.dtype],
                None if bias is None else bias.data_ptr(), IO_DTYPES[bias.dtype] if bias is not None else 0,
                y.data_ptr(), IO_DTYPES[out_dtype], use)
        if status != 0:
            raise MemoryError(f"dense16_gemv: could not allocate scratch for {tokens} x {in_features} tokens")
    return y


def q8_gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, use: int | None = None) -> torch.Tensor:
    """round_activations(x) @ dequantize_q8(codes, scales).T -> fp32 [T, N] (offload_moe.quant.q8),
    codes int8 [N, K] and scales fp32 [N, K / 32], both contiguous."""
    use = variant() if use is None else use
    if use not in supported_variants():
        raise RuntimeError(f"offload_moe's dense CPU kernel does not run variant {use} here")
    out_features, in_features = codes.shape
    if (codes.dtype != torch.int8 or scales.dtype != torch.float32 or in_features % 32
            or scales.shape != (out_features, in_features // 32)
            or not (codes.is_contiguous() and scales.is_contiguous())):
        raise ValueError(f"q8_gemv: inconsistent codes {codes.dtype} {tuple(codes.shape)} and scales "
                         f"{scales.dtype} {tuple(scales.shape)} (contiguous int8 [N, K], fp32 [N, K / 32])")
    xf = _tokens(x, in_features)
    y = torch.empty(xf.shape[0], out_features, dtype=torch.float32)
    if xf.shape[0] and out_features:
        with _profiled("offload_moe::q8_gemv"):
            status = load_kernel().q8_gemv(xf.data_ptr(), xf.shape[0], in_features, out_features, codes.data_ptr(),
                                           scales.data_ptr(), use, y.data_ptr())
        if status != 0:
            raise MemoryError(f"q8_gemv: could not allocate scratch for {xf.shape[0]} x {in_features} activations")
    return y


def rms_norm16(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: int, out_dtype: torch.dtype) -> torch.Tensor:
    """transformers' RMSNorm of x [..., H] (fp32/fp16/bf16) with weight [H] -> [..., H] of out_dtype:
    mode 0 rounds the normalised x to x's dtype before the weight (Llama, Mixtral, Qwen3, ...), mode
    1 multiplies in fp32 (gpt-oss); see dense_kernel.c. Runs where `available()`."""
    hidden = weight.shape[-1]
    if (x.shape[-1] != hidden or weight.dim() != 1 or not x.is_cpu or not weight.is_cpu or x.dtype not in IO_DTYPES
            or weight.dtype not in IO_DTYPES or out_dtype not in IO_DTYPES or mode not in (0, 1)):
        raise ValueError(f"rms_norm16: x [..., {hidden}] and weight [{hidden}], CPU fp32/fp16/bf16, mode 0 or 1; got "
                         f"x {x.dtype} {tuple(x.shape)}, weight {weight.dtype} {tuple(weight.shape)}, mode {mode}")
    x = x if x.is_contiguous() else x.contiguous()
    weight = weight if weight.is_contiguous() else weight.contiguous()
    y = torch.empty(x.shape, dtype=out_dtype)
    rows = x.numel() // hidden if hidden else 0
    if rows:
        with _profiled("offload_moe::rms_norm16"):
            load_kernel().rms_norm16(x.data_ptr(), IO_DTYPES[x.dtype], rows, hidden, weight.data_ptr(),
                                     IO_DTYPES[weight.dtype], eps, mode, y.data_ptr(), IO_DTYPES[out_dtype])
    return y


MAX_EXPERTS = 4096  # route_topk's bound on a router's experts


def route_topk(logits: torch.Tensor, k: int, order: int, renorm: bool,
               scores_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices int64 [T, k], scores [T, k] of scores_dtype) of a top-k router's logits [T, E]
    (fp32/fp16/bf16): order 0 softmax then top-k (renorm: divided by their sum), order 1 top-k
    then softmax; see dense_kernel.c. Runs where `available()`."""
    tokens, experts = logits.shape if logits.dim() == 2 else (-1, -1)
    if (tokens < 0 or not logits.is_cpu or logits.dtype not in IO_DTYPES or scores_dtype not in IO_DTYPES
            or order not in (0, 1) or not 1 <= k <= experts or experts > MAX_EXPERTS):
        raise ValueError(f"route_topk: logits must be a CPU fp32/fp16/bf16 [T, E <= {MAX_EXPERTS}] tensor with "
                         f"1 <= k <= E and order 0 or 1, got {logits.dtype} {tuple(logits.shape)}, k={k}, order={order}")
    logits = logits if logits.is_contiguous() else logits.contiguous()
    indices = torch.empty(tokens, k, dtype=torch.int64)
    scores = torch.empty(tokens, k, dtype=scores_dtype)
    if tokens:
        with _profiled("offload_moe::route_topk"):
            load_kernel().route_topk(logits.data_ptr(), IO_DTYPES[logits.dtype], tokens, experts, k, order,
                                     int(renorm), indices.data_ptr(), scores.data_ptr(), IO_DTYPES[scores_dtype])
    return indices, scores
