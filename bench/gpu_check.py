"""One command for a GPU machine: tests/test_gpu.py, then decode tokens/s and per-layer counts.

    python bench/gpu_check.py                 # ~5-8 minutes on one GPU
    python bench/gpu_check.py --layers 2 --new-tokens 32

1. `pytest tests/test_gpu.py` (its result is printed; the rest runs either way).
2. Launches and host syncs per MoE layer of one decode step (offload_moe.op_counter around each
   OffloadedExperts call) and of one fused call (runtime.fused_torch.experts_from_slots) for
   2 and 8 experts, on the CPU (printed on any machine) and on CUDA.
3. With CUDA: decode tokens/s of a random model of Mixtral-8x7B's dimensions (--layers decoder
   layers; hidden 4096, FFN 14336, 8 experts, top-2, 32/8 heads) at gpu_memory="24GiB" with
   hqq4 experts, prefetch and hybrid each on and off (4 rows), one table.
Without CUDA it says so after step 2 and exits 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F

from machine import machine_line  # bench/machine.py (scripts run as python bench/<name>.py)
import offload_moe
from offload_moe.model.arch import gated
from offload_moe.op_counter import OpCounts, count_ops, count_per_call
from offload_moe.quant.formats import parse_format
from offload_moe.quant.matmul import expert_fields
from offload_moe.runtime.fused_torch import DequantTile, experts_from_slots
from offload_moe.runtime.offloaded_experts import OffloadedExperts
from offload_moe.runtime.routing import route_rows
from offload_moe.runtime.store import ExpertLayout
from offload_moe.testing import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
MIXTRAL_DIMS = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    vocab_size=32000, num_local_experts=8, num_experts_per_tok=2)


def run_gpu_tests() -> int:
    print("== pytest tests/test_gpu.py", flush=True)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_gpu.py")], cwd=ROOT).returncode


def layer_counts(llm, ids: torch.Tensor) -> list[OpCounts]:
    """Counts of every OffloadedExperts call during one forward of `ids`."""
    layers = [m for m in llm.model.modules() if isinstance(m, OffloadedExperts)]
    with torch.no_grad():
        return count_per_call(layers, lambda: llm.model(ids))


def fused_counts(device: torch.device, n: int) -> OpCounts:
    """One fused call of n hqq4 experts, one row each (a decode step's shape), small dimensions."""
    hidden, inter, fmt = 256, 512, parse_format("hqq4")
    layout = ExpertLayout(expert_fields(fmt, hidden, inter))
    pool = torch.randint(0, 255, (n, layout.nbytes), dtype=torch.uint8, device=device)
    tile = DequantTile.allocate(fmt, hidden, inter, True, n, torch.bfloat16, device)
    routing = route_rows(torch.arange(n).view(n // 2, 2), torch.rand(n // 2, 2), n)
    x = torch.randn(n // 2, hidden, dtype=torch.bfloat16, device=device)
    rows, weights = routing.token_of_row.to(device), routing.weight_of_row.to(device)
    slots = torch.arange(n, device=device)
    experts_from_slots(x, rows, weights, [1] * n, slots, pool, layout, fmt, gated(F.silu), tile)  # warm-up
    with count_ops() as counts:
        experts_from_slots(x, rows, weights, [1] * n, slots, pool, layout, fmt, gated(F.silu), tile)
    return counts


def print_counts(device: torch.device, workdir: Path) -> None:
    path = make_tiny_checkpoint(workdir / "tiny", seed=0)
    llm = offload_moe.load(path, device=device, experts="hqq4", slots_per_layer=4, progress=False)
    layer_counts(llm, torch.tensor([[1, 2, 3, 4]], device=device))  # warm-up (kernels built, caches filled)
    step = layer_counts(llm, torch.tensor([[5]], device=device))  # a decode-sized call (1 token)
    print(f"== {device}: per MoE layer of a 1-token call (OffloadedExperts.forward), tiny hqq4 model, 4 of 8 slots")
    for i, c in enumerate(step):
        print(f"  layer {i}: launches {c.launches:4d}  syncs {c.syncs:3d}  {dict(c.synced)}")
    for n in (2, 8):
        c = fused_counts(device, n)
        print(f"  fused call, {n} experts: launches {c.launches:4d}  syncs {c.syncs:3d}  {dict(c.synced)}")
    llm.close()


def decode_table(workdir: Path, layers: int, new_tokens: int) -> None:
    path = workdir / f"mixtral_dims_{layers}"
    if not (path / "config.json").exists():
        make_tiny_checkpoint(path, seed=0, dtype=torch.bfloat16, num_hidden_layers=layers, **MIXTRAL_DIMS)
    prompt = torch.arange(1, 17, device="cuda")[None]
    print(f"== decode, random Mixtral dimensions, {layers} layers, hqq4 experts, gpu_memory=24GiB, {new_tokens} tokens")
    print("| prefetch | hybrid | slots/layer | tok/s | hit rate |")
    print("|---|---|---|---|---|")
    for prefetch in (True, False):
        for hybrid in (True, False):
            llm = offload_moe.load(path, device="cuda", experts="hqq4", gpu_memory="24GiB", hybrid=hybrid,
                                   prefetch_top_n=None if prefetch else 0, progress=False)
            llm.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            llm.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            torch.cuda.synchronize()
            speed = new_tokens / (time.perf_counter() - start)
            slots = next(iter(llm.runtime.experts.values())).cache.num_slots
            print(f"| {prefetch} | {hybrid} | {slots} | {speed:.2f} | {llm.stats()['total']['hit_rate']:.3f} |", flush=True)
            llm.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/offload_moe_gpu_check"))
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    print(machine_line())
    tests_rc = 0 if args.skip_tests else run_gpu_tests()
    args.dir.mkdir(parents=True, exist_ok=True)
    print_counts(torch.device("cpu"), args.dir)
    if not torch.cuda.is_available():
        print("no CUDA device: tests/test_gpu.py skipped itself and there is no decode table to measure")
        return 0
    print(f"gpu={torch.cuda.get_device_name()}")
    print_counts(torch.device("cuda"), args.dir)
    decode_table(args.dir, args.layers, args.new_tokens)
    print(f"tests/test_gpu.py: {'passed' if tests_rc == 0 else f'FAILED (exit {tests_rc})'}")
    return tests_rc


if __name__ == "__main__":
    sys.exit(main())
