"""Quantized expert matmuls: x @ W^T for packed weights, on the kernel that suits the call.

Paths (`matmul_path` picks one per call):

* "int8-cpu": offload_moe's own kernel (offload_moe.quant.int4_gemv, AVX-512 VNNI or AVX2) on the same prepared
  weights, activations rounded to int8 in blocks of 32 as llama.cpp's Q8_0, faster than
  torch's at batch 1 (`python bench/kernels.py`, bench/RESULTS.md). Taken wherever it
  runs (`int4_gemv.available`); otherwise:
* "int4-cpu": torch's int4 CPU kernel ``_weight_int4pack_mm_for_cpu`` on weights re-laid once
  at load (offload_moe.quant.int4_layout); hqq4/hqq3/hqq2g64 directly, hqq2 (group 16) with expanded
  groups. Faster than bf16 dense for few tokens; its time grows about linearly with tokens.
* "dequant-cpu" (prefill): from `prefill_threshold` tokens (per kernel and format kind, measured on the running CPU at first use and cached next to the built kernel) the
  prepared weights are dequantized to the compute dtype once per call, a chunk of rows at a
  time, and multiplied with torch's dense matmul, which costs less per token than either int4
  kernel (offload_moe's own takes its tiled loop for many tokens, reading the weights once, but
  still pays the int8 rounding and integer dot products per token; `python bench/kernels.py
  --prefill`, bench/RESULTS.md).
* "int4-cuda": torch's ``_weight_int4pack_mm`` for QuantizedLinear on a GPU (offload_moe.quant.cuda_int4);
  expert slots keep the CPU layout there and take "dequant-cpu" when computed one by one (the
  fused path, offload_moe.runtime.fused_torch, computes them together).
* nf4 (no exact affine mapping onto the int4 kernels: its codebook is not affine in the code)
  dequantizes 256 rows at a time (one gather per byte from a 256-entry table of value pairs)
  and multiplies in fp32 (torch's bf16 CPU matmul is very slow on chunks that small; fp32 is
  not); slower than bf16 at batch 1.

All functions are pure: tensors in, tensors out; no module state (the measured thresholds are
memoised per process: facts of the machine).
"""

from __future__ import annotations

import functools
import math
import statistics
import time

import torch
import torch.nn.functional as F

from offload_moe.quant.int4_layout import (
    FieldSpec, cpu_int4_block_n, dequantize_cpu_blocks, expand_input, expanded_groups, kernel_group,
    kernel_in_features, prepare_for_cpu, prepared_fields,
)
from offload_moe.quant import int4_gemv, moe_kernel, native
from offload_moe.quant.cuda_int4 import int4_linear_cuda
from offload_moe.quant.quantize import NF4_CODEBOOK, dequantize, packed_fields, unpack
from offload_moe.quant.formats import QuantFormat, parse_format
from offload_moe.model.arch import matrix_fields
from offload_moe.quant.formats import FormatKind
from offload_moe.model.arch import expert_matrices

_DEQUANT_ROWS = 256  # rows dequantized at a time on the fallback path (4 MiB fp32: stays in cache)
PREFILL_FILE = "prefill_threshold.json"  # the measured thresholds, in native.kernel_dir()
# Token counts both paths are timed at: their costs are linear in tokens (a fixed cost for the
# dequantization plus a cost per token), so two points give the crossing, inside or beyond them.
_PREFILL_FIT_TOKENS = (32, 256)
_PREFILL_NEVER = 1 << 16  # the threshold where the prefill path's cost per token is not the lower one
_PREFILL_SHAPE = (1024, 1024)  # [out, in] of the measured matrix: both paths' costs scale with its size
_PREFILL_CHUNK_ROWS = 256  # output rows dequantized per chunk (2-4 MiB of temporaries stay in cache)


# ---------------------------------------------------------------------------------------------
# matmuls


