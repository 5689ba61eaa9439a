"""One prepared matrix, bf16 inputs: offload_moe's kernel (tiled loop from tile_threshold tokens) against
dequantize + matmul (prefill_linear) and torch's int4 kernel; best of 5, alternated.

    python bench/prefill_crossover.py THREADS OUT IN
"""
import sys, time, torch
from offload_moe.quant.int4_layout import cpu_int4_block_n, prepare_for_cpu
from offload_moe.quant.matmul import int8_cpu_linear, prefill_linear, int4_cpu_linear
from offload_moe.quant.quantize import pack, quantize
from offload_moe.quant.formats import parse_format
from offload_moe.quant import moe_kernel
torch.set_num_threads(int(sys.argv[1]))
OUT, IN = int(sys.argv[2]), int(sys.argv[3])
block_n = cpu_int4_block_n()
print("threads", torch.get_num_threads(), "block_n", block_n, "tile_min", moe_kernel.tile_threshold(block_n), "shape", OUT, IN)
for name in ("hqq4", "hqq2"):
    fmt = parse_format(name)
    w = torch.randn(OUT, IN) * 0.02
    prep = prepare_for_cpu(pack(quantize(w, fmt, optimize=False)), fmt, OUT, IN, block_n=block_n)
    for T in (16, 128, 512):
        x = torch.randn(T, IN).to(torch.bfloat16)
        fns = {"own": lambda: int8_cpu_linear(x, prep, fmt, block_n), "deq": lambda: prefill_linear(x, prep, fmt, block_n),
               "torch": lambda: int4_cpu_linear(x, prep, fmt)}
        best = {k: 1e9 for k in fns}
        for _ in range(5):
            for k, f in fns.items():
                s = time.perf_counter(); f(); best[k] = min(best[k], time.perf_counter() - s)
        print(f"{name} T={T:4d} own {best['own']*1e3:8.2f} ms  deq {best['deq']*1e3:8.2f} ms  torch {best['torch']*1e3:8.2f} ms  own/deq {best['own']/best['deq']:.2f} torch/deq {best['torch']/best['deq']:.2f}", flush=True)
