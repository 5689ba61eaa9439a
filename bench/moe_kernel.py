"""One MoE layer on the CPU: the fused kernel (offload_moe.quant.moe_kernel) against today's per-expert path.

Shapes: Qwen3-30B-A3B (H 2048, 128 experts of F 768, top-8) and Mixtral (H 4096, F 14336,
8 experts, top-2), hqq4 weights in this machine's prepared layout (random codes and scales: the
kernels' time does not depend on the values), random routing (each token's top-k of random
scores). Per token count T, both engines run the same layer round-robin, alternated, and the
table shows medians:

* fused: the routing turned into the kernel's rows (sort by expert, offsets, one view dict per
  routed expert) plus one `moe_experts` call;
* per-expert: what OffloadedExperts does today (runtime.expert_compute.expert_forward per
  routed expert: two `quant.matmul.linear` calls and the gate; then the weights and an
  index_put_ combine in ascending expert order).

GB/s counts the routed experts' prepared bytes (each read once) per second (the decode figure);
GFLOP/s counts 2 x the multiply-adds of the routed rows (the prefill figure).

    python bench/moe_kernel.py                         # both shapes, T = 1 16 256 1024 (~5 min on 2 cores)
    ATEN_CPU_CAPABILITY=avx2 python bench/moe_kernel.py  # the AVX2 variant (BLOCK_N 32 layout)
    python bench/moe_kernel.py --threads 1 --rounds 3    # one core
"""

from __future__ import annotations

import argparse
import statistics
import time

from machine import machine_line  # bench/machine.py

import torch

from offload_moe.model.arch import GateSpec, gated
from offload_moe.quant import moe_kernel
from offload_moe.quant.formats import parse_format
from offload_moe.quant.int4_layout import cpu_int4_block_n
from offload_moe.quant.matmul import expert_fields
from offload_moe.runtime.expert_compute import expert_forward

SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "mixtral": (4096, 14336, 8, 2)}  # H, F, experts, top-k


def random_layer(hidden: int, inter: int, experts: int, fmt) -> list[dict[str, torch.Tensor]]:
    """Every expert's prepared fields as views into one uint8 store, as ExpertStore holds them."""
    spec = expert_fields(fmt, hidden, inter)
    sizes = [torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size() for _, shape, dtype in spec]
    store = torch.empty(experts, sum(sizes), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    layer = []
    for e in range(experts):
        views, at = {}, 0
        for (name, shape, dtype), size in zip(spec, sizes):
            view = store[e, at : at + size].view(dtype).view(shape)
            if dtype == torch.uint8:
                view.copy_(torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8))
            else:
                view.copy_(torch.rand(shape, generator=gen) * 0.01)
            views[name], at = view, at + size
        layer.append(views)
    return layer


def fused(x, top_k_index, top_k_weights, layer, fmt, gate, block_n):
    tokens, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # rows grouped by expert, tokens ascending in each
    counts = torch.bincount(flat, minlength=len(layer)).tolist()
    needed = [e for e, c in enumerate(counts) if c]
    offsets = [0]
    for e in needed:
        offsets.append(offsets[-1] + counts[e])
    token_of_row = order // k
    weight_of_row = top_k_weights.reshape(-1)[order].float()
    out = torch.zeros(tokens, x.shape[1])
    moe_kernel.moe_experts(x, token_of_row, weight_of_row, offsets, [layer[e] for e in needed], fmt, gate, out,
                           block_n=block_n)
    return out


def per_expert(x, top_k_index, top_k_weights, layer, fmt, apply_gate):
    mask = torch.nn.functional.one_hot(top_k_index, num_classes=len(layer)).permute(2, 1, 0)  # [E, K, T]
    counts = mask.sum(dim=(-1, -2)).tolist()
    out = torch.zeros_like(x)
    for e in (e for e, c in enumerate(counts) if c):
        pos, idx = torch.where(mask[e])
        y = expert_forward(x[idx], layer[e], fmt, apply_gate) * top_k_weights[idx, pos, None]
        out.index_put_((idx,), y.to(out.dtype), accumulate=True)
    return out


def routed_bytes(layer, top_k_index) -> int:
    needed = torch.unique(top_k_index).tolist()
    return sum(sum(t.numel() * t.element_size() for t in layer[e].values()) for e in needed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 1024])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-baseline", action="store_true", help="time the fused kernel only")
    parser.add_argument("--threads", type=int, default=None, help="torch (and so the kernel's OpenMP) threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(machine_line())
    fmt, gate = parse_format("hqq4"), GateSpec("silu_mul")
    apply_gate = gated(torch.nn.functional.silu)
    block_n = cpu_int4_block_n()
    print(f"layout BLOCK_N={block_n}, tile_min={moe_kernel.tile_threshold(block_n)} tokens per expert")
    print(f"{'shape':>14} {'T':>5} {'engine':>10} {'ms':>9} {'GB/s':>7} {'GFLOP/s':>8} {'tok/s':>8} {'speedup':>7}")
    for shape in args.shapes:
        hidden, inter, experts, k = SHAPES[shape]
        layer = random_layer(hidden, inter, experts, fmt)
        for tokens in args.tokens:
            gen = torch.Generator().manual_seed(tokens)
            x = torch.randn(tokens, hidden, generator=gen).bfloat16()
            scores = torch.rand(tokens, experts, generator=gen)
            top_w, top_i = scores.topk(k, dim=-1)
            top_w = (top_w / top_w.sum(-1, keepdim=True)).bfloat16()
            engines = {"fused": lambda: fused(x, top_i, top_w, layer, fmt, gate, block_n)}
            if not args.no_baseline:
                engines["per-expert"] = lambda: per_expert(x, top_i, top_w, layer, fmt, apply_gate)
            times = {name: [] for name in engines}
            for name, run in engines.items():  # warm-up (and the threshold's calibration)
                run()
            for r in range(args.rounds):
                for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):  # alternated
                    start = time.perf_counter()
                    engines[name]()
                    times[name].append(time.perf_counter() - start)
            nbytes = routed_bytes(layer, top_i)
            flops = 2 * tokens * k * (3 * hidden * inter)
            base = statistics.median(times["per-expert"]) if "per-expert" in times else None
            for name, ts in times.items():
                t = statistics.median(ts)
                speedup = f"{base / t:7.2f}" if base else ""
                print(f"{shape:>14} {tokens:>5} {name:>10} {t * 1e3:9.2f} {nbytes / t / 1e9:7.2f} "
                      f"{flops / t / 1e9:8.1f} {tokens / t:8.1f} {speedup}")


if __name__ == "__main__":
    main()
