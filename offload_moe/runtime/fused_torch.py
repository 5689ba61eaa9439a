"""The experts of one MoE layer call computed from their device slots with a fixed number of torch ops.

On a GPU, computing routed experts one by one costs kernel launches (and host syncs) per expert,
which dominate decode. `experts_from_slots` computes a group of resident experts at once:

1. each field of the group's slots is gathered from the layer's SlotPool buffer
   ``[num_slots, nbytes]`` by a device index (one `index_select` per field, any n);
2. a chunk of up to `DequantTile.capacity` experts is dequantized into the preallocated tile
   (offload_moe.quant.batched_dequant; slots keep the store's CPU-kernel layout, so nothing is
   re-laid per slot after its copy);
3. the tokens are multiplied with batched matmuls: few rows per expert (decode) pad each
   expert's rows to the group's largest count and take one `bmm` per matrix; many rows
   (prefill) take one dense matmul per expert on its own rows, reusing the tile.

For decode (every chunk's experts fit the tile) the number of launches is the same whatever the
number of experts; no op reads a value back to the host. The padded path's row index is built
on the host from the counts the caller already has and copied in one non-blocking transfer.

Numerics: the tile holds the weights the CPU kernels multiply by, rounded once to the compute
dtype; matmuls in that dtype (fp32 accumulation), so results are within the existing 4-bit
tolerances of the per-expert CPU path (expert_compute.expert_forward). Unquantized experts are
gathered into the tile as they are (no bit-exactness with the per-expert F.linear is claimed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload_moe.errors import ConfigError
from offload_moe.model.arch import ExpertMatrix, ExpertsKind, GateFn, expert_matrices, field_transposed
from offload_moe.quant.batched_dequant import dequantize_int4_experts, dequantize_nf4_experts
from offload_moe.quant.formats import FormatKind, QuantFormat
from offload_moe.quant.int4_layout import cpu_int4_block_n, uses_int4_kernel
from offload_moe.quant.matmul import nf4_byte_table
from offload_moe.runtime.store import ExpertLayout, Field

# Rows per expert up to which the padded batched matmul is taken however uneven the counts
# (padding a few rows costs nothing next to reading the weights); beyond, only while padding at
# most doubles the rows.
FEW_ROWS = 16


def tile_elements(hidden: int, intermediate: int, gated: bool = True) -> int:
    """Weights of one expert's largest matrix: what the tile holds per expert."""
    return max(m.out_features * m.in_features for m in expert_matrices(hidden, intermediate, gated))


def tile_capacity(top_k: int, num_slots: int) -> int:
    """Experts one tile chunk holds: a decode token's top-k (fixed launches per decode step), at
    most the slots (a group never holds more experts than are resident)."""
    return max(1, min(top_k, num_slots))


def tile_bytes(hidden: int, intermediate: int, gated: bool, capacity: int, dtype: torch.dtype) -> int:
    """Device bytes of a DequantTile (what the planner counts next to the slots)."""
    return capacity * tile_elements(hidden, intermediate, gated) * dtype.itemsize


def planned_tile_bytes(fmt: QuantFormat, hidden: int, intermediate: int, gated: bool, top_k: int,
                       dtype: torch.dtype) -> int:
    """The tile a GPU budget keeps room for: quantized experts only (unquantized ones keep the
    per-expert path), sized for a decode token's top-k experts whatever the slots."""
    if not fmt.quantized:
        return 0
    return tile_bytes(hidden, intermediate, gated, tile_capacity(top_k, top_k), dtype)


def fused_layout_problem(fmt: QuantFormat, hidden: int, intermediate: int, gated: bool,
                         block_n: int | None) -> str | None:
    """Why the store's experts in `fmt` cannot be dequantized from their slots here, or None."""
    if fmt.kind is not FormatKind.AFFINE:
        return None
    for m in expert_matrices(hidden, intermediate, gated):
        if not uses_int4_kernel(fmt, m.out_features):
            return f"{m.out_features} output rows are not a multiple of 16"
        if block_n is None:
            return "this CPU's int4 packing layout is not one offload_moe can read back"
        if m.out_features % block_n:
            return f"{m.out_features} output rows are not whole blocks of {block_n}"
    return None


