"""The closeness a 4-bit model's logits must reach against a reference holding the same
dequantized weights, shared by the per-family tests.

Per position: the kernels round scales to bf16 and activations to bf16 (torch's) or to int8 in
blocks of 32 (offload_moe's own, ~0.5% per matmul, tests/test_int4_gemv.py); a position whose
router or top logit was near a tie may flip, so the median is checked, and 3 of 4 top tokens."""

from __future__ import annotations

import torch


def assert_quantized_logits_close(want: torch.Tensor, got: torch.Tensor, what: str = "") -> None:
    rel = ((want - got).norm(dim=-1) / want.norm(dim=-1))[0]
    assert rel.median() < 0.02, f"{what}: median relative logit error {rel.median():.4f}"
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.75
