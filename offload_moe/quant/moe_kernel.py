"""One native call per MoE layer: every routed expert, all its tokens, gate_up, gate, down, combine.

Per-expert Python calls (`quant.matmul.linear` twice per expert plus small torch ops) cost more
than the matmuls themselves at decode. `moe_kernel.c` holds all of offload_moe's int4 x int8 math:
its `int4_gemv` entry computes one matrix (offload_moe.quant.int4_gemv) and, like llama.cpp's
`mul_mat_id`, `moe_experts` computes a layer's routed experts in one call, parallel (OpenMP) over
(expert, block of output rows) items, each reading its weights once: for few tokens per expert
the GEMV loop; from `tile_threshold` tokens (measured on the running CPU at first
use, cached next to the built kernel) the block's nibbles are unpacked once into a per-thread
buffer and reused across register tiles of tokens (the GEMM path). `python bench/moe_kernel.py`
measures it against the per-expert path (bench/RESULTS.md).

What it computes, per expert e with rows r (one per (token, expert) pair, grouped by expert):
``gate_up = q8(x[token]) @ W1^T (+ b1)``, ``g = gate(gate_up)`` (a `GateSpec`),
``row = (q8(g) @ W2^T (+ b2)) * weight_of_row[r]`` and ``out[token] += row`` in row order, so in
ascending expert order; q8 is the kernel's int8 rounding in blocks of 32 (the exact product of the
dequantized weights with the int8-rounded inputs, up to fp32 summation order; all in fp32). The
weights are the prepared int4 CPU layout the store holds (offload_moe.quant.int4_layout) for the
affine formats (hqq4, hqq3, hqq2g64, hqq2 with expanded groups); nf4 is not affine: `available`
is False and callers use their per-expert path.

A GateSpec is recognised from the model's activation class (offload_moe.model.arch.gate_spec);
`gate_matches` runs the C gate against the model's own gate function on a random input, so a
recognised class that computes something else is never run natively: check it once, at load.
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from offload_moe.model.arch import GATE_KINDS, ArchSpec, GateFn, GateSpec, apply_gate_fn, gate_spec
from offload_moe.quant import native
from offload_moe.quant.formats import FormatKind, QuantFormat
from offload_moe.quant.int4_layout import cpu_int4_block_n, expanded_groups, kernel_group

SOURCE = Path(__file__).with_name("moe_kernel.c")
VARIANTS = {1: 64, 2: 32}  # moe_supported() bit -> BLOCK_N of the layout it reads (AVX-512, AVX2)
X_BLOCK = 32  # activations per int8 scale
GATE_CODES = {kind: code for code, kind in enumerate(GATE_KINDS)}  # the C file's enum gate_kind
IO_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # x and combined: cpu_dtypes.h's enum dtype
FIELDS = ("gate_up.qweight", "gate_up.scales_and_zeros", "down.qweight", "down.scales_and_zeros")
BIASES = ("gate_up_bias", "down_bias")
CALIBRATION_FILE = "moe_kernel-calibration.json"
_NEVER_TILED = 1 << 40  # a tile_min no expert reaches: the direct loop only
# The kernel's buffers per chunk of rows (gate_up outputs, rounded gate outputs, interleaved tiles):
# below glibc's largest mmap threshold (32 MiB), so that the per-call arena comes back from the heap
# call after call instead of being mapped and page-faulted afresh. Bigger layers run in chunks.
CHUNK_BYTES = 24 << 20


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot run (offload_moe.quant.native). Memoised:
    a fact of the machine, fixed for the process (the environment switch is read per call)."""
    lib = native.load_library(SOURCE, "fused MoE CPU kernel")
    if lib is None or not lib.moe_supported():
        return None
    i64, ptr, c_int, c_float = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.moe_experts.argtypes = [ptr, c_int, i64, i64, i64, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, c_int, i64,
                                c_int, i64, c_int, c_float, c_float, i64, i64, ptr, ptr, c_int, ptr, ptr]
    lib.moe_experts.restype = c_int
    lib.moe_experts_topk.argtypes = [ptr, c_int, i64, i64, i64, i64, i64, ptr, ptr, c_int, i64, i64, ptr, ptr, i64,
                                     ptr, c_int, i64, c_int, i64, c_int, c_float, c_float, i64, i64, ptr, c_int]
    lib.moe_experts_topk.restype = c_int
    lib.moe_gate.argtypes = [ptr, i64, i64, c_int, c_float, c_float, ptr]
    lib.moe_gate.restype = c_int
    lib.moe_combine.argtypes = [ptr, i64, i64, ptr, ptr]
    lib.moe_combine.restype = None
    lib.int4_gemv.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, ptr]
    lib.int4_gemv.restype = c_int
    return lib