def linear(x: torch.Tensor, prepared: dict[str, torch.Tensor], fmt: str | QuantFormat) -> torch.Tensor:
    """x [T, in] @ W^T -> [T, out] in x's dtype, for one prepared (or canonical nf4/dense) matrix.

    The path is `matmul_path`'s: the int4 kernels compute in bf16 (fp32 accumulation; fp32
    and fp16 inputs are rounded to bf16 first: torch's fp32 CPU variant is far slower,
    and the rounding is far below 2-4 bit quantization error); the prefill path dequantizes
    to x's dtype; nf4 and other canonical fields take `dequant_linear` (fp32).
    """
    fmt = parse_format(fmt)
    if fmt.kind is FormatKind.DENSE:
        weight = prepared["weight"]
        return F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype))
    if "scales_and_zeros" not in prepared:
        return dequant_linear(x, prepared, fmt)
    if x.shape[0] == 0:
        return x.new_empty(0, prepared["scales_and_zeros"].shape[1])
    block_n = cpu_int4_block_n() if x.device.type == "cpu" else None
    own_kernel = x.device.type == "cpu" and int4_gemv.available(block_n, kernel_group(fmt))
    if x.device.type != "cpu":  # the CPU layout on a device (an expert slot) is read with the store's block_n
        block_n = cpu_int4_block_n()
    cuda_layout = prepared["qweight"].dtype == torch.int32  # cuda_int4.cuda_layout's, not the CPU layout
    path = matmul_path(x.device.type, x.shape[0], fmt, prepared["scales_and_zeros"].shape[1], block_n, own_kernel,
                       cuda_layout)
    if path == "int4-cuda":
        return int4_linear_cuda(x, prepared, fmt)
    if path == "dequant-cpu":
        return prefill_linear(x, prepared, fmt, block_n)
    if path == "int8-cpu":
        return int8_cpu_linear(x, prepared, fmt, block_n)
    return int4_cpu_linear(x, prepared, fmt)


def int8_cpu_linear(x: torch.Tensor, prepared: dict[str, torch.Tensor], fmt: QuantFormat,
                    block_n: int | None = None) -> torch.Tensor:
    """x [T, in] @ W^T -> [T, out] in x's dtype through offload_moe's own kernel (offload_moe.quant.int4_gemv):
    the prepared int4 weights (layout `block_n`, default this machine's) times the activations
    rounded to int8 in blocks of 32."""
    xk = expand_input(x, fmt.group_size) if expanded_groups(fmt) else x
    block_n = cpu_int4_block_n() if block_n is None else block_n
    y = int4_gemv.int4_gemv(xk, prepared["qweight"], prepared["scales_and_zeros"], kernel_group(fmt), block_n)
    return y.to(x.dtype)


def int4_cpu_linear(x: torch.Tensor, prepared: dict[str, torch.Tensor], fmt: QuantFormat) -> torch.Tensor:
    """x [T, in] @ W^T -> [T, out] in x's dtype through torch's int4 CPU kernel (any T)."""
    xb = x.to(torch.bfloat16).contiguous()
    if expanded_groups(fmt):
        xb = expand_input(xb, fmt.group_size)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        xb, prepared["qweight"], kernel_group(fmt), prepared["scales_and_zeros"]
    )
    return y.to(x.dtype)


def prefill_threshold(fmt: QuantFormat, own_kernel: bool = False, block_n: int | None = None) -> int:
    """Tokens from which dequantize + matmul beats the few-token CPU kernel here: torch's int4
    kernel, or with `own_kernel` offload_moe's on layout `block_n` (64: AVX-512). Measured at first
    use (`measure_prefill_threshold`) and cached next to the built kernel, per kernel, format kind
    (expanded groups or not) and CPU; memoised per process."""
    return _prefill_threshold(own_kernel, block_n if own_kernel else cpu_int4_block_n(), expanded_groups(fmt))


@functools.cache
def _prefill_threshold(own_kernel: bool, block_n: int, expanded: bool) -> int:
    cc = native.compiler()
    build = native.build_key(moe_kernel.SOURCE, cc) if own_kernel and cc else f"torch-{torch.__version__}"
    key = "|".join((build, native.cpu_model(), torch.backends.cpu.get_cpu_capability(), f"block_n={block_n}",
                    f"expanded={expanded}"))
    return native.cached_measurement(PREFILL_FILE, key, lambda: measure_prefill_threshold(own_kernel, block_n, expanded),
                                     native.count_entry)


def measure_prefill_threshold(own_kernel: bool, block_n: int, expanded: bool, repeats: int = 3) -> int:
    """Tokens from which `prefill_linear` is as fast as the few-token kernel (torch's, or with
    `own_kernel` offload_moe's on layout `block_n`): both timed now at _PREFILL_FIT_TOKENS on a
    random _PREFILL_SHAPE hqq4 matrix (hqq2 with `expanded`), bf16 inputs as the models',
    alternated, the median of `repeats`; where the lines through the two points cross (at least
    the first count; _PREFILL_NEVER if the prefill path's line does not come down to the kernel's).

    Timed on one thread in CPU time (torch's thread count restored after), as
    moe_kernel.calibrate: both paths split the same work over the threads, and on a busy machine
    wall time with several threads measures the other processes (an OpenMP barrier waiting for a
    taken core), not the paths."""
    fmt = parse_format("hqq2" if expanded else "hqq4")
    gen = torch.Generator().manual_seed(0)
    prepared = {name: torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8) if dtype == torch.uint8
                else (torch.rand(shape, generator=gen) * 0.01).to(dtype)
                for name, shape, dtype in prepared_fields(fmt, *_PREFILL_SHAPE)}
    kernel = int8_cpu_linear if own_kernel else lambda x, p, f, _: int4_cpu_linear(x, p, f)
    margin = []  # prefill's seconds minus the kernel's, per count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for tokens in _PREFILL_FIT_TOKENS:
            margin.append(_prefill_margin(tokens, kernel, prepared, fmt, block_n, repeats, gen))
    finally:
        torch.set_num_threads(threads)
    (lo, hi), (at_lo, at_hi) = _PREFILL_FIT_TOKENS, margin
    if at_lo <= 0:
        return lo
    if at_hi >= at_lo:
        return _PREFILL_NEVER
    return min(_PREFILL_NEVER, math.ceil(lo + at_lo * (hi - lo) / (at_lo - at_hi)))


