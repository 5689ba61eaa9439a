"""An independent GPTQ-layout packer for tests, written from the format description.

Round-to-nearest quantization (no Hessian) into auto-gptq's v1 tensors: ``qweight`` int32
[in*bits/32, out] and ``qzeros`` int32 [n_groups, out*bits/32] as little-endian bit streams
(code k of a column/row at bits [bits*k, bits*(k+1)), fields may straddle words: auto-gptq's
3-bit layout), zero points stored minus one, fp16 ``scales`` [n_groups, out], int32 ``g_idx``.
Deliberately plain (numpy, one code at a time) and sharing no code with offload_moe.checkpoint.gptq.
"""

from __future__ import annotations

import numpy as np
import torch


def _pack_stream(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [n, m] (ints < 2**bits) -> int32 [n*bits/32, m]: column j's codes as one bit stream."""
    n, m = codes.shape
    assert (n * bits) % 32 == 0
    words = np.zeros((n * bits // 32, m), dtype=np.uint64)
    for k in range(n):
        c = codes[k].astype(np.uint64)
        pos = bits * k
        w, off = divmod(pos, 32)
        words[w] |= (c << np.uint64(off)) & np.uint64(0xFFFFFFFF)
        if off + bits > 32:  # straddles into the next word
            words[w + 1] |= c >> np.uint64(32 - off)
    return words.astype(np.uint32).view(np.int32)


def make_tiny_gptq_tensors(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    desc_act: bool,
    seed: int = 0,
    *,
    sym: bool = False,
) -> dict[str, torch.Tensor]:
    """Quantize w [out, in] (RTN) into auto-gptq v1 tensors.

    Returns qweight, qzeros, scales, g_idx (the checkpoint tensors) plus codes uint8 [out, in],
    zeros int [n_groups, out] (real zero points) and dequantized float32 [out, in]:
    ``scales[g, o] * (codes[o, i] - zeros[g, o])`` with g = g_idx[i], computed here.
    desc_act=True assigns columns to groups as auto-gptq's act-order does: a random column order
    (seeded), then ``g_idx[col] = position(col) // group_size``.
    """
    out_f, in_f = w.shape
    maxq = 2**bits - 1
    gs = in_f if group_size == -1 else group_size
    assert in_f % gs == 0
    n_groups = in_f // gs
    wn = w.detach().double().numpy()
    if desc_act:
        order = np.random.default_rng(seed).permutation(in_f)  # order[pos] = column
        position = np.empty(in_f, dtype=np.int64)
        position[order] = np.arange(in_f)
        g_idx = position // gs
    else:
        g_idx = np.arange(in_f) // gs
    scales = np.zeros((n_groups, out_f), dtype=np.float16)
    zeros = np.zeros((n_groups, out_f), dtype=np.int64)
    codes = np.zeros((out_f, in_f), dtype=np.int64)
    for g in range(n_groups):
        cols = np.nonzero(g_idx == g)[0]
        part = wn[:, cols]
        lo = np.minimum(part.min(axis=1), 0.0)
        hi = np.maximum(part.max(axis=1), 0.0)
        if sym:
            amax = np.maximum(-lo, hi)
            scale = (2 * amax / maxq).astype(np.float16)
            zero = np.full(out_f, (maxq + 1) // 2)
        else:
            scale = ((hi - lo) / maxq).astype(np.float16)
            zero = np.rint(-lo / np.where(scale > 0, scale.astype(np.float64), 1.0)).astype(np.int64)
        scale = np.where(scale > 0, scale, np.float16(1e-3)).astype(np.float16)
        zero = np.clip(zero, 1, maxq)  # v1 cannot store a zero point of 0
        scales[g], zeros[g] = scale, zero
        q = np.rint(part / scale.astype(np.float64)[:, None] + zero[:, None])
        codes[:, cols] = np.clip(q, 0, maxq).astype(np.int64)
    qweight = _pack_stream(codes.T, bits)  # [in*bits/32, out]
    qzeros = _pack_stream((zeros - 1).T, bits).T  # [n_groups, out*bits/32]
    dq = np.zeros((out_f, in_f), dtype=np.float32)
    for i in range(in_f):
        g = g_idx[i]
        dq[:, i] = (codes[:, i].astype(np.float32) - zeros[g].astype(np.float32)) * scales[g].astype(np.float32)
    return {
        "qweight": torch.from_numpy(np.ascontiguousarray(qweight)),
        "qzeros": torch.from_numpy(np.ascontiguousarray(qzeros)),
        "scales": torch.from_numpy(scales),
        "g_idx": torch.from_numpy(g_idx.astype(np.int32)),
        "codes": torch.from_numpy(codes.astype(np.uint8)),
        "zeros": torch.from_numpy(zeros),
        "dequantized": torch.from_numpy(dq),
    }