@functools.cache
def block_ns() -> frozenset[int]:
    """The prepared layouts (BLOCK_N) the kernel runs on this CPU: {64, 32} on AVX-512 VNNI, {32} on AVX2."""
    lib = load_kernel()
    supported = lib.moe_supported() if lib is not None else 0
    return frozenset(block_n for bit, block_n in VARIANTS.items() if supported & bit)


def available(fmt: QuantFormat, block_n: int | None, gate: GateSpec | None) -> bool:
    """True where `moe_experts` runs this format, prepared layout and gate here (False when
    native.disabled(), for nf4 and dense formats, an unknown gate or layout)."""
    if native.disabled() or gate is None or fmt.kind is not FormatKind.AFFINE:
        return False
    return kernel_group(fmt) % X_BLOCK == 0 and block_n in block_ns()


# ---------------------------------------------------------------------------------------------
# the layer


class ExpertTable:
    """Experts' prepared fields as `moe_experts` reads them: each expert's 6 data pointers (FIELDS,
    then BIASES or 0) in one C array, checked once here (shapes, dtypes, layout), so a call only
    names its experts by their entries. The table holds the tensors it points into (biases of mixed
    dtypes converted to fp32): they live as long as it does. A layer builds one per set of fixed
    views (its host store's experts, its CPU slots) at load."""

    def __init__(self, experts: Sequence[dict[str, torch.Tensor]], fmt: QuantFormat, block_n: int | None = None):
        self.fmt, self.block_n = fmt, cpu_int4_block_n() if block_n is None else block_n
        if self.block_n not in block_ns():
            raise ValueError(f"moe_experts: block_n={self.block_n}: the fused kernel runs layouts "
                             f"{sorted(block_ns())} here")
        self.hidden, self.n1, self.inter = _dims(experts[0], fmt) if experts else (0, 0, 0)
        specs = _field_specs(fmt, self.hidden, self.n1, self.inter, self.block_n) if experts else ()
        bias_shapes = {"gate_up_bias": (self.n1,), "down_bias": (self.hidden,)}
        biases = [[_checked_bias(fields[name], name, bias_shapes[name], i) if fields.get(name) is not None else None
                   for name in BIASES] for i, fields in enumerate(experts)]  # [expert][BIASES]
        dtypes = {b.dtype for pair in biases for b in pair if b is not None}
        self.bias_bf16 = int(dtypes == {torch.bfloat16})  # one flag per call: mixed dtypes all fp32
        biases = [[b if b is None or self.bias_bf16 else b.float() for b in pair] for pair in biases]
        ptrs = []
        for i, (fields, pair) in enumerate(zip(experts, biases)):
            ptrs += [_checked(fields, name, shape, dtype, i).data_ptr() for name, shape, dtype in specs]
            ptrs += [0 if b is None else b.data_ptr() for b in pair]
        self._keep = [t for fields in experts for t in fields.values()]
        self._keep += [b for pair in biases for b in pair if b is not None]
        self.size = len(experts)
        self.pointers = (ctypes.c_int64 * max(1, len(ptrs)))(*ptrs)


