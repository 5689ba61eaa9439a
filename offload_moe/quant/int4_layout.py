"""torch's int4 kernel layouts: canonical packed codes <-> the CPU kernel's layout, both ways.

The canonical packed layout (offload_moe.quant.quantize) is machine independent. The fastest CPU kernel,
``torch.ops.aten._weight_int4pack_mm_for_cpu``, wants its own layout instead ("prepared"):

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
above. Centring keeps |Z| small, which keeps its bf16 rounding error small. The kernel accepts
groups of 32..256 only; hqq2's group of 16 is run through it by spreading every 16 input columns
over a 32-column group whose other 16 columns are zero codes multiplied by zero inputs
(``in' = 2 * in``: "expanded").

The way back, `kernel_codes_from_cpu` (prepared qweight -> the kernel's 4-bit slot codes
``[out, in']``), is exact and runs on any device: `canonical_qweight_from_cpu` inverts
`prepare_for_cpu`'s code re-layout bit for bit, `dequantize_cpu_blocks` turns prepared blocks
into the very fp32 weights the kernel multiplies by (the prefill path of offload_moe.quant.matmul),
and offload_moe.quant.cuda_int4 builds the CUDA kernel's layout from it on the GPU.

All functions are pure: tensors in, tensors out; no module state (`cpu_int4_block_n` memoises
a probe of the torch build and CPU, a constant of the process).
"""

from __future__ import annotations

import functools

import torch

from offload_moe.quant.quantize import pack_codes, packed_fields, unpack_codes
from offload_moe.quant.formats import QuantFormat, parse_format
from offload_moe.quant.formats import FormatKind

FieldSpec = list[tuple[str, tuple[int, ...], torch.dtype]]

INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 kernels accept
_DEQUANT_ROWS = 256  # rows dequantized at a time on the fallback path (4 MiB fp32: stays in cache)


def uses_int4_kernel(fmt: QuantFormat, out_features: int) -> bool:
    """True if a [out, *] matrix in `fmt` runs through torch's int4 kernel (directly or expanded).

    The kernel takes the affine formats; its packing op needs out % 16 == 0 (true of every real
    model; other shapes take `dequant_linear`).
    """
    return fmt.kind is FormatKind.AFFINE and out_features % 16 == 0


def expanded_groups(fmt: QuantFormat) -> bool:
    """Groups smaller than the kernel allows (16, 8) run as 32-wide groups, zero padded."""
    return fmt.kind is FormatKind.AFFINE and fmt.group_size < min(INT4_GROUPS)


def kernel_group(fmt: QuantFormat) -> int:
    return 32 if expanded_groups(fmt) else fmt.group_size


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
    kernel_in = 2 * in_features if expanded_groups(fmt) else in_features
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


@functools.cache
def cpu_int4_block_n() -> int | None:
    """BLOCK_N of this machine's `_convert_weight_to_int4pack_for_cpu` layout (64 or 32).

    Found by packing a small probe matrix with torch's own op; None if its layout is neither
    known one (then `prepare_for_cpu` falls back to calling the op on the whole matrix, and
    the layout cannot be read back). Memoised: it is a fact of the torch build and the CPU,
    fixed for the process, and the prefill path needs it on every call.
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
    into bytes, then transpose each block to [in, BLOCK_N/2]: much faster than unpacking to
    int32 and calling `_convert_weight_to_int4pack_for_cpu`, which is the fallback.
    """
    expand = expanded_groups(fmt)
    if block_n is None or out_features % block_n:
        codes = unpack_codes(qweight, fmt.bits, in_features) + code_offset(fmt.bits)
        if expand:
            codes = expand_groups(codes, fmt.group_size)
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


