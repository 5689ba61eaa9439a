"""Decode-time memory bandwidth of offload_moe's two CPU kernels, weights read cold.

    python bench/decode_bandwidth.py [--threads 1 2] [--tokens 1] [--rotate-mb 700] [--rounds 3]

At decode every weight is read once per step, long evicted from the caches by the rest of the
step, so this reads each matrix cold: per shape, enough distinct copies to exceed the last-level
cache (`--rotate-mb` in all, over twice a 300 MiB L3) are called in turn, and GB/s is the bytes
of weights read over the wall time of the whole rotation (the Python wrapper included: that is
what a decode step pays). Rows:

* copy: torch's copy_ of a 512 MiB tensor (bytes copied / s), the memory-bandwidth baseline of the
  same run;
* dense16_gemv (offload_moe.quant.dense_kernel), fp16 and bf16, on a Qwen3-30B-A3B decode step's
  matrices (q 4096x2048, k/v 512x2048, o 2048x4096, router 128x2048, lm_head 151936x2048: the
  lm_head alone is 622 MB, so it is one matrix read in turn);
* moe_experts (offload_moe.quant.moe_kernel) on a Qwen3-30B-A3B layer: 8 of 128 experts
  (H 2048, F 768, hqq4, 2.65 MB each), consecutive experts of rotated layers so that an expert is
  read again only after `--rotate-mb` of others.

Both variants run in one process: AVX-512 (dense variant 1, BLOCK_N 64 layout) and AVX2 (dense
variant 2, BLOCK_N 32 layout), which are what ``ATEN_CPU_CAPABILITY=avx2`` selects. Rounds
alternate the engines; the table shows the best round (the least disturbed by other processes).
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import machine_line  # bench/machine.py

from offload_moe.model.arch import GateSpec
from offload_moe.quant import dense_kernel, moe_kernel
from offload_moe.quant.formats import parse_format
from offload_moe.quant.matmul import expert_fields

DENSE_SHAPES = {"q_proj": (4096, 2048), "k/v_proj": (512, 2048), "o_proj": (2048, 4096), "router": (128, 2048),
                "lm_head": (151936, 2048)}  # [out, in]
QWEN_MOE = (2048, 768, 128, 8)  # hidden, intermediate, experts, top-k
COPY_BYTES = 512 << 20


def copy_rate(rounds: int) -> float:
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(rounds))
    return COPY_BYTES / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dense_copies(rows: int, cols: int, dtype: torch.dtype, rotate_bytes: int) -> list[torch.Tensor]:
    count = max(1, -(-rotate_bytes // (rows * cols * 2)))
    base = (torch.rand(rows, cols) - 0.5).to(dtype)
    return [base.clone() for _ in range(count)]


def dense_rate(weights: list[torch.Tensor], x: torch.Tensor, use: int) -> float:
    def rotation():
        for w in weights:
            dense_kernel.dense16_gemv(x, w, use)
    return sum(w.numel() * 2 for w in weights) / _timed(rotation) / 1e9


def moe_layers(block_n: int, rotate_bytes: int) -> list[list[dict[str, torch.Tensor]]]:
    """Layers of random hqq4 experts (views into one uint8 store per layer, as ExpertStore holds
    them) in the prepared layout `block_n` (the byte layout is block_n's only by its shapes)."""
    hidden, inter, experts, _ = QWEN_MOE
    spec = expert_fields(parse_format("hqq4"), hidden, inter)
    sizes = [torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size() for _, shape, dtype in spec]
    count = max(1, -(-rotate_bytes // (experts * sum(sizes))))
    layers = []
    for _ in range(count):
        store = torch.randint(0, 256, (experts, sum(sizes)), dtype=torch.uint8)
        layer = []
        for e in range(experts):
            views, at = {}, 0
            for (name, shape, dtype), size in zip(spec, sizes):
                views[name] = store[e, at : at + size].view(dtype).view(shape)
                if dtype != torch.uint8:
                    views[name].copy_(torch.rand(shape) * 0.01 + 0.001)  # normal numbers: no slow denormals
                at += size
            layer.append(views)
        layers.append(layer)
    return layers


def moe_rate(layers, tokens: int, block_n: int) -> float:
    hidden, _, experts, k = QWEN_MOE
    fmt, gate = parse_format("hqq4"), GateSpec("silu_mul")
    x = torch.randn(tokens, hidden)
    out = torch.zeros(tokens, hidden)
    token_of_row = torch.arange(tokens).repeat(k)  # expert i: every token, in order
    weight_of_row = torch.full((tokens * k,), 1.0 / k)
    offsets = [i * tokens for i in range(k + 1)]
    calls = [layer[e : e + k] for layer in layers for e in range(0, experts, k)]
    nbytes = sum(t.numel() * t.element_size() for chosen in calls for ex in chosen for t in ex.values())

    def rotation():
        for chosen in calls:
            moe_kernel.moe_experts(x, token_of_row, weight_of_row, offsets, chosen, fmt, gate, out, block_n=block_n)
    return nbytes / _timed(rotation) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1])
    parser.add_argument("--rotate-mb", type=int, default=700, help="distinct weight bytes read between reuses")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], help="rows to leave out: dense, lm_head, moe")
    args = parser.parse_args()
    rotate = args.rotate_mb << 20
    variants = {"avx512": (dense_kernel.AVX512, 64), "avx2": (dense_kernel.AVX2, 32)}
    variants = {k: v for k, v in variants.items() if v[0] in dense_kernel.supported_variants()}
    print(machine_line())
    print("| threads | kernel | matrix | dtype | T | " + " | ".join(f"{v} GB/s" for v in variants) + " | copy GB/s |")
    print("|---|---|---|---|---|" + "---|" * len(variants) + "---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        copy = copy_rate(args.rounds)
        for dtype in (torch.float16, torch.bfloat16):
            for name, (rows, cols) in DENSE_SHAPES.items():
                if "dense" in args.skip or (name == "lm_head" and "lm_head" in args.skip):
                    continue
                weights = dense_copies(rows, cols, dtype, rotate if name != "lm_head" else 0)
                for t in args.tokens:
                    x = torch.randn(t, cols)
                    rates = {v: 0.0 for v in variants}
                    for _ in range(args.rounds):
                        for v, (use, _) in variants.items():
                            rates[v] = max(rates[v], dense_rate(weights, x, use))
                    _row(threads, "dense16_gemv", f"{name} [{rows}x{cols}] x{len(weights)}",
                         str(dtype).removeprefix("torch."), t, rates, copy)
                del weights
        if "moe" in args.skip:
            continue
        for v, (_, block_n) in variants.items():
            layers = moe_layers(block_n, rotate)
            for t in args.tokens:
                rate = max(moe_rate(layers, t, block_n) for _ in range(args.rounds))
                _row(threads, "moe_experts", f"qwen 8 of 128 experts x{len(layers)} layers", "hqq4", t,
                     {u: (rate if u == v else None) for u in variants}, copy)
            del layers


def _row(threads, kernel, matrix, dtype, tokens, rates, copy) -> None:
    cells = " | ".join("" if r is None else f"{r:.1f}" for r in rates.values())
    print(f"| {threads} | {kernel} | {matrix} | {dtype} | {tokens} | {cells} | {copy:.1f} |", flush=True)


if __name__ == "__main__":
    main()