def moe_experts(
    x: torch.Tensor,  # [T, H] CPU, fp32/bf16/fp16
    token_of_row: torch.Tensor,  # int64 [R]: the token of each (token, expert) row; rows grouped by expert
    weight_of_row: torch.Tensor,  # fp32 [R]: routing weight of each row (already times any output scale)
    offsets: list[int],  # len n+1: rows of the i-th expert are offsets[i]:offsets[i+1]
    experts: ExpertTable | Sequence[dict[str, torch.Tensor]],  # a table, or n experts' prepared fields
    fmt: QuantFormat,
    gate: GateSpec,
    out: torch.Tensor | None = None,  # fp32 [T, H]: the combined weighted outputs ADDED into it
    rows_out: torch.Tensor | None = None,  # fp32 [R, H]: the weighted rows written here instead of combined
    *,
    ids: Sequence[int] | None = None,  # the i-th expert's entry in the table (default: entry i)
    out_dtype: torch.dtype | None = None,  # neither out nor rows_out: a new combined [T, H] of this dtype (x's)
    block_n: int | None = None,  # the prepared layout (default this machine's, cpu_int4_block_n())
    tile_min: int | None = None,  # tokens from which an expert takes the tiled loop (default measured)
    gate_out: torch.Tensor | None = None,  # fp32 [R, F]: the gate's outputs before int8 rounding (checks)
    chunk_bytes: int = CHUNK_BYTES,  # the kernel's buffers per chunk of rows
) -> torch.Tensor | None:
    """All of a layer's routed experts in one native call (see the module docstring): added into
    `out`, written to `rows_out`, or (neither given) returned as a new [T, H] tensor, summed in
    fp32 and rounded once to out_dtype.

    Only call where `available(fmt, block_n, gate)`; shapes, dtypes and devices are checked
    (ValueError naming the field)."""
    table = experts if isinstance(experts, ExpertTable) else ExpertTable(experts, fmt, block_n)
    if table.fmt != fmt or (block_n is not None and block_n != table.block_n):
        raise ValueError(f"moe_experts: the table holds {table.fmt.name} experts in layout block_n={table.block_n}, "
                         f"the call asks {fmt.name} with block_n={block_n}")
    if out is not None and rows_out is not None:
        raise ValueError("moe_experts: give out (added into) or rows_out (one row each), not both")
    tokens, hidden = _check_x(x, out)
    n = len(offsets) - 1
    rows = _check_rows(token_of_row, weight_of_row, offsets, n, ids, table.size)
    inter = _check_table(table, hidden, gate) if n else 0
    for name, tensor, shape in (("rows_out", rows_out, (rows, hidden)), ("gate_out", gate_out, (rows, inter))):
        if tensor is not None and (tensor.dtype != torch.float32 or tuple(tensor.shape) != shape
                                   or not tensor.is_contiguous() or tensor.device.type != "cpu"):
            raise ValueError(f"moe_experts: {name} must be a contiguous fp32 CPU tensor {list(shape)}, got "
                             f"{tensor.dtype} {list(tensor.shape)} on {tensor.device}")
    combined = None
    if out is None and rows_out is None:
        combined = torch.empty(tokens, hidden, dtype=x.dtype if out_dtype is None else out_dtype)
        if combined.dtype not in IO_DTYPES:
            raise ValueError(f"moe_experts: out_dtype must be fp32, fp16 or bf16, got {combined.dtype}")
    if tokens == 0 or (rows == 0 and combined is None):
        return combined
    x = x if x.is_contiguous() else x.contiguous()
    status = _run(x, tokens, hidden, inter, table, offsets, ids, token_of_row, weight_of_row, gate, tile_min,
                  chunk_bytes, out, combined, rows_out, gate_out)
    if status == -3:
        raise ValueError(f"moe_experts: rows that do not fit: offsets {offsets} must rise, ids "
                         f"{None if ids is None else list(ids)} name entries of a table of {table.size}, and "
                         f"token_of_row hold tokens within 0..{tokens - 1}")
    if status != 0:
        raise MemoryError(f"moe_experts: could not allocate scratch for {rows} rows of {hidden} x {table.n1}")
    return combined