def _prefill_margin(tokens: int, kernel, prepared: dict[str, torch.Tensor], fmt: QuantFormat, block_n: int,
                    repeats: int, gen: torch.Generator) -> float:
    """CPU seconds of prefill_linear minus the kernel's on `tokens` random bf16 inputs (medians)."""
    x = torch.randn(tokens, _PREFILL_SHAPE[1], generator=gen).to(torch.bfloat16)
    times: dict[object, list[float]] = {kernel: [], prefill_linear: []}
    for _ in range(repeats + 1):  # the first round warms up
        for fn, spent in times.items():  # alternated, so that load from other processes hits both alike
            start = time.thread_time()
            fn(x, prepared, fmt, block_n)
            spent.append(time.thread_time() - start)
    kernel_s, prefill_s = (statistics.median(spent[1:]) for spent in times.values())
    return prefill_s - kernel_s


def matmul_path(device_type: str, tokens: int, fmt: QuantFormat, out_features: int, block_n: int | None,
                own_kernel: bool = False, cuda_layout: bool = True) -> str:
    """Which kernel an int4-prepared matrix takes: "int4-cuda", "int8-cpu", "int4-cpu" or "dequant-cpu".

    On a GPU: "int4-cuda" for QuantizedLinear's CUDA layout (`cuda_layout`), "dequant-cpu" (the CPU
    layout dequantized on the device, then a dense matmul) for an expert slot computed alone.
    `own_kernel`: offload_moe.quant.int4_gemv runs here, so few tokens take "int8-cpu" instead of torch's
    "int4-cpu". Both it and "dequant-cpu" (the prefill path) need the CPU layout to be readable
    (`block_n` known and whole blocks of rows); otherwise torch's int4 kernel serves any number
    of tokens.
    """
    if device_type == "cuda" and cuda_layout:
        return "int4-cuda"
    if device_type != "cpu":  # the CPU layout on a device (a slot computed alone): dequantize, multiply
        return "dequant-cpu"
    whole_blocks = block_n is not None and out_features % block_n == 0
    own_kernel = own_kernel and whole_blocks
    if not whole_blocks or tokens < prefill_threshold(fmt, own_kernel, block_n):
        return "int8-cpu" if own_kernel else "int4-cpu"
    return "dequant-cpu"


