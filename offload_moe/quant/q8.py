"""The "q8" weight format (attention only): int8 codes with one fp32 scale per row and block of 32
columns, as llama.cpp's Q8_0, and the int8 rounding of the activations its kernel multiplies.

Pure functions of tensors (no modules, no state). For a weight w [N, K] (K a multiple of 32):

    s[n, b] = max |w[n, 32b : 32b + 32]| / 127        q = round(w / s) in [-127, 127] (0 where s = 0)
    dequantize(q, s) = q * s

so the codes never take -128 (the kernel's sign trick needs |q| <= 127) and the largest weight
of every block is exact up to its scale's rounding. `round_activations` is the same rounding of
the inputs, one block of 32 per scale, exactly as offload_moe/quant/dense_kernel.c does it:
the kernel's answer is `round_activations(x) @ dequantize(q, s).T` up to fp32 summation order.
"""

from __future__ import annotations

import torch

from offload_moe.errors import ConfigError

BLOCK = 32  # columns per scale, for the weights and the activations alike
MAX_CODE = 127


def _blocks(t: torch.Tensor, what: str) -> torch.Tensor:  # [..., K] -> [..., K / 32, 32] fp32
    if t.shape[-1] % BLOCK:
        raise ConfigError(f"q8 needs the input dimension to be a multiple of {BLOCK}; {what} has {t.shape[-1]}")
    return t.float().reshape(*t.shape[:-1], t.shape[-1] // BLOCK, BLOCK)


def _round(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (float, integral) and scales of blocks [..., nb, 32]: the same fp32 operations as the C."""
    amax = blocks.abs().amax(-1, keepdim=True)  # [..., nb, 1]
    inv = torch.where(amax > 0, MAX_CODE / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inv)  # half to even, as lrintf
    return codes, (amax / MAX_CODE).squeeze(-1)


def quantize_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (codes int8 [N, K], scales fp32 [N, K / 32])."""
    codes, scales = _round(_blocks(weight, f"a [{', '.join(map(str, weight.shape))}] weight"))
    return codes.to(torch.int8).reshape(weight.shape).contiguous(), scales.contiguous()


def dequantize_q8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(codes int8 [N, K], scales fp32 [N, K / 32]) -> fp32 [N, K]."""
    return (_blocks(codes, "the codes") * scales.unsqueeze(-1)).reshape(codes.shape)


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] rounded to int8 per block of 32 and scaled back (fp32): what the kernel multiplies."""
    codes, scales = _round(_blocks(x, "the input"))
    return (codes * scales.unsqueeze(-1)).reshape(x.shape)
