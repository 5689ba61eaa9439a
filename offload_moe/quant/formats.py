"""Weight formats: one QuantFormat object for every way an expert or a linear layer is stored.

Dense (unquantized) storage is a format too, so code never tests for "no format": every
expert store, kernel and converted directory is described by exactly one QuantFormat.

This module does not import torch at its top (a dense format names its dtype, resolved when
asked for), so the CLI can list the formats in `--help` without loading torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from offload_moe.errors import ConfigError

if TYPE_CHECKING:
    import torch


class FormatKind(enum.Enum):
    AFFINE = "affine"  # HQQ-style groupwise asymmetric: w = (q - zero) * scale
    NF4 = "nf4"  # bitsandbytes NormalFloat4 codebook, absmax per block
    DENSE = "dense"  # the weight itself, in the format's dtype
    INT8 = "int8"  # symmetric int8, one fp32 scale per 32 input columns (offload_moe.quant.q8)



@dataclass(frozen=True)
class QuantFormat:
    """One weight format: how many bits, what kind of code, and the group size."""

    name: str
    kind: FormatKind
    bits: int  # code width; the dtype's width for the dense formats
    group_size: int | None  # input columns sharing one scale (and zero); None for dense
    dtype_name: str | None = None  # the weight dtype of a dense format, as torch names it

    @property
    def dtype(self) -> torch.dtype | None:
        """The weight dtype of a dense format (None for the quantized ones)."""
        if self.dtype_name is None:
            return None
        import torch  # a dense format's dtype is only asked for where torch is already in use

        return getattr(torch, self.dtype_name)

    @property
    def quantized(self) -> bool:
        return self.kind is not FormatKind.DENSE

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, group parameters included."""
        if self.kind is FormatKind.DENSE:
            return float(self.bits)
        param_bits = 32 if self.kind is FormatKind.NF4 else 2 * 16
        return self.bits + param_bits / self.group_size



FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat("hqq4", FormatKind.AFFINE, 4, 64),
        QuantFormat("hqq3", FormatKind.AFFINE, 3, 64),
        QuantFormat("hqq2", FormatKind.AFFINE, 2, 16),
        QuantFormat("hqq2g64", FormatKind.AFFINE, 2, 64),
        QuantFormat("nf4", FormatKind.NF4, 4, 64),
        QuantFormat("bf16", FormatKind.DENSE, 16, None, "bfloat16"),
        QuantFormat("fp16", FormatKind.DENSE, 16, None, "float16"),
        QuantFormat("fp32", FormatKind.DENSE, 32, None, "float32"),
    )
}



# Formats for the attention projections only (attention="q8"): their kernel runs on the CPU and
# no expert path takes them, so they are not in FORMATS (what `experts=` accepts).
ATTENTION_ONLY: dict[str, QuantFormat] = {"q8": QuantFormat("q8", FormatKind.INT8, 8, 32)}
ATTENTION_FORMATS: dict[str, QuantFormat] = {**{n: f for n, f in FORMATS.items() if f.quantized}, **ATTENTION_ONLY}


def _lookup(table: dict[str, QuantFormat], name: str | QuantFormat, refusal: str) -> QuantFormat:
    """`name`'s format in `table` (case-insensitive); ConfigError `refusal` naming the valid ones."""
    if isinstance(name, QuantFormat):
        return name
    fmt = table.get(str(name).strip().lower())
    if fmt is None:
        raise ConfigError(f"{refusal}; valid: {', '.join(table)}")
    return fmt


def parse_attention_format(name: str | QuantFormat) -> QuantFormat:
    """The attention format called `name`; ConfigError naming the valid ones."""
    return _lookup(ATTENTION_FORMATS, name, f"attention={name!r} is not an attention format")


def parse_format(name: str | QuantFormat) -> QuantFormat:
    """The QuantFormat called `name` (case-insensitive); ConfigError naming the valid ones."""
    return _lookup(FORMATS, name, f"unknown quantization format {name!r}")



def dense_format(dtype: torch.dtype) -> QuantFormat:
    """The unquantized format of `dtype` (the compute dtype of experts kept as they are)."""
    for fmt in FORMATS.values():
        if fmt.kind is FormatKind.DENSE and fmt.dtype == dtype:
            return fmt
    raise ConfigError(f"dtype={dtype} has no unquantized expert format; use float32, bfloat16 or float16")


def check_shape(fmt: QuantFormat, out_features: int, in_features: int) -> None:
    """ConfigError unless a [out, in] matrix can be stored in `fmt`."""
    if out_features <= 0 or in_features <= 0:
        raise ConfigError(f"cannot quantize an empty [{out_features}, {in_features}] matrix")
    if fmt.quantized:
        if in_features % fmt.group_size:  # every group size is a multiple of 8: packing fits too
            raise ConfigError(
                f"format {fmt.name!r} needs the input dimension to be a multiple of {fmt.group_size}, "
                f"got a [{out_features}, {in_features}] matrix"
            )