def moe_experts_topk(
    x: torch.Tensor,  # [T, H] CPU, fp32/bf16/fp16
    top_k_index: torch.Tensor,  # int64 [T, K]: the router's experts; num_experts: no expert
    top_k_weights: torch.Tensor,  # [T, K] fp32/bf16/fp16: their routing weights
    num_experts: int,
    experts: Sequence[int],  # the experts that have entries in the table ...
    entries: Sequence[int],  # ... and those entries
    table: ExpertTable,
    gate: GateSpec,
    *,
    tile_min: int | None = None,  # as moe_experts'
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:  # [T, H] of x's dtype
    """moe_experts straight from a router's top-k, combined: the rows are grouped in C as
    runtime.routing groups them, so the result is moe_experts' on route_rows' rows bit for bit,
    without building them in Python (a decode step's call). Every routed expert must be listed
    in `experts` (ValueError otherwise, as for ids outside 0..num_experts)."""
    tokens, hidden = _check_x(x, None, "moe_experts_topk")
    k = top_k_index.shape[-1] if top_k_index.dim() == 2 else -1
    if (k < 1 or top_k_index.shape[0] != tokens or top_k_index.dtype != torch.int64 or top_k_weights.shape != top_k_index.shape
            or top_k_weights.dtype not in IO_DTYPES or not top_k_index.is_cpu or not top_k_weights.is_cpu
            or len(experts) != len(entries) or num_experts < 1):
        raise ValueError(f"moe_experts_topk: top_k_index int64 [{tokens}, K] and top_k_weights [{tokens}, K] on the CPU, "
                         f"as many entries as experts; got {top_k_index.dtype} {list(top_k_index.shape)}, "
                         f"{top_k_weights.dtype} {list(top_k_weights.shape)}, {len(experts)} experts, {len(entries)} entries")
    inter = _check_table(table, hidden, gate)
    combined = torch.empty(tokens, hidden, dtype=x.dtype)
    x, top_k_index, top_k_weights = (t if t.is_contiguous() else t.contiguous() for t in (x, top_k_index, top_k_weights))
    n = len(experts)
    status = native.call("offload_moe::moe_experts", load_kernel().moe_experts_topk,
        x.data_ptr(), IO_DTYPES[x.dtype], tokens, hidden, inter, table.n1, k, top_k_index.data_ptr(),
        top_k_weights.data_ptr(), IO_DTYPES[top_k_weights.dtype], num_experts, n,
        (ctypes.c_int32 * max(1, n))(*experts), (ctypes.c_int32 * max(1, n))(*entries), table.size,
        *_layer_args(table, gate, tile_min, chunk_bytes), combined.data_ptr(), IO_DTYPES[combined.dtype])
    if status == -3:
        raise ValueError(f"moe_experts_topk: routed experts must lie within 0..{num_experts} ({num_experts}: none) and "
                         f"each routed one have an entry: experts {list(experts)}, entries {list(entries)} of a table "
                         f"of {table.size}, top_k_index {top_k_index.tolist() if top_k_index.numel() <= 64 else '...'}")
    if status != 0:
        raise MemoryError(f"moe_experts_topk: could not allocate scratch for {top_k_index.numel()} rows of "
                          f"{hidden} x {table.n1}")
    return combined


def _check_table(table: ExpertTable, hidden: int, gate: GateSpec) -> int:
    """The experts' intermediate size F after checking the table against x's H and the gate."""
    if hidden != table.hidden:
        raise ValueError(f"moe_experts: x has {hidden} features, the experts take {table.hidden}")
    inter = table.n1 // 2 if gate.gated else table.n1
    if inter != table.inter:
        raise ValueError(f"moe_experts: gate {gate.kind!r} on gate_up's {table.n1} outputs gives {inter} features, "
                         f"down takes {table.inter}")
    return inter


def _layer_args(table: ExpertTable, gate: GateSpec, tile_min: int | None, chunk_bytes: int) -> tuple:
    """The C arguments both entry points take after the rows: the table's pointers and format, the
    gate, the tiled loop's threshold (default measured) and the chunk budget."""
    fmt = table.fmt
    tile = tile_threshold(table.block_n) if tile_min is None else tile_min
    return (table.pointers, table.bias_bf16, fmt.group_size, int(expanded_groups(fmt)), table.block_n,
            GATE_CODES[gate.kind], gate.alpha, gate.limit, tile, chunk_bytes)


def _run(x, tokens, hidden, inter, table, offsets, ids, token_of_row, weight_of_row, gate, tile_min, chunk_bytes,
         out, combined, rows_out, gate_out) -> int:
    """The C call (arguments checked by moe_experts); its status."""
    n = len(offsets) - 1
    offsets_c = (ctypes.c_int64 * len(offsets))(*offsets)
    ids_c = None if ids is None else (ctypes.c_int32 * max(1, n))(*ids)
    return native.call("offload_moe::moe_experts", load_kernel().moe_experts,
        x.data_ptr(), IO_DTYPES[x.dtype], tokens, hidden, inter, table.n1, n, offsets_c, ids_c, table.size,
        token_of_row.data_ptr(), weight_of_row.data_ptr(), *_layer_args(table, gate, tile_min, chunk_bytes),
        None if out is None else out.data_ptr(), None if combined is None else combined.data_ptr(),
        IO_DTYPES[combined.dtype] if combined is not None else 0, None if rows_out is None else rows_out.data_ptr(),
        None if gate_out is None else gate_out.data_ptr())


def combine_rows(rows: torch.Tensor, token_of_row: torch.Tensor, out: torch.Tensor) -> None:
    """out[token_of_row[r]] += rows[r], in row order (rows [R, H] fp32, out [T, H] fp32): the
    combine of `moe_experts`, for a layer whose experts were computed in several groups."""
    tokens, hidden = _check_x(out, out, "combine_rows")
    if rows.dtype != torch.float32 or rows.dim() != 2 or rows.shape[1] != hidden or not rows.is_contiguous():
        raise ValueError(f"combine_rows: rows must be a contiguous fp32 [R, {hidden}] tensor, got "
                         f"{rows.dtype} {list(rows.shape)}")
    _check_rows(token_of_row, None, [0, rows.shape[0]], 1, None, 1)
    if rows.shape[0]:
        low, high = torch.aminmax(token_of_row)
        if int(low) < 0 or int(high) >= tokens:
            raise ValueError(f"combine_rows: token_of_row holds tokens {int(low)}..{int(high)}, outside 0..{tokens - 1}")
        load_kernel().moe_combine(rows.data_ptr(), rows.shape[0], hidden, token_of_row.data_ptr(), out.data_ptr())


def _check_x(x: torch.Tensor, out: torch.Tensor | None, what: str = "moe_experts") -> tuple[int, int]:
    """(T, H) after checking x [T, H] and out (if given), the fp32 tensor the results are added into."""
    if x.dim() != 2 or not x.is_cpu or x.dtype not in IO_DTYPES:
        raise ValueError(f"{what}: x must be a CPU [T, H] fp32/bf16/fp16 tensor, got {x.dtype} "
                         f"{list(x.shape)} on {x.device}")
    if out is not None and (out.dtype != torch.float32 or out.shape != x.shape or not out.is_contiguous()
                            or not out.is_cpu):
        raise ValueError(f"{what}: out must be a contiguous fp32 CPU tensor {list(x.shape)}, got "
                         f"{out.dtype} {list(out.shape)} on {out.device}")
    return x.shape[0], x.shape[1]


def _check_rows(token_of_row: torch.Tensor, weight_of_row: torch.Tensor | None, offsets: list[int],
                n_experts: int, ids: Sequence[int] | None, table_size: int) -> int:
    """The row count R after checking the row tensors, the offsets' ends and the ids' count (the
    C side checks every offset, id and token: rows_valid)."""
    if (token_of_row.dtype != torch.int64 or token_of_row.dim() != 1 or not token_of_row.is_contiguous()
            or not token_of_row.is_cpu):
        raise ValueError(f"moe_experts: token_of_row must be a contiguous int64 CPU [R] tensor, got "
                         f"{token_of_row.dtype} {list(token_of_row.shape)} on {token_of_row.device}")
    rows = token_of_row.shape[0]
    if weight_of_row is not None and (weight_of_row.dtype != torch.float32 or tuple(weight_of_row.shape) != (rows,)
                                      or not weight_of_row.is_contiguous() or not weight_of_row.is_cpu):
        raise ValueError(f"moe_experts: weight_of_row must be a contiguous fp32 CPU [{rows}] tensor, got "
                         f"{weight_of_row.dtype} {list(weight_of_row.shape)} on {weight_of_row.device}")
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != rows:
        raise ValueError(f"moe_experts: offsets must rise from 0 to R={rows}, got {offsets}")
    if ids is not None and len(ids) != n_experts:
        raise ValueError(f"moe_experts: ids must name {n_experts} entries of a table of {table_size}, got {list(ids)}")
    if ids is None and n_experts > table_size:
        raise ValueError(f"moe_experts: {n_experts} experts' offsets for a table of {table_size}")
    return rows


def _dims(fields: dict[str, torch.Tensor], fmt: QuantFormat) -> tuple[int, int, int]:
    """(hidden, gate_up's outputs N1, intermediate) of an expert's prepared fields."""
    for name in ("gate_up.scales_and_zeros", "down.scales_and_zeros"):
        if name not in fields or fields[name].dim() != 3:
            raise ValueError(f"moe_experts: expert 0's {name!r} must be a [groups, N, 2] tensor "
                             f"(fields: {sorted(fields)})")
    down = fields["down.scales_and_zeros"]
    return down.shape[1], fields["gate_up.scales_and_zeros"].shape[1], down.shape[0] * fmt.group_size


def _checked(fields: dict[str, torch.Tensor], name: str, shape: torch.Size, dtype: torch.dtype, i: int) -> torch.Tensor:
    t = fields.get(name)
    if t is None or t.dtype is not dtype or not t.is_cpu or t.shape != shape or not t.is_contiguous():
        got = "missing" if t is None else f"{t.dtype} {list(t.shape)} on {t.device}"
        raise ValueError(f"moe_experts: expert {i}'s {name!r} must be a contiguous CPU {dtype} {list(shape)}, got {got}")
    return t


def _checked_bias(t: torch.Tensor, name: str, shape: tuple[int], i: int) -> torch.Tensor:
    if t.shape != shape or not t.is_cpu:
        raise ValueError(f"moe_experts: expert {i}'s {name!r} must be a CPU {list(shape)} tensor, "
                         f"got {list(t.shape)} on {t.device}")
    return t if t.dtype in (torch.float32, torch.bfloat16) and t.is_contiguous() else t.float().contiguous()


@functools.lru_cache(maxsize=64)
def _field_specs(fmt: QuantFormat, hidden: int, n1: int, inter: int,
                 block_n: int) -> tuple[tuple[str, torch.Size, torch.dtype], ...]:
    """(name, shape, dtype) of FIELDS for one table's shapes."""
    kernel_in = 2 if expanded_groups(fmt) else 1
    group = fmt.group_size
    if hidden % group or inter % group or n1 % block_n or hidden % block_n:
        raise ValueError(f"moe_experts: hidden={hidden} and intermediate={inter} must be multiples of the group "
                         f"{group}, gate_up's {n1} rows and down's {hidden} whole blocks of block_n={block_n}")
    return (("gate_up.qweight", torch.Size((n1, kernel_in * hidden // 2)), torch.uint8),
            ("gate_up.scales_and_zeros", torch.Size((hidden // group, n1, 2)), torch.bfloat16),
            ("down.qweight", torch.Size((hidden, kernel_in * inter // 2)), torch.uint8),
            ("down.scales_and_zeros", torch.Size((inter // group, hidden, 2)), torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# the gate alone


def apply_gate_spec(gate: GateSpec, h: torch.Tensor) -> torch.Tensor:
    """The C kernel's gate on fp32 h [T, 2F] ([T, F] non-gated) -> fp32 [T, F]."""
    h = h.float().contiguous()
    width = h.shape[1] // 2 if gate.gated else h.shape[1]
    g = torch.empty(h.shape[0], width, dtype=torch.float32)
    status = load_kernel().moe_gate(h.data_ptr(), h.shape[0], h.shape[1], GATE_CODES[gate.kind], gate.alpha,
                                    gate.limit, g.data_ptr())
    if status != 0:
        raise ValueError(f"apply_gate_spec: the kernel does not know gate kind {gate.kind!r}")
    return g


def gate_matches(gate: GateSpec, apply_gate: GateFn, width: int = 256) -> bool:
    """True if the kernel's `gate` computes what `apply_gate` (the model's own gate function)
    does, to fp32 rounding (1e-5 of the largest output), on a random fp32 input spanning the
    activations' interesting range (and gpt-oss's clamp). Run once, at load."""
    if load_kernel() is None:
        return False
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(8, 2 * width if gate.gated else width, generator=gen) * 4
    if gate.limit != float("inf"):
        h[:4] *= max(1.0, gate.limit / 4)  # past the clamp
    with torch.no_grad():
        try:
            want = apply_gate(h.clone()).float()
        except (RuntimeError, ValueError, TypeError, IndexError):
            return False
    got = apply_gate_spec(gate, h)
    if want.shape != got.shape or not torch.isfinite(want).all():
        return False
    return bool(((got - want).abs() <= 1e-5 * (want.abs() + want.abs().max())).all())


def verified_gate_spec(spec: ArchSpec, experts_module: torch.nn.Module) -> GateSpec | None:
    """The experts module's GateSpec (arch.gate_spec) if the kernel's gate computes what the
    module's own gate function does (`gate_matches`), else None: what a loader asks once."""
    gate = gate_spec(spec, experts_module)
    if gate is None or not gate_matches(gate, apply_gate_fn(spec, experts_module)):
        return None
    return gate


# ---------------------------------------------------------------------------------------------
# where the tiled loop starts: measured on the running CPU, cached next to the kernel


@functools.cache
def tile_threshold(block_n: int) -> int:
    """Tokens per expert from which the tiled loop beats the direct one on this CPU, variant
    `block_n`: read from the calibration cache, else measured (well under a second) and written.
    Memoised: fixed for the process."""
    cc = native.compiler()
    key = f"{native.build_key(SOURCE, cc) if cc else 'no-cc'}|{native.cpu_model()}|block_n={block_n}"
    return native.cached_measurement(CALIBRATION_FILE, key, lambda: calibrate(block_n), native.count_entry)


def calibrate(block_n: int, max_tokens: int = 12, rounds: int = 7) -> int:
    """The smallest token count per expert from which the tiled loop is as fast as the direct one
    (at that count and the next), timed on a synthetic expert (H 1024, F 512, hqq4 layout
    `block_n`) on the running CPU, both loops alternated, best of `rounds`; max_tokens + 1 if
    never up to max_tokens.

    Timed on one thread in CPU time (torch's thread count restored after): the crossover is a
    property of a core (both loops split the same items over the threads), and CPU time does not
    count the time other processes take the core, which on a busy machine would decide the answer."""
    hidden, inter, fmt = 1024, 512, QuantFormat("hqq4", FormatKind.AFFINE, 4, 64)
    gen = torch.Generator().manual_seed(0)
    expert = {
        "gate_up.qweight": torch.randint(0, 256, (2 * inter, hidden // 2), generator=gen, dtype=torch.uint8),
        "gate_up.scales_and_zeros": (torch.rand(hidden // 64, 2 * inter, 2, generator=gen) * 0.01).bfloat16(),
        "down.qweight": torch.randint(0, 256, (hidden, inter // 2), generator=gen, dtype=torch.uint8),
        "down.scales_and_zeros": (torch.rand(inter // 64, hidden, 2, generator=gen) * 0.01).bfloat16(),
    }
    gate = GateSpec("silu_mul")

    def tiled_wins(tokens: int) -> bool:
        x = torch.randn(tokens, hidden, generator=gen)
        rows, weights, out = torch.arange(tokens), torch.ones(tokens), torch.zeros(tokens, hidden)
        best = {0: float("inf"), _NEVER_TILED: float("inf")}
        for _ in range(rounds):
            for tile_min in best:  # alternated, so that load from other processes hits both alike
                start = time.thread_time()
                moe_experts(x, rows, weights, [0, tokens], table, fmt, gate, out, tile_min=tile_min)
                best[tile_min] = min(best[tile_min], time.thread_time() - start)
        return best[0] <= best[_NEVER_TILED]

    table = ExpertTable([expert], fmt, block_n)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wins = [tiled_wins(tokens) for tokens in range(1, max_tokens + 2)]
    finally:
        torch.set_num_threads(threads)
    for tokens in range(1, max_tokens + 1):
        if wins[tokens - 1] and wins[tokens]:
            return tokens
    return max_tokens + 1
