"""Weight quantization: pure quantize/dequantize functions and one canonical packed byte layout.

Everything here is a function of tensors: no modules, no devices, no global state. A weight
matrix ``w [out, in]`` becomes a :class:`QTensor` (codes plus per-group parameters) and back:

* ``hqq4``, ``hqq3``, ``hqq2``, ``hqq2g64`` -- groupwise asymmetric (affine) quantization along
  the input dimension: each row is cut into groups of ``group_size`` consecutive input columns
  and every group has its own ``scale`` and ``zero``::

      q = clamp(round(w / scale + zero), 0, 2**bits - 1)        w ~= (q - zero) * scale

  ``zero`` is a float (not rounded), as in HQQ. ``optimize=False`` is round-to-nearest from the
  group's min/max; ``optimize=True`` refines ``zero`` with HQQ's half-quadratic proximal solver
  (``hqq.core.optimize.optimize_weights_proximal``; ``pip install hqq``).
* ``nf4`` -- bitsandbytes' NormalFloat4: per block of 64 input columns, ``absmax`` scale and
  the nearest of 16 fixed codebook values, ``w ~= NF4_CODEBOOK[q] * absmax``. Implemented here
  (bitsandbytes is not needed).
* ``bf16``, ``fp16`` -- no quantization, the weight is kept in that dtype.

Canonical packed layout (what a converted checkpoint stores, machine independent), per matrix:

* 4-bit affine: ``qweight`` uint8 ``[out, in/2]``, byte j = ``q[2j] | q[2j+1] << 4``;
  ``scale``, ``zero`` fp16 ``[out, in/group]``.
* 3-bit affine: ``qweight`` uint8 ``[out, 3*in/8]``, 8 codes in 3 bytes: the 24-bit
  little-endian word ``sum(q[8j+i] << 3i)``; ``scale``, ``zero`` as above.
* 2-bit affine: ``qweight`` uint8 ``[out, in/4]``, byte j = ``sum(q[4j+i] << 2i)``;
  ``scale``, ``zero`` as above.
* nf4: ``qweight`` uint8 ``[out, in/2]``, byte j = ``q[2j] << 4 | q[2j+1]`` (first code high,
  as bitsandbytes, whose ``dequantize_4bit`` reads these bytes as they are); ``absmax`` fp32
  ``[out, in/64]``.
* bf16 / fp16: ``weight`` ``[out, in]`` in that dtype.

3-bit uses 8 codes in 3 bytes (exactly 3 bits per weight; HQQ's 10-in-32 wastes 2 bits in 32).
Bits per weight including parameters: hqq4 4.5, hqq3 3.5, hqq2 4.0 (group 16!), hqq2g64 2.5,
nf4 4.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload_moe.errors import ConfigError
from offload_moe.quant.formats import QuantFormat, check_shape, parse_format
from offload_moe.quant.formats import FormatKind

# bitsandbytes' NF4 values (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1), scaled to [-1, 1].
NF4_CODEBOOK: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

PARAM_DTYPE = torch.float16  # scale and zero of the affine formats
_MAX_INV_SCALE = 2e4  # as HQQ: keeps 1/scale and scale representable in fp16
_MAX_ZERO = 3e4  # keeps zero = -min/scale inside fp16's range for near-constant groups


@dataclass(frozen=True)
class QTensor:
    """A quantized matrix: codes plus per-group parameters (unpacked, one code per uint8).

    affine: codes uint8 [out, in] in [0, 2**bits), scale and zero fp16 [out, in/group].
    nf4:    codes uint8 [out, in] in [0, 16) indexing NF4_CODEBOOK, scale = absmax fp32
            [out, in/64], zero None.
    dense:  codes is the weight itself [out, in] in the format's dtype, scale and zero None.
    """

    fmt: QuantFormat
    shape: tuple[int, int]
    codes: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# quantize / dequantize


def quantize(w: torch.Tensor, fmt: str | QuantFormat, *, optimize: bool) -> QTensor:
    """Quantize `w [out, in]` to `fmt`.

    optimize=True refines the affine formats' zero points with HQQ's proximal optimiser (needs
    the `hqq` package); optimize=False is round-to-nearest from each group's min and max.
    nf4 and the dense formats have nothing to optimise and ignore the flag.
    """
    fmt = parse_format(fmt)
    if w.dim() != 2:
        raise ConfigError(f"quantize expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out_features, in_features = w.shape
    check_shape(fmt, out_features, in_features)
    if fmt.kind is FormatKind.DENSE:
        return QTensor(fmt, (out_features, in_features), w.to(fmt.dtype).contiguous())
    if fmt.kind is FormatKind.NF4:
        return _quantize_nf4(w, fmt)
    return _quantize_affine(w, fmt, optimize)


def _quantize_affine(w: torch.Tensor, fmt: QuantFormat, optimize: bool) -> QTensor:
    out_features, in_features = w.shape
    wg = w.detach().float().reshape(out_features, in_features // fmt.group_size, fmt.group_size)
    lo = wg.amin(dim=-1, keepdim=True)
    hi = wg.amax(dim=-1, keepdim=True)
    # HQQ's parametrisation: q = round(w * inv_scale + zero)
    inv_scale = fmt.max_code / (hi - lo).clamp_min(1e-12)
    inv_scale = inv_scale.clamp_max(_MAX_INV_SCALE)
    inv_scale = torch.minimum(inv_scale, _MAX_ZERO / lo.abs().clamp_min(1e-12))
    zero = -lo * inv_scale
    if optimize:
        inv_scale, zero = _hqq_optimize(wg, inv_scale, zero, fmt.max_code)
    scale = (1.0 / inv_scale).to(PARAM_DTYPE)
    zero = zero.clamp(-_MAX_ZERO, _MAX_ZERO).to(PARAM_DTYPE)
    # codes from the stored (fp16-rounded) parameters, so dequantize(quantize(w)) is consistent
    codes = (wg / scale.float() + zero.float()).round_().clamp_(0, fmt.max_code).to(torch.uint8)
    return QTensor(
        fmt,
        (out_features, in_features),
        codes.reshape(out_features, in_features),
        scale.reshape(out_features, -1),
        zero.reshape(out_features, -1),
    )


def _hqq_optimize(
    wg: torch.Tensor, inv_scale: torch.Tensor, zero: torch.Tensor, max_code: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's proximal solver on groups laid out one per row (axis=1); returns (inv_scale, zero)."""
    try:
        from hqq.core.optimize import optimize_weights_proximal
    except ImportError as exc:
        raise ConfigError(
            "optimize=True uses the HQQ optimiser, which needs the `hqq` package: "
            "`pip install hqq` (tested with 0.2.8.post1), or quantize with optimize=False "
            "(round-to-nearest)"
        ) from exc
    groups = wg.reshape(-1, wg.shape[-1])
    _, inv_scale_opt, zero_opt = optimize_weights_proximal(
        tensor=groups,
        scale=inv_scale.reshape(-1, 1),
        zero=zero.reshape(-1, 1),
        min_max=[0, max_code],
        axis=1,
        device="cpu" if groups.device.type == "cpu" else groups.device,
    )
    return inv_scale_opt.float().reshape(inv_scale.shape), zero_opt.float().reshape(zero.shape)