def expand_groups(codes: torch.Tensor, group: int) -> torch.Tensor:
    """codes [out, in] -> [out, in * 32/group]: each group followed by zero codes up to 32."""
    out_features, in_features = codes.shape
    wide = torch.zeros(out_features, in_features // group, 32, dtype=codes.dtype)
    wide[:, :, :group] = codes.view(out_features, -1, group)
    return wide.view(out_features, -1)


def expand_input(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [T, in] -> [T, in * 32/group] with zeros where `expand_groups` put zero codes."""
    wide = x.new_zeros(x.shape[0], x.shape[1] // group, 32)
    wide[:, :, :group] = x.view(x.shape[0], -1, group)
    return wide.view(x.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# the way back: prepared (CPU kernel) layout -> codes, canonical bytes, weights


def kernel_in_features(fmt: QuantFormat, in_features: int) -> int:
    """Input columns the int4 kernel sees: in, or 2 * in for expanded (group 16) formats."""
    return 2 * in_features if expanded_groups(fmt) else in_features


def kernel_codes_from_cpu(qweight: torch.Tensor, kernel_in: int, block_n: int) -> torch.Tensor:
    """The CPU kernel's qweight [out, kernel_in/2] -> its 4-bit slot codes uint8 [out, kernel_in].

    The exact inverse of the re-layout (`_relayout_codes_cpu`, or torch's own packing op): byte
    (k, j) of block b holds row b*BLOCK_N + j in its low nibble and row b*BLOCK_N + j + BLOCK_N/2
    in its high nibble. Pure tensor ops: runs on whatever device `qweight` is on.
    """
    out_features = qweight.shape[0]
    if out_features % block_n:
        raise ValueError(f"{out_features} rows are not whole blocks of {block_n}")
    blocks = qweight.reshape(out_features // block_n, kernel_in, block_n // 2)  # [nb, K', half]
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=1)  # [nb, lo/hi, K', half]
    return codes.transpose(-1, -2).reshape(out_features, kernel_in)  # row = b*BLOCK_N + lo/hi*half + j


def canonical_qweight_from_cpu(
    qweight: torch.Tensor, fmt: str | QuantFormat, out_features: int, in_features: int, block_n: int
) -> torch.Tensor:
    """The CPU kernel's qweight -> the canonical packed qweight it was made from, bit for bit.

    (scales_and_zeros holds bf16-rounded S and Z, from which fp16 scale and zero cannot be
    recovered exactly; nothing needs them back.)
    """
    fmt = parse_format(fmt)
    kernel_in = kernel_in_features(fmt, in_features)
    codes = kernel_codes_from_cpu(qweight, kernel_in, block_n)  # [out, K']
    if expanded_groups(fmt):  # keep the real columns of every 32-wide kernel group
        codes = codes.view(out_features, in_features // fmt.group_size, 32)[:, :, : fmt.group_size]
        codes = codes.reshape(out_features, in_features)
    return pack_codes(codes - code_offset(fmt.bits), fmt.bits)


def dequantize_cpu_blocks(
    qweight_blocks: torch.Tensor,  # [c, K', BLOCK_N/2] uint8: c blocks of the CPU kernel's qweight
    sz_rows: torch.Tensor,  # [in/group, c*BLOCK_N, 2] bf16: their scales_and_zeros columns
    fmt: QuantFormat,
    in_features: int,
    out: torch.Tensor,  # [in, c*BLOCK_N] (a strided column slice is fine): receives W^T
) -> None:
    """W^T of c row blocks, straight from the prepared layout, written into `out`.

    The fp32 weight is ``(q - 8) * S + Z``, the kernel's own arithmetic ((q - 8) * S is exact
    in fp32, so the one rounding is the add's, as in the kernel's fused multiply-add); `out`'s
    dtype then rounds it once more (bf16: the kernel's weights to within half a bf16 ulp).
    W^T rather than W because the layout stores each block as [K', BLOCK_N] already: no
    transpose, only contiguous runs of BLOCK_N.
    """
    c, _, half = qweight_blocks.shape  # [c, K', BLOCK_N/2]
    block_n = 2 * half
    group = fmt.group_size
    groups = in_features // group
    codes = torch.stack([qweight_blocks & 0x0F, qweight_blocks >> 4], dim=2)  # [c, K', 2, half]
    codes = codes.view(c, groups, kernel_group(fmt), block_n)
    if expanded_groups(fmt):
        codes = codes[:, :, :group]  # [c, G, group, BLOCK_N]: the real columns
    w = codes.float().sub_(8)  # [c, G, group, BLOCK_N]
    params = sz_rows.view(groups, c, block_n, 2).permute(1, 0, 2, 3).unsqueeze(2)  # [c, G, 1, BLOCK_N, 2]
    w.mul_(params[..., 0].float()).add_(params[..., 1].float())
    out.view(in_features, c, block_n).copy_(w.view(c, in_features, block_n).transpose(0, 1))
