"""What prefetch, the eviction policy and hybrid compute each buy, on CPU, against plain LRU.

Same random Mixtral-shaped checkpoint as bench/decode_speed.py (written once to --dir), half of
the experts of each layer in slots. Every configuration decodes the same prompt greedily, the
engines run round-robin (best of --repeats), and the baseline (LRU, no prefetch, no hybrid) is
measured in the same run.

    python bench/runtime_features.py
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import offload_moe
from offload_moe.testing import make_tiny_checkpoint

CONFIGS = {
    "baseline: lru, no prefetch": dict(policy="lru", prefetch_top_n=0, hybrid=False),
    "lru + prefetch top-2": dict(policy="lru", prefetch_top_n=2, hybrid=False),
    "markov, no prefetch (CPU default)": dict(policy="markov", prefetch_top_n=0, hybrid=False),
    "markov + prefetch top-2 (CUDA default)": dict(policy="markov", prefetch_top_n=2, hybrid=False),
    "markov + prefetch + hybrid": dict(policy="markov", prefetch_top_n=2, hybrid=True),
    "markov + hybrid, no prefetch (CPU)": dict(policy="markov", prefetch_top_n=0, hybrid=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="bench/out/decode_model")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    path = Path(args.dir) / "h1024-f3584-l8-e8-bfloat16"
    if not (path / "config.json").exists():
        make_tiny_checkpoint(path, seed=0, dtype=torch.bfloat16, vocab_size=32000, hidden_size=1024,
                             intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
                             num_key_value_heads=4, num_local_experts=8)
    prompt = torch.arange(1, 17)[None]
    models = {name: offload_moe.load(path, device="cpu", slots_per_layer=args.slots, progress=False, **kw)
              for name, kw in CONFIGS.items()}
    best = {name: float("inf") for name in models}
    for _ in range(args.repeats):
        for name, llm in models.items():
            llm.reset_stats()
            start = time.perf_counter()
            llm.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            best[name] = min(best[name], time.perf_counter() - start)
    base = args.new_tokens / best["baseline: lru, no prefetch"]
    print(f"date: {time.strftime('%Y-%m-%d')}  nproc: {os.cpu_count()}  torch {torch.__version__}")
    print(f"model: hidden 1024, ffn 3584, 8 layers, 8 experts top-2, bf16; {args.slots}/8 slots per layer; "
          f"{args.new_tokens} new tokens after a 16-token prompt; stats of the last run")
    print(f"{'configuration':<36} {'tok/s':>6} {'ratio':>6} {'hit rate':>8} {'MiB copied':>10} "
          f"{'cpu comp':>8} {'pf prec':>7} {'pf rec':>6}")
    for name, llm in models.items():
        t = llm.stats()["total"]
        rate = args.new_tokens / best[name]
        print(f"{name:<36} {rate:6.2f} {rate / base:5.2f}x {t['hit_rate']:8.3f} {t['bytes_copied'] / 2**20:10.0f} "
              f"{t['cpu_computed']:8d} {t['prefetch_precision']:7.2f} {t['prefetch_recall']:6.2f}")


if __name__ == "__main__":
    main()