def _quantize_nf4(w: torch.Tensor, fmt: QuantFormat) -> QTensor:
    out_features, in_features = w.shape
    wg = w.detach().float().reshape(out_features, in_features // fmt.group_size, fmt.group_size)
    absmax = wg.abs().amax(dim=-1, keepdim=True)
    normed = wg / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    book = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=w.device)
    midpoints = (book[1:] + book[:-1]) / 2
    codes = torch.bucketize(normed, midpoints).to(torch.uint8)  # nearest codebook value
    return QTensor(
        fmt, (out_features, in_features), codes.reshape(out_features, in_features), absmax.reshape(out_features, -1)
    )


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [out, in] matrix `q` stands for, computed in fp32 and returned in `dtype`."""
    fmt = q.fmt
    if fmt.kind is FormatKind.DENSE:
        return q.codes.to(dtype)
    out_features, in_features = q.shape
    groups = in_features // fmt.group_size
    codes = q.codes.reshape(out_features, groups, fmt.group_size)
    if fmt.kind is FormatKind.NF4:
        book = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=codes.device)
        w = book[codes.long()] * q.scale.float().reshape(out_features, groups, 1)
    else:
        scale = q.scale.float().reshape(out_features, groups, 1)
        zero = q.zero.float().reshape(out_features, groups, 1)
        w = (codes.float() - zero) * scale
    return w.reshape(out_features, in_features).to(dtype)


# ---------------------------------------------------------------------------------------------
# packing


def packed_fields(fmt: str | QuantFormat, out_features: int, in_features: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The canonical packed tensors of one [out, in] matrix: [(name, shape, dtype), ...].

    Enough to build an ExpertLayout without quantizing anything.
    """
    fmt = parse_format(fmt)
    check_shape(fmt, out_features, in_features)
    if fmt.kind is FormatKind.DENSE:
        return [("weight", (out_features, in_features), fmt.dtype)]
    qweight = ("qweight", (out_features, in_features * fmt.bits // 8), torch.uint8)
    groups = in_features // fmt.group_size
    if fmt.kind is FormatKind.NF4:
        return [qweight, ("absmax", (out_features, groups), torch.float32)]
    return [qweight, ("scale", (out_features, groups), PARAM_DTYPE), ("zero", (out_features, groups), PARAM_DTYPE)]


def pack(qt: QTensor) -> dict[str, torch.Tensor]:
    """QTensor -> its canonical packed tensors (names and shapes as `packed_fields`)."""
    fmt = qt.fmt
    if fmt.kind is FormatKind.DENSE:
        return {"weight": qt.codes}
    if fmt.kind is FormatKind.NF4:
        pairs = qt.codes.to(torch.uint8).reshape(qt.shape[0], -1, 2)
        qweight = ((pairs[..., 0] << 4) | pairs[..., 1]).contiguous()  # bitsandbytes' nibble order
        return {"qweight": qweight, "absmax": qt.scale.float().contiguous()}
    qweight = pack_codes(qt.codes, fmt.bits)
    return {
        "qweight": qweight,
        "scale": qt.scale.to(PARAM_DTYPE).contiguous(),
        "zero": qt.zero.to(PARAM_DTYPE).contiguous(),
    }


def unpack(fields: dict[str, torch.Tensor], fmt: str | QuantFormat, shape: tuple[int, int]) -> QTensor:
    """Canonical packed tensors -> QTensor (the inverse of `pack`)."""
    fmt = parse_format(fmt)
    out_features, in_features = shape
    if fmt.kind is FormatKind.DENSE:
        return QTensor(fmt, (out_features, in_features), fields["weight"])
    if fmt.kind is FormatKind.NF4:
        qweight = fields["qweight"]
        codes = torch.stack([qweight >> 4, qweight & 0x0F], dim=-1).reshape(out_features, in_features)
        return QTensor(fmt, (out_features, in_features), codes, fields["absmax"])
    codes = unpack_codes(fields["qweight"], fmt.bits, in_features)
    return QTensor(fmt, (out_features, in_features), codes, fields["scale"], fields["zero"])


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [out, in] (each < 2**bits) -> packed uint8 [out, in * bits / 8]."""
    out_features, in_features = codes.shape
    c = codes.to(torch.uint8)
    if bits == 4:
        c = c.reshape(out_features, -1, 2)
        return (c[..., 0] | (c[..., 1] << 4)).contiguous()
    if bits == 2:
        c = c.reshape(out_features, -1, 4)
        return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).contiguous()
    if bits == 3:
        c = c.reshape(out_features, -1, 8).to(torch.int32)
        word = c[..., 0]
        for i in range(1, 8):
            word = word | (c[..., i] << (3 * i))
        out = torch.stack([word & 0xFF, (word >> 8) & 0xFF, word >> 16], dim=-1)
        return out.to(torch.uint8).reshape(out_features, -1)
    raise ValueError(f"cannot pack {bits}-bit codes")


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Packed uint8 [out, in * bits / 8] -> uint8 codes [out, in]."""
    out_features = qweight.shape[0]
    if bits == 4:
        return torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(out_features, in_features)
    if bits == 2:
        return torch.stack([(qweight >> s) & 0x03 for s in (0, 2, 4, 6)], dim=-1).reshape(out_features, in_features)
    if bits == 3:
        b = qweight.reshape(out_features, -1, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        codes = torch.stack([(word >> (3 * i)) & 0x07 for i in range(8)], dim=-1)
        return codes.to(torch.uint8).reshape(out_features, in_features)
    raise ValueError(f"cannot unpack {bits}-bit codes")