def prefill_linear(
    x: torch.Tensor, prepared: dict[str, torch.Tensor], fmt: QuantFormat, block_n: int
) -> torch.Tensor:
    """x [T, in] @ W^T for many tokens: dequantize the prepared matrix to x's dtype, then matmul.

    The weights are dequantized once per call, _PREFILL_CHUNK_ROWS output rows at a time into
    one reused buffer (W^T [in, rows]: the CPU layout's own orientation), each chunk multiplied
    while it is still in cache. Exact w.r.t. the prepared weights up to x's dtype
    (`int4layout.dequantize_cpu_blocks`).
    """
    sz = prepared["scales_and_zeros"]  # [in/group, out, 2]
    out_features, in_features = sz.shape[1], x.shape[1]
    kernel_in = kernel_in_features(fmt, in_features)
    blocks = prepared["qweight"].view(out_features // block_n, kernel_in, block_n // 2)  # [nb, K', half]
    per_chunk = max(1, _PREFILL_CHUNK_ROWS // block_n)
    wt = torch.empty(in_features, per_chunk * block_n, dtype=x.dtype, device=x.device)  # [in, rows]
    y = x.new_empty(x.shape[0], out_features)  # [T, out]
    for b0 in range(0, blocks.shape[0], per_chunk):
        b1 = min(b0 + per_chunk, blocks.shape[0])
        r0, r1 = b0 * block_n, b1 * block_n
        chunk = wt[:, : r1 - r0]
        dequantize_cpu_blocks(blocks[b0:b1], sz[:, r0:r1], fmt, in_features, chunk)
        y[:, r0:r1] = x @ chunk
    return y


def dequant_linear(x: torch.Tensor, fields: dict[str, torch.Tensor], fmt: str | QuantFormat) -> torch.Tensor:
    """x @ W^T from canonical packed fields, dequantizing _DEQUANT_ROWS rows at a time in fp32.

    Works for every quantized format on any device; the path nf4 takes. fp32 throughout: a
    chunk stays in cache, and torch's bf16 matmul is very slow on small chunks on the CPU while
    fp32 is not.
    """
    fmt = parse_format(fmt)
    in_features = x.shape[-1]
    out_features = fields["qweight"].shape[0]
    xf = x.float()
    y = xf.new_empty(x.shape[0], out_features)
    nf4_table = nf4_byte_table(x.device) if fmt.kind is FormatKind.NF4 else None
    for r0 in range(0, out_features, _DEQUANT_ROWS):
        rows = slice(r0, min(r0 + _DEQUANT_ROWS, out_features))
        if nf4_table is not None:
            w = _nf4_dequant_rows(fields["qweight"][rows], fields["absmax"][rows], nf4_table, in_features)
        else:
            part = {name: t[rows] for name, t in fields.items()}
            w = dequantize(unpack(part, fmt, (part["qweight"].shape[0], in_features)), torch.float32)
        y[:, rows] = F.linear(xf, w)
    return y.to(x.dtype)


@functools.cache
def nf4_byte_table(device: torch.device) -> torch.Tensor:
    """int64 [256]: the two fp32 NF4 values of every packed byte (high nibble first), as bits.
    Memoised per device: a constant, built (and on a GPU copied) once rather than per call."""
    book = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack([book[byte >> 4], book[byte & 0x0F]], dim=-1).view(torch.int64).view(256)


def _nf4_dequant_rows(qweight: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, in_features: int) -> torch.Tensor:
    """fp32 [rows, in]: one gather per byte (two values at once), times each block's absmax."""
    rows = qweight.shape[0]
    values = table.index_select(0, qweight.reshape(-1).to(torch.int32)).view(torch.float32)
    w = values.view(rows, absmax.shape[1], -1).mul_(absmax.float().unsqueeze(-1))
    return w.view(rows, in_features)


# ---------------------------------------------------------------------------------------------
# whole experts


def expert_fields(fmt: str | QuantFormat, hidden: int, intermediate: int, *, prepared: bool = True,
                  gated: bool = True) -> FieldSpec:
    """One expert's fields for an ExpertLayout: gate_up [2F, H] ([F, H] when not `gated`) and down [H, F].

    Dense formats give exactly ExpertLayout.dense's fields ("gate_up", "down"); quantized ones
    prefix each matrix's fields ("gate_up.qweight", "down.scales_and_zeros", ...).
    prepared=False gives the canonical (converted checkpoint) fields instead.
    """
    fmt = parse_format(fmt)
    matrices = expert_matrices(hidden, intermediate, gated)
    if fmt.kind is FormatKind.DENSE:
        return [(m.name, m.shape, fmt.dtype) for m in matrices]
    per_matrix = prepared_fields if prepared else packed_fields
    return [
        (f"{m.name}.{name}", shape, dtype)
        for m in matrices
        for name, shape, dtype in per_matrix(fmt, m.out_features, m.in_features)
    ]


def prepare_expert_for_cpu(
    fields: dict[str, torch.Tensor],
    fmt: str | QuantFormat,
    hidden: int,
    intermediate: int,
    *,
    dest: dict[str, torch.Tensor] | None = None,
    block_n: int | None = None,
    gated: bool = True,
) -> dict[str, torch.Tensor]:
    """`prepare_for_cpu` on both matrices of an expert (prefixed canonical -> prefixed prepared)."""
    fmt = parse_format(fmt)
    if fmt.kind is FormatKind.DENSE:
        if dest is None:
            return dict(fields)
        for name, tensor in fields.items():
            dest[name].copy_(tensor)
        return dest
    if block_n is None and fmt.kind is FormatKind.AFFINE:
        block_n = cpu_int4_block_n()
    out: dict[str, torch.Tensor] = {}
    for m in expert_matrices(hidden, intermediate, gated):
        sub_dest = matrix_fields(dest, m.name) if dest is not None else None
        prepared = prepare_for_cpu(matrix_fields(fields, m.name), fmt, m.out_features, m.in_features,
                                   dest=sub_dest, block_n=block_n)
        out.update({f"{m.name}.{name}": t for name, t in prepared.items()})
    return out
