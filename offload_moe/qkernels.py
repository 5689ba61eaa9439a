"""Quantized expert matmuls: re-lay packed weights once for torch's int4 kernels, then x @ W^T.

The canonical packed layout (offload_moe.quant) is machine independent. The fastest CPU kernel,
``torch.ops.aten._weight_int4pack_mm_for_cpu``, wants its own layout instead:

* ``qweight`` uint8 ``[out, in/2]``: for every block of BLOCK_N output rows (64 with AVX-512,
  32 with AVX2, as ``_convert_weight_to_int4pack_for_cpu`` makes it), a ``[in, BLOCK_N/2]``
  byte array whose byte ``(k, j)`` is ``q[j, k] | q[j + BLOCK_N/2, k] << 4``. The layout depends
  on the CPU torch runs on: build it at load, do not write it to a converted checkpoint.
* ``scales_and_zeros`` bf16 ``[in/group, out, 2]`` with torch's convention
  ``w = (q - 8) * S + Z``. Ours is ``w = (q - zero) * scale``, hence (as gpt-fast's
  ``group_quantize_tensor``)::

      S = scale        Z = (8 - zero) * scale

  Rounding S and Z to bf16 moves a weight by at most ~0.05 of a quantization step.

2- and 3-bit codes fit the kernel's 4-bit slot with the zero adjusted: the slot holds
``q + 8 - 2**(bits-1)`` (2-bit codes 0..3 become 6..9, 3-bit 0..7 become 4..11, so they sit around
the kernel's centre 8) and ``Z = (2**(bits-1) - zero) * scale``; for 4 bits this is the formula
above. Centring keeps |Z| small, which keeps its bf16 rounding error small. So hqq3 and hqq2g64
use the int4 kernel too: the store keeps 2/3-bit bytes, and the
re-layout (a few tens of ms per 14336x4096 matrix) happens once, when the weights enter the slot
the kernel reads. The kernel accepts groups of 32..256 only; hqq2's group of 16 is run through it
by spreading every 16 input columns over a 32-column group whose other 16 columns are zero codes
multiplied by zero inputs (``in' = 2 * in``: twice the bytes of hqq4, but still much faster than
dequantizing). NF4's codebook is not an affine function of the code, so no exact mapping to the
int4 kernel exists: nf4 dequantizes 256 rows at a time (one gather per byte from a 256-entry
table of value pairs) and multiplies in fp32 (torch's bf16 CPU matmul is very slow on chunks
that small; fp32 is not).

Measured (bench/kernels.py, 2 cores, 14336x4096, weights from DRAM), relative to bf16 dense: at
batch 1 the int4 kernel (hqq4/hqq3/hqq2g64) is ~4.8x faster (at copy bandwidth), hqq2 expanded
~2.3x, nf4 ~9x slower. The CPU int4 kernel's time grows ~linearly with tokens beyond ~4: 1.3x
faster than bf16 at 8 tokens, slower from ~16 (prefill would want dequantize + bf16 matmul).

On CUDA the same idea uses ``_convert_weight_to_int4pack`` / ``_weight_int4pack_mm``
(``prepare_for_cuda``; untested here, no GPU).

All functions are pure: tensors in, tensors out; no module state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .quant import NF4_CODEBOOK, QuantFormat, dequantize, packed_fields, parse_format, unpack, unpack_codes

FieldSpec = list[tuple[str, tuple[int, ...], torch.dtype]]

INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 kernels accept
_DEQUANT_ROWS = 256  # rows dequantized at a time on the fallback path (4 MiB fp32: stays in cache)


def uses_int4_kernel(fmt: QuantFormat, out_features: int) -> bool:
    """True if a [out, *] matrix in `fmt` runs through torch's int4 kernel (directly or expanded).

    The kernel takes the affine formats; its packing op needs out % 16 == 0 (true of every real
    model; other shapes take `dequant_linear`).
    """
    return fmt.kind == "affine" and out_features % 16 == 0


def _expanded(fmt: QuantFormat) -> bool:
    """Groups smaller than the kernel allows (16, 8) run as 32-wide groups, zero padded."""
    return fmt.kind == "affine" and fmt.group_size < min(INT4_GROUPS)


def _kernel_group(fmt: QuantFormat) -> int:
    return 32 if _expanded(fmt) else fmt.group_size


# ---------------------------------------------------------------------------------------------
# prepared (kernel) layout


def prepared_fields(fmt: str | QuantFormat, out_features: int, in_features: int) -> FieldSpec:
    """The tensors `prepare_for_cpu` makes for one [out, in] matrix: [(name, shape, dtype), ...].

    Usable directly as (part of) the store's ExpertLayout so that the CPU kernel reads the store.
    """
    fmt = parse_format(fmt)
    if not uses_int4_kernel(fmt, out_features):
        return packed_fields(fmt, out_features, in_features)
    packed_fields(fmt, out_features, in_features)  # shape check
    kernel_in = 2 * in_features if _expanded(fmt) else in_features
    return [
        ("qweight", (out_features, kernel_in // 2), torch.uint8),
        ("scales_and_zeros", (in_features // fmt.group_size, out_features, 2), torch.bfloat16),
    ]


def code_offset(bits: int) -> int:
    """What is added to a `bits`-bit code to put it in the int4 kernel's slot, centred on 8."""
    return 8 - 2 ** (bits - 1)


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Our (scale, zero) [out, groups] -> torch's bf16 [groups, out, 2].

    With slot code q4 = q + code_offset(bits): (q - zero) * scale = (q4 - 8) * S + Z for
    S = scale and Z = (2**(bits-1) - zero) * scale.
    """
    s = scale.float()
    z = (2 ** (bits - 1) - zero.float()) * s
    return torch.stack([s, z], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


def cpu_int4_block_n() -> int | None:
    """BLOCK_N of this machine's `_convert_weight_to_int4pack_for_cpu` layout (64 or 32).

    Found by packing a small probe matrix with torch's own op; None if its layout is neither
    known one (then `prepare_for_cpu` falls back to calling the op on the whole matrix).
    """
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (128, 64), generator=gen, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 2)
    for block_n in (64, 32):
        blocks = probe.to(torch.uint8).reshape(-1, 2, block_n // 2, 64)  # [nb, lo/hi, j, k]
        guess = (blocks[:, 0] | (blocks[:, 1] << 4)).transpose(1, 2).reshape(128, 32)
        if torch.equal(guess, packed):
            return block_n
    return None


def prepare_for_cpu(
    fields: dict[str, torch.Tensor],
    fmt: str | QuantFormat,
    out_features: int,
    in_features: int,
    *,
    dest: dict[str, torch.Tensor] | None = None,
    block_n: int | None = None,
) -> dict[str, torch.Tensor]:
    """Canonical packed fields of one matrix -> the layout `linear` runs fastest on the CPU.

    Done once, when weights enter the memory the kernel reads (at load, or after a copy into a
    cache slot). `dest` (tensors shaped as `prepared_fields`, e.g. store or slot views) is
    written in place and returned; otherwise new tensors are allocated. Formats without an
    int4 mapping (nf4, dense) are returned as they are (copied into `dest` if given).
    `block_n`: `cpu_int4_block_n()`, probed here (a few ms) when not given; pass it when
    preparing many matrices.
    """
    fmt = parse_format(fmt)
    if not uses_int4_kernel(fmt, out_features):
        if dest is None:
            return dict(fields)
        for name, tensor in fields.items():
            dest[name].copy_(tensor)
        return dest
    spec = prepared_fields(fmt, out_features, in_features)
    if dest is None:
        dest = {name: torch.empty(shape, dtype=dtype) for name, shape, dtype in spec}
    dest["scales_and_zeros"].copy_(scales_and_zeros(fields["scale"], fields["zero"], fmt.bits))
    if block_n is None:
        block_n = cpu_int4_block_n()
    _relayout_codes_cpu(fields["qweight"], fmt, out_features, in_features, dest["qweight"], block_n)
    return dest


def _relayout_codes_cpu(
    qweight: torch.Tensor,
    fmt: QuantFormat,
    out_features: int,
    in_features: int,
    dest: torch.Tensor,
    block_n: int | None,
) -> None:
    """Packed 2/3/4-bit codes [out, in*bits/8] -> the CPU int4 kernel's qweight, into `dest`.

    Pure tensor ops: for each pair of rows (j, j + BLOCK_N/2) of a block, combine their codes
    into bytes, then transpose each block to [in, BLOCK_N/2]. 5-10x faster than unpacking to
    int32 and calling `_convert_weight_to_int4pack_for_cpu`, which is the fallback.
    """
    expand = _expanded(fmt)
    if block_n is None or out_features % block_n:
        codes = unpack_codes(qweight, fmt.bits, in_features) + code_offset(fmt.bits)
        if expand:
            codes = _expand_groups(codes, fmt.group_size)
        dest.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2))
        return
    half = block_n // 2
    per_byte = 8 // fmt.bits if fmt.bits != 3 else 8  # codes per packing unit (3-bit: 8 per 3 bytes)
    units = in_features // per_byte
    n_blocks = out_features // block_n
    kernel_in = 2 * in_features if expand else in_features
    out_blocks = dest.view(n_blocks, kernel_in, half)
    group = fmt.group_size
    if expand:
        # kernel column 32*g + t holds real column group*g + t for t < group, zero codes after
        grouped = out_blocks.view(n_blocks, in_features // group, 32 // group, group, half)
        grouped[:, :, 1:].zero_()
        real = grouped[:, :, 0]  # [nb, in/group, group, half]
        target = real.view(n_blocks, in_features // group, group // per_byte, per_byte, half)
    else:
        target = out_blocks.view(n_blocks, units, per_byte, half)
    src = qweight.view(n_blocks, 2, half, -1)  # rows j (low nibble) and j + half (high nibble)
    offset = code_offset(fmt.bits)
    step = 4  # blocks per chunk: keeps the temporaries in L2
    for b0 in range(0, n_blocks, step):
        lo_rows, hi_rows = src[b0 : b0 + step, 0], src[b0 : b0 + step, 1]
        for i, (lo, hi) in enumerate(zip(_code_planes(lo_rows, fmt.bits), _code_planes(hi_rows, fmt.bits))):
            if offset:
                lo, hi = lo + offset, hi + offset
            byte = (lo | (hi << 4)).transpose(-1, -2)  # [chunk, units, half]
            if expand:
                byte = byte.reshape(byte.shape[0], in_features // group, group // per_byte, half)
                target[b0 : b0 + step, :, :, i].copy_(byte)
            else:
                target[b0 : b0 + step, :, i].copy_(byte)


def _code_planes(packed: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Packed bytes [..., in*bits/8] -> per position i in a packing unit, codes [..., units]."""
    if bits == 4:
        return [packed & 0x0F, packed >> 4]
    if bits == 2:
        return [(packed >> s) & 0x03 for s in (0, 2, 4, 6)]
    if bits == 3:
        b = packed.reshape(*packed.shape[:-1], -1, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        return [((word >> (3 * i)) & 0x07).to(torch.uint8) for i in range(8)]
    raise ValueError(f"no int4 mapping for {bits}-bit codes")


def _expand_groups(codes: torch.Tensor, group: int) -> torch.Tensor:
    """codes [out, in] -> [out, in * 32/group]: each group followed by zero codes up to 32."""
    out_features, in_features = codes.shape
    wide = torch.zeros(out_features, in_features // group, 32, dtype=codes.dtype)
    wide[:, :, :group] = codes.view(out_features, -1, group)
    return wide.view(out_features, -1)


def _expand_input(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [T, in] -> [T, in * 32/group] with zeros where `_expand_groups` put zero codes."""
    wide = x.new_zeros(x.shape[0], x.shape[1] // group, 32)
    wide[:, :, :group] = x.view(x.shape[0], -1, group)
    return wide.view(x.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# matmuls


def linear(x: torch.Tensor, prepared: dict[str, torch.Tensor], fmt: str | QuantFormat) -> torch.Tensor:
    """x [T, in] @ W^T -> [T, out] in x's dtype, for one prepared (or canonical nf4/dense) matrix.

    The int4 kernels compute in bf16 (fp32 accumulation): fp32 and fp16 inputs are rounded to
    bf16 first (torch's fp32 CPU variant is ~40x slower here), which is far below 2-4 bit
    quantization error. nf4 and other canonical fields take `dequant_linear` (fp32).
    """
    fmt = parse_format(fmt)
    if fmt.kind == "dense":
        weight = prepared["weight"]
        return F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype))
    if "scales_and_zeros" not in prepared:
        return dequant_linear(x, prepared, fmt)
    if x.shape[0] == 0:
        return x.new_empty(0, prepared["scales_and_zeros"].shape[1])
    if x.is_cuda:
        return _int4_linear_cuda(x, prepared, fmt)
    xb = x.to(torch.bfloat16).contiguous()
    if _expanded(fmt):
        xb = _expand_input(xb, fmt.group_size)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        xb, prepared["qweight"], _kernel_group(fmt), prepared["scales_and_zeros"]
    )
    return y.to(x.dtype)


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
    nf4_table = _nf4_byte_table(x.device) if fmt.kind == "nf4" else None
    for r0 in range(0, out_features, _DEQUANT_ROWS):
        rows = slice(r0, min(r0 + _DEQUANT_ROWS, out_features))
        if nf4_table is not None:
            w = _nf4_dequant_rows(fields["qweight"][rows], fields["absmax"][rows], nf4_table, in_features)
        else:
            part = {name: t[rows] for name, t in fields.items()}
            w = dequantize(unpack(part, fmt, (part["qweight"].shape[0], in_features)), torch.float32)
        y[:, rows] = F.linear(xf, w)
    return y.to(x.dtype)


def _nf4_byte_table(device: torch.device) -> torch.Tensor:
    """int64 [256]: the two fp32 NF4 values of every packed byte (high nibble first), as bits."""
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
# CUDA (untested here: no GPU on the development machines)


def prepare_for_cuda(
    fields: dict[str, torch.Tensor], fmt: str | QuantFormat, out_features: int, in_features: int
) -> dict[str, torch.Tensor]:
    """Canonical fields already on the GPU -> `_weight_int4pack_mm`'s layout (kernel groups only).

    Other formats (hqq2's group 16, nf4, dense) stay canonical and take `dequant_linear`.
    """
    fmt = parse_format(fmt)
    if not uses_int4_kernel(fmt, out_features) or _expanded(fmt):
        return dict(fields)
    codes = unpack_codes(fields["qweight"], fmt.bits, in_features).to(torch.int32) + code_offset(fmt.bits)
    pairs = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)  # CUDA wants the first code high
    tiles = next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)
    return {
        "qweight": torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), tiles),
        "scales_and_zeros": scales_and_zeros(fields["scale"], fields["zero"], fmt.bits),
    }


def _int4_linear_cuda(x: torch.Tensor, prepared: dict[str, torch.Tensor], fmt: QuantFormat) -> torch.Tensor:
    y = torch.ops.aten._weight_int4pack_mm(
        x.to(torch.bfloat16).contiguous(), prepared["qweight"], fmt.group_size, prepared["scales_and_zeros"]
    )
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# whole experts


def expert_fields(fmt: str | QuantFormat, hidden: int, intermediate: int, *, prepared: bool = True) -> FieldSpec:
    """One gated expert's fields for an ExpertLayout: gate_up [2F, H] and down [H, F].

    Dense formats give exactly ExpertLayout.dense's fields ("gate_up", "down"); quantized ones
    prefix each matrix's fields ("gate_up.qweight", "down.scales_and_zeros", ...).
    prepared=False gives the canonical (converted checkpoint) fields instead.
    """
    fmt = parse_format(fmt)
    if fmt.kind == "dense":
        return [("gate_up", (2 * intermediate, hidden), fmt.dtype), ("down", (hidden, intermediate), fmt.dtype)]
    per_matrix = prepared_fields if prepared else packed_fields
    return [
        (f"{matrix}.{name}", shape, dtype)
        for matrix, (out_f, in_f) in (("gate_up", (2 * intermediate, hidden)), ("down", (hidden, intermediate)))
        for name, shape, dtype in per_matrix(fmt, out_f, in_f)
    ]


def matrix_fields(fields: dict[str, torch.Tensor], matrix: str) -> dict[str, torch.Tensor]:
    """The fields of one matrix ("gate_up" or "down") of an expert's prefixed field dict."""
    prefix = matrix + "."
    return {name[len(prefix) :]: t for name, t in fields.items() if name.startswith(prefix)}


def prepare_expert_for_cpu(
    fields: dict[str, torch.Tensor],
    fmt: str | QuantFormat,
    hidden: int,
    intermediate: int,
    *,
    dest: dict[str, torch.Tensor] | None = None,
    block_n: int | None = None,
) -> dict[str, torch.Tensor]:
    """`prepare_for_cpu` on both matrices of an expert (prefixed canonical -> prefixed prepared)."""
    fmt = parse_format(fmt)
    if fmt.kind == "dense":
        if dest is None:
            return dict(fields)
        for name, tensor in fields.items():
            dest[name].copy_(tensor)
        return dest
    if block_n is None and fmt.kind == "affine":
        block_n = cpu_int4_block_n()
    out: dict[str, torch.Tensor] = {}
    for matrix, (out_f, in_f) in (("gate_up", (2 * intermediate, hidden)), ("down", (hidden, intermediate))):
        sub_dest = matrix_fields(dest, matrix) if dest is not None else None
        prepared = prepare_for_cpu(matrix_fields(fields, matrix), fmt, out_f, in_f, dest=sub_dest, block_n=block_n)
        out.update({f"{matrix}.{name}": t for name, t in prepared.items()})
    return out


def expert_forward(
    x: torch.Tensor,  # [T_e, H] tokens routed to this expert
    fields: dict[str, torch.Tensor],  # expert_fields(fmt, ...) views, prepared
    fmt: str | QuantFormat,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:  # [T_e, H]
    """dense_expert_forward for any format: fused gate_up matmul, act(gate) * up, down matmul."""
    fmt = parse_format(fmt)
    if fmt.kind == "dense":
        gate, up = F.linear(x, fields["gate_up"]).chunk(2, dim=-1)
        return F.linear(act_fn(gate) * up, fields["down"])
    gate, up = linear(x, matrix_fields(fields, "gate_up"), fmt).chunk(2, dim=-1)
    return linear(act_fn(gate) * up, matrix_fields(fields, "down"), fmt)