@dataclass
class DequantTile:
    """Preallocated device scratch of the fused path: dequantized weights of `capacity` experts'
    largest matrix, in the compute dtype; plus the constants the dequantization needs there."""

    buffer: torch.Tensor  # [capacity * elements], compute dtype, on the device
    capacity: int  # experts per chunk
    matrices: tuple[ExpertMatrix, ExpertMatrix]  # gate_up, down
    block_n: int | None  # the CPU int4 layout the store was built in
    nf4_table: torch.Tensor | None  # int64 [256] on the device (nf4 only)

    @classmethod
    def allocate(cls, fmt: QuantFormat, hidden: int, intermediate: int, gated: bool, capacity: int,
                 dtype: torch.dtype, device: torch.device, block_n: int | None = None) -> "DequantTile":
        """The tile for experts of these shapes in `fmt`; ConfigError if their layout cannot be
        read here. `block_n`: the store's int4 layout (default this machine's)."""
        if capacity < 1:
            raise ConfigError(f"tile capacity={capacity} must be at least 1 expert")
        block_n = cpu_int4_block_n() if block_n is None and fmt.kind is FormatKind.AFFINE else block_n
        problem = fused_layout_problem(fmt, hidden, intermediate, gated, block_n)
        if problem is not None:
            raise ConfigError(f"experts={fmt.name!r} cannot be computed from device slots: {problem}")
        buffer = torch.empty(capacity * tile_elements(hidden, intermediate, gated), dtype=dtype, device=device)
        table = nf4_byte_table(torch.device(device)) if fmt.kind is FormatKind.NF4 else None
        return cls(buffer, capacity, expert_matrices(hidden, intermediate, gated), block_n, table)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def view(self, n: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The first n experts' worth of the tile as [n, *shape] (contiguous)."""
        size = n * shape[0] * shape[1]
        return self.buffer[:size].view(n, *shape)


def slot_rows(pool: torch.Tensor, f: Field) -> torch.Tensor:
    """Field `f` of every slot of `pool` [num_slots, nbytes] as [num_slots, *f.shape] (a view)."""
    return pool[:, f.offset : f.offset + f.nbytes].view(f.dtype).view(pool.shape[0], *f.shape)


def _gather(pool: torch.Tensor, layout: ExpertLayout, slots: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """The fields named `prefix`* of the experts in `slots`, [n, *shape] each (one op per field)."""
    return {f.name[len(prefix):]: slot_rows(pool, f).index_select(0, slots)
            for f in layout.fields if f.name.startswith(prefix)}


def _weights_t(pool: torch.Tensor, layout: ExpertLayout, slots: torch.Tensor, m: ExpertMatrix, fmt: QuantFormat,
               tile: DequantTile, kind: ExpertsKind) -> torch.Tensor:
    """W^T [n, in, out] of matrix `m` of the experts in `slots`, in the tile (a view of it)."""
    n = slots.numel()
    if not fmt.quantized:
        f = next(f for f in layout.fields if f.name == m.name)
        rows = slot_rows(pool, f)
        if f.dtype == tile.buffer.dtype:
            w = torch.index_select(rows, 0, slots, out=tile.view(n, f.shape))
        else:
            w = tile.view(n, f.shape).copy_(rows.index_select(0, slots))
        return w if field_transposed(kind, m.name) else w.transpose(1, 2)
    fields = _gather(pool, layout, slots, m.name + ".")
    if "scales_and_zeros" in fields:
        out = tile.view(n, (m.in_features, m.out_features))
        return dequantize_int4_experts(fields["qweight"], fields["scales_and_zeros"], fmt, m.in_features,
                                       tile.block_n, out)
    out = tile.view(n, (m.out_features, m.in_features))
    return dequantize_nf4_experts(fields["qweight"], fields["absmax"], tile.nf4_table, out).transpose(1, 2)


def _biases(pool: torch.Tensor, layout: ExpertLayout, slots: torch.Tensor) -> dict[str, torch.Tensor]:
    """"gate_up" / "down" -> the experts' bias [n, out], for the matrices that have one."""
    return {f.name.removesuffix("_bias"): slot_rows(pool, f).index_select(0, slots)
            for f in layout.fields if f.name.endswith("_bias")}


@dataclass(frozen=True)
class _Experts:
    """What every chunk of one call reads: the slots' bytes and how to turn them into an MLP."""

    pool: torch.Tensor  # uint8 [num_slots, nbytes]
    layout: ExpertLayout
    fmt: QuantFormat
    apply_gate: GateFn
    tile: DequantTile
    kind: ExpertsKind

    def weights_t(self, slots: torch.Tensor, m: ExpertMatrix) -> torch.Tensor:  # [n, in, out]
        return _weights_t(self.pool, self.layout, slots, m, self.fmt, self.tile, self.kind)

    def biases(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:  # matrix -> [n, out]
        return _biases(self.pool, self.layout, slots)


def experts_from_slots(
    hidden: torch.Tensor,  # [T, H] on the device
    token_of_row: torch.Tensor,  # int64 [R]: rows of this group, grouped by expert in the order of `slots`
    weight_of_row: torch.Tensor,  # [R] routing weights
    counts: list[int],  # host: rows of each expert of the group (same order as slots)
    slots: torch.Tensor,  # int64 [n] on the device: the slot of each expert
    pool: torch.Tensor,  # uint8 [num_slots, nbytes] (SlotPool.buffers)
    layout: ExpertLayout,
    fmt: QuantFormat,
    apply_gate: GateFn,
    tile: DequantTile,
    *,
    kind: ExpertsKind = ExpertsKind.FUSED,  # unquantized experts only: which fields are held [in, out]
) -> torch.Tensor:  # [R, H]
    """Weighted outputs of a group of resident experts, in the row order of `token_of_row`
    (the caller combines them in ascending expert order). Dtype: hidden's times the weights'
    (promoted), as the eager experts multiply."""
    rows, n = sum(counts), len(counts)
    if rows == 0:
        return hidden.new_empty(0, hidden.shape[1]) * weight_of_row[:0, None]
    experts = _Experts(pool, layout, fmt, apply_gate, tile, kind)
    most = max(counts)
    if most <= FEW_ROWS or n * most <= 2 * rows:
        y = _padded(experts, hidden, token_of_row, counts, slots)
    else:
        y = _grouped(experts, hidden, token_of_row, counts, slots)
    return y * weight_of_row[:, None]


def _mlp_batched(experts: _Experts, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x [c, rows, H] through c experts (c <= tile capacity) with one bmm per matrix -> [c, rows, H]."""
    gate_up, down = experts.tile.matrices
    biases = experts.biases(slots)
    h = torch.bmm(x, experts.weights_t(slots, gate_up))  # [c, rows, 2F]
    if "gate_up" in biases:
        h = h + biases["gate_up"].unsqueeze(1)
    h = experts.apply_gate(h).to(x.dtype)  # [c, rows, F]
    y = torch.bmm(h, experts.weights_t(slots, down))  # the tile now holds down (stream order)
    if "down" in biases:
        y = y + biases["down"].unsqueeze(1)
    return y


def _padded(experts: _Experts, hidden: torch.Tensor, token_of_row: torch.Tensor, counts: list[int],
            slots: torch.Tensor) -> torch.Tensor:
    """Few rows per expert: every expert's rows padded to the largest count -> [R, H]."""
    n, most, width = len(counts), max(counts), hidden.shape[1]
    index = _padded_index(counts, hidden.device)
    source, position = index[: n * most], index[n * most :]  # padded slot -> row; row -> padded slot
    dtype = experts.tile.buffer.dtype
    x = hidden.index_select(0, token_of_row.index_select(0, source)).to(dtype).view(n, most, width)
    cap = experts.tile.capacity
    parts = [_mlp_batched(experts, x[i : i + cap], slots[i : i + cap]) for i in range(0, n, cap)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts)  # [n, most, H]
    return y.view(n * most, width).index_select(0, position).to(hidden.dtype)


def _padded_index(counts: list[int], device: torch.device) -> torch.Tensor:
    """int64 [n*most + R] on `device`: for each padded slot (expert i, j < most) the group row it
    reads (its expert's last row past the count), then for each row its padded slot. Built on
    the host from the counts; one non-blocking copy from pinned memory on a GPU (no sync)."""
    most, source, position, start = max(counts), [], [], 0
    for i, count in enumerate(counts):
        source += [start + min(j, count - 1) for j in range(most)] if count else [0] * most
        position += range(i * most, i * most + count)
        start += count
    index = torch.tensor(source + position, dtype=torch.int64)
    if device.type == "cpu":
        return index
    if device.type == "cpu":
        return index
    return index.pin_memory().to(device, non_blocking=True)  # pinned: no host wait


def _grouped(experts: _Experts, hidden: torch.Tensor, token_of_row: torch.Tensor, counts: list[int],
             slots: torch.Tensor) -> torch.Tensor:
    """Many rows: per chunk of experts one dequantization into the tile, then one dense matmul
    per expert on its own (contiguous) rows -> [R, H]."""
    gate_up, down = experts.tile.matrices
    dtype = experts.tile.buffer.dtype
    x = hidden.index_select(0, token_of_row).to(dtype)  # [R, H]
    y = x.new_empty(x.shape[0], down.out_features)
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    cap = experts.tile.capacity
    for i0 in range(0, len(counts), cap):
        chunk = range(i0, min(i0 + cap, len(counts)))
        r0, r1 = bounds[chunk.start], bounds[chunk.stop]
        biases = experts.biases(slots[chunk.start : chunk.stop])
        wt = experts.weights_t(slots[chunk.start : chunk.stop], gate_up)
        h = x.new_empty(r1 - r0, gate_up.out_features)
        for j, i in enumerate(chunk):
            _linear_rows(x[bounds[i] : bounds[i + 1]], wt[j], biases.get("gate_up"), j, h[bounds[i] - r0 : bounds[i + 1] - r0])
        h = experts.apply_gate(h).to(dtype)
        wt = experts.weights_t(slots[chunk.start : chunk.stop], down)
        for j, i in enumerate(chunk):
            _linear_rows(h[bounds[i] - r0 : bounds[i + 1] - r0], wt[j], biases.get("down"), j, y[bounds[i] : bounds[i + 1]])
    return y.to(hidden.dtype)


def _linear_rows(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, j: int, out: torch.Tensor) -> None:
    """out = x @ wt (+ bias[j]): one expert's rows [r, in] times its W^T [in, out]."""
    if x.shape[0] == 0:
        return
    torch.mm(x, wt, out=out)
    if bias is not None:
        out += bias[j]
