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

import ctypes
import functools
from collections.abc import Sequence
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
    matrices = [_i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr]  # a GemvGroup's: M, N, w, ldw, bf16, b, bdt
    lib.dense16_gemv_many.argtypes = [_ptr, _int, _i64, _i64, _i64, *matrices, _ptr, _int, _int, _i64, _i64, _ptr, _ptr]
    lib.q8_gemv.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _ptr, ctypes.c_int, _ptr]
    lib.rms_norm16.argtypes = [_ptr, _int, _i64, _i64, _ptr, _int, ctypes.c_float, _int, _ptr, _int]
    lib.route_topk.argtypes = [_ptr, _int, _i64, _i64, _i64, _int, _int, _ptr, _ptr, _int]
    lib.rope16.argtypes = [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _int]
    lib.decode_attention.argtypes = [_ptr, _int, _i64, _i64, _ptr, _ptr, _int, _i64, _i64, _i64, _i64, _i64, _i64,
                                     ctypes.c_float, _ptr, _int, *matrices, _ptr, _int, _int]
    for entry in (lib.dense16_gemv, lib.dense16_gemv_many, lib.q8_gemv, lib.rms_norm16, lib.route_topk, lib.rope16, lib.decode_attention):
        entry.restype = ctypes.c_int
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


def _check_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dtype not in DTYPES or weight.dim() != 2 or weight.stride(1) != 1 or not weight.is_cpu:
        raise ValueError(f"dense16_gemv: weight must be a CPU fp16/bf16 [N, K] matrix with unit column stride, "
                         f"got {weight.dtype} {tuple(weight.shape)} strides {weight.stride()}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype not in IO_DTYPES or not bias.is_cpu):
        raise ValueError(f"dense16_gemv: bias must be a CPU fp32/fp16/bf16 [{weight.shape[0]}] tensor, got "
                         f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")


def _gemv_tokens(x: torch.Tensor, in_features: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, int, int]:
    """(x as the kernel reads it, its row stride, its token count) after checking x and out_dtype."""
    if x.dim() < 1 or x.shape[-1] != in_features or not x.is_cpu or x.dtype not in IO_DTYPES:
        raise ValueError(f"dense kernel: x must be a CPU fp32/fp16/bf16 [..., {in_features}] tensor, got "
                         f"{x.dtype} {tuple(x.shape)} on {x.device}")
    if out_dtype not in IO_DTYPES:
        raise ValueError(f"dense16_gemv: out_dtype must be fp32, fp16 or bf16, got {out_dtype}")
    tokens = x.numel() // in_features if in_features else 0
    if x.dim() == 2 and x.stride(1) == 1 and (tokens <= 1 or x.stride(0) >= in_features):
        return x, (x.stride(0) if tokens > 1 else in_features), tokens  # rows read in place
    return x.contiguous(), in_features, tokens


def dense16_gemv(x: torch.Tensor, weight: torch.Tensor, use: int | None = None, *, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x [..., K] (fp32/fp16/bf16, any strides) @ weight.T (+ bias) -> [..., N] of out_dtype (fp32/
    fp16/bf16), weight fp16/bf16 [N, K] with unit column stride (nn.Linear's, as it is), bias [N]
    of any of those dtypes: fp32 sums, rounded once to out_dtype. `use`: the variant (default
    `variant()`)."""
    use = variant() if use is None else use
    if use not in supported_variants():
        raise RuntimeError(f"offload_moe's dense CPU kernel does not run variant {use} here")
    _check_weight(weight, bias)
    out_features, in_features = weight.shape
    x, ldx, tokens = _gemv_tokens(x, in_features, out_dtype)
    bias = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    y = torch.empty(*x.shape[:-1], out_features, dtype=out_dtype)
    if tokens and out_features:
        status = native.call("offload_moe::dense16_gemv", load_kernel().dense16_gemv,
            x.data_ptr(), IO_DTYPES[x.dtype], ldx, tokens, in_features, out_features, weight.data_ptr(),
            max(weight.stride(0), 1), DTYPES[weight.dtype], None if bias is None else bias.data_ptr(),
            IO_DTYPES[bias.dtype] if bias is not None else 0, y.data_ptr(), IO_DTYPES[out_dtype], use)
        if status != 0:
            raise MemoryError(f"dense16_gemv: could not allocate scratch for {tokens} x {in_features} tokens")
    return y


MAX_MATRICES = 8  # dense16_gemv_many's (dense_kernel.c)


class GemvGroup:
    """Matrices multiplied with the same tokens in one dense16_gemv_many call (an attention layer's
    q, k and v projections; its output projection, called by decode_attention), checked and their
    pointers listed once (`matrices`, the C arguments): a call only checks x. Holds the weights
    and biases it points into."""

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]):
        if not 1 <= len(weights) <= MAX_MATRICES or len(biases) != len(weights):
            raise ValueError(f"dense16_gemv_many: 1..{MAX_MATRICES} weights, one bias (or None) each; got "
                             f"{len(weights)} weights, {len(biases)} biases")
        self.in_features = weights[0].shape[-1]
        for weight, bias in zip(weights, biases):
            _check_weight(weight, bias)
            if weight.shape[1] != self.in_features:
                raise ValueError(f"dense16_gemv_many: every weight must take {self.in_features} features, got "
                                 f"{tuple(weight.shape)}")
        biases = [b if b is None or b.is_contiguous() else b.contiguous() for b in biases]
        self._keep = (list(weights), biases)
        sizes = [w.shape[0] for w in weights]
        self.out_features, m, i64, c_int = sum(sizes), len(weights), ctypes.c_int64, ctypes.c_int
        self.matrices = (m, (i64 * m)(*sizes), (i64 * m)(*[w.data_ptr() for w in weights]),
                          (i64 * m)(*[max(w.stride(0), 1) for w in weights]), (c_int * m)(*[DTYPES[w.dtype] for w in weights]),
                          (i64 * m)(*[0 if b is None else b.data_ptr() for b in biases]),
                          (c_int * m)(*[0 if b is None else IO_DTYPES[b.dtype] for b in biases]))

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype, use: int | None = None, *,
                 rotary: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        """x [..., K] @ each weight.T (+ its bias), side by side -> [..., sum N] of out_dtype. rotary
        (cos, sin [T, D], heads): then the first `heads` heads of D columns of each token's result
        (q and k) are rotated in place as rope16 rotates them (out_dtype 16-bit)."""
        use = variant() if use is None else use
        if use not in supported_variants():
            raise RuntimeError(f"offload_moe's dense CPU kernel does not run variant {use} here")
        x, ldx, tokens = _gemv_tokens(x, self.in_features, out_dtype)
        cos, sin, heads, dim = _rotary(rotary, tokens, self.out_features, out_dtype)
        y = torch.empty(*x.shape[:-1], self.out_features, dtype=out_dtype)
        if tokens and self.out_features:
            status = native.call("offload_moe::dense16_gemv", load_kernel().dense16_gemv_many,
                x.data_ptr(), IO_DTYPES[x.dtype], ldx, tokens, self.in_features, *self.matrices, y.data_ptr(),
                IO_DTYPES[out_dtype], use, heads, dim, None if cos is None else cos.data_ptr(),
                None if sin is None else sin.data_ptr())
            if status != 0:
                raise MemoryError(f"dense16_gemv_many: could not allocate scratch for {tokens} x {self.in_features} tokens")
        return y


def _rotary(rotary: tuple[torch.Tensor, torch.Tensor, int] | None, tokens: int, columns: int,
            dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None, int, int]:
    """(cos, sin contiguous, heads, head dim) of a GemvGroup call's rotary after checking it."""
    if rotary is None:
        return None, None, 0, 0
    cos, sin, heads = rotary
    dim = cos.shape[-1]
    if (dtype not in KV_DTYPES or dim % 2 or not 2 <= dim <= MAX_HEAD_DIM or heads < 1 or heads * dim > columns
            or any(t.shape != (tokens, dim) or t.dtype != dtype or not t.is_cpu for t in (cos, sin))):
        raise ValueError(f"dense16_gemv_many: rotary needs 16-bit results and cos, sin [{tokens}, D] of their dtype, "
                         f"even D <= {MAX_HEAD_DIM}, heads * D <= {columns}; got {dtype}, cos {cos.dtype} "
                         f"{tuple(cos.shape)}, sin {sin.dtype} {tuple(sin.shape)}, {heads} heads")
    return cos.contiguous(), sin.contiguous(), heads, dim


def dense16_gemv_many(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                      out_dtype: torch.dtype, use: int | None = None) -> torch.Tensor:
    """dense16_gemv of x [..., K] with each of `weights` (and its bias, or None), the results side
    by side -> [..., sum N] of out_dtype, in one call: one parallel pass over all the matrices.
    Each weight and bias as dense16_gemv takes them (see GemvGroup, which checks them once)."""
    return GemvGroup(weights, biases)(x, out_dtype, use)


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
        status = native.call("offload_moe::q8_gemv", load_kernel().q8_gemv,
            xf.data_ptr(), xf.shape[0], in_features, out_features, codes.data_ptr(), scales.data_ptr(), use,
            y.data_ptr())
        if status != 0:
            raise MemoryError(f"q8_gemv: could not allocate scratch for {xf.shape[0]} x {in_features} activations")
    return y


def _check_norm(x: torch.Tensor, weight: torch.Tensor, mode: int, out_dtype: torch.dtype) -> int:
    """H after checking an RMSNorm's x [..., H], weight [H], mode and output dtype."""
    hidden = weight.shape[-1]
    if (x.shape[-1] != hidden or weight.dim() != 1 or not x.is_cpu or not weight.is_cpu or x.dtype not in IO_DTYPES
            or weight.dtype not in IO_DTYPES or out_dtype not in IO_DTYPES or mode not in (0, 1)):
        raise ValueError(f"rms_norm16: x [..., {hidden}] and weight [{hidden}], CPU fp32/fp16/bf16, mode 0 or 1; got "
                         f"x {x.dtype} {tuple(x.shape)}, weight {weight.dtype} {tuple(weight.shape)}, mode {mode}")
    return hidden


def rms_norm16(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: int, out_dtype: torch.dtype) -> torch.Tensor:
    """transformers' RMSNorm of x [..., H] (fp32/fp16/bf16) with weight [H] -> [..., H] of out_dtype:
    mode 0 rounds the normalised x to x's dtype before the weight (Llama, Mixtral, Qwen3, ...), mode
    1 multiplies in fp32 (gpt-oss); see dense_kernel.c. Runs where `available()`."""
    hidden = _check_norm(x, weight, mode, out_dtype)
    x = x if x.is_contiguous() else x.contiguous()
    weight = weight if weight.is_contiguous() else weight.contiguous()
    y = torch.empty(x.shape, dtype=out_dtype)
    rows = x.numel() // hidden if hidden else 0
    if rows:
        native.call("offload_moe::rms_norm16", load_kernel().rms_norm16,
            x.data_ptr(), IO_DTYPES[x.dtype], rows, hidden, weight.data_ptr(), IO_DTYPES[weight.dtype], eps, mode,
            y.data_ptr(), IO_DTYPES[out_dtype])
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
        native.call("offload_moe::route_topk", load_kernel().route_topk,
            logits.data_ptr(), IO_DTYPES[logits.dtype], tokens, experts, k, order, int(renorm), indices.data_ptr(),
            scores.data_ptr(), IO_DTYPES[scores_dtype])
    return indices, scores


MAX_HEAD_DIM = 512  # rope16's and decode_attention's bound on head_dim (dense_kernel.c)
KV_DTYPES = (torch.float16, torch.bfloat16)


def rope16(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [R, H, D] (fp16/bf16, contiguous) in place as transformers' apply_rotary_pos_emb does
    in x's dtype (x * cos + rotate_half(x) * sin, each op rounded), cos and sin [R, D] of x's dtype
    (row r for every head of row r); returns x. Runs where `available()`."""
    rows, heads, dim = x.shape if x.dim() == 3 else (-1, -1, -1)
    if (rows < 0 or x.dtype not in KV_DTYPES or not x.is_contiguous() or not x.is_cpu or dim % 2 or dim > MAX_HEAD_DIM
            or any(t.shape != (rows, dim) or t.dtype != x.dtype or not t.is_cpu for t in (cos, sin))):
        raise ValueError(f"rope16: x must be a contiguous CPU fp16/bf16 [R, H, D] tensor (even D <= {MAX_HEAD_DIM}) "
                         f"and cos, sin [R, D] of its dtype; got x {x.dtype} {tuple(x.shape)}, cos {cos.dtype} "
                         f"{tuple(cos.shape)}, sin {sin.dtype} {tuple(sin.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    if x.numel():
        native.call("offload_moe::rope16", load_kernel().rope16,
            x.data_ptr(), rows, heads, dim, heads * dim, cos.data_ptr(), sin.data_ptr(), IO_DTYPES[x.dtype])
    return x


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, out_dtype: torch.dtype,
                     output: GemvGroup | None = None, use: int | None = None) -> torch.Tensor:
    """softmax(scale * q k^T) v -> [Hq, D] of out_dtype for one query row per head: q [Hq, D]
    (fp32/fp16/bf16), k and v [Hkv, L, D] (fp16/bf16, unit stride along D, read in place), query
    head h reading KV head h // (Hq // Hkv); no mask (every position attended), fp32 arithmetic,
    rounded once (see dense_kernel.c). With `output` (a GemvGroup taking Hq * D features, the
    output projection): that product of the result as one token instead, [sum N] of out_dtype,
    in the same call. Runs where `available()`."""
    heads, dim = q.shape if q.dim() == 2 else (-1, -1)
    kv_heads, length = (k.shape[0], k.shape[1]) if k.dim() == 3 else (-1, -1)
    if (heads < 0 or kv_heads < 1 or dim % 8 or not 8 <= dim <= MAX_HEAD_DIM or heads % kv_heads or length < 1
            or q.dtype not in IO_DTYPES or out_dtype not in IO_DTYPES or k.dtype not in KV_DTYPES
            or v.dtype != k.dtype or k.shape != (kv_heads, length, dim) or v.shape != k.shape
            or k.stride(-1) != 1 or v.stride(-1) != 1 or not (q.is_cpu and k.is_cpu and v.is_cpu)
            or (output is not None and output.in_features != heads * dim)):
        raise ValueError(f"decode_attention: q [Hq, D] and k, v [Hkv, L >= 1, D] (16-bit, unit stride along D) on the "
                         f"CPU with D a multiple of 8 up to {MAX_HEAD_DIM}, Hq a multiple of Hkv and an output "
                         f"projection of Hq * D features; got q {q.dtype} {tuple(q.shape)}, k {k.dtype} "
                         f"{tuple(k.shape)}, v {v.dtype} {tuple(v.shape)}")
    use = variant() if use is None else use
    if use not in supported_variants():
        raise RuntimeError(f"offload_moe's dense CPU kernel does not run variant {use} here")
    q = q if q.is_contiguous() else q.contiguous()
    out = torch.empty(heads, dim, dtype=out_dtype)
    projected = None if output is None else torch.empty(output.out_features, dtype=out_dtype)
    matrices = (0, None, None, None, None, None, None) if output is None else output.matrices
    status = native.call("offload_moe::decode_attention", load_kernel().decode_attention,
        q.data_ptr(), IO_DTYPES[q.dtype], heads, dim, k.data_ptr(), v.data_ptr(), IO_DTYPES[k.dtype], kv_heads,
        length, k.stride(0), k.stride(1), v.stride(0), v.stride(1), scale, out.data_ptr(), IO_DTYPES[out_dtype],
        *matrices, None if projected is None else projected.data_ptr(), IO_DTYPES[out_dtype], use)
    if status != 0:
        raise MemoryError("decode_attention: could not allocate scratch for the output projection")
    return out if projected is None else projected
