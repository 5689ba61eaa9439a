"""Decode tokens/s: offload_moe against the same checkpoint loaded plainly with transformers (CPU).

A random Mixtral-shaped checkpoint big enough that expert matmuls dominate (hidden 1024,
8 layers, 8 experts, FFN 3584 by default) is written once to --dir. Each engine generates
--new-tokens greedy tokens after a short prompt, --repeats times; the best run counts.

    python bench/decode_speed.py                 # defaults, ~2 minutes on 2 cores
    python bench/decode_speed.py --dtype float32 --new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM

from machine import cpu_model  # bench/machine.py (scripts run as python bench/<name>.py)
import offload_moe
from offload_moe.testing import make_tiny_checkpoint


def best_tokens_per_s(engines: dict, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
    """Round-robin over the engines `repeats` times (so load changes on a shared machine hit all
    of them alike) and keep each engine's best run."""
    best = {name: float("inf") for name in engines}
    for generate in engines.values():
        generate(prompt, 4)  # warm-up
    for _ in range(repeats):
        for name, generate in engines.items():
            start = time.perf_counter()
            out = generate(prompt, new_tokens)
            best[name] = min(best[name], time.perf_counter() - start)
            assert out.shape[1] == prompt.shape[1] + new_tokens
    return {name: new_tokens / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="bench/out/decode_model", help="where the random checkpoint is written")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=3584)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    path = Path(args.dir) / f"h{args.hidden}-f{args.ffn}-l{args.layers}-e{args.experts}-{args.dtype}"
    if not (path / "config.json").exists():
        make_tiny_checkpoint(
            path,
            seed=0,
            dtype=dtype,
            vocab_size=32000,
            hidden_size=args.hidden,
            intermediate_size=args.ffn,
            num_hidden_layers=args.layers,
            num_attention_heads=16,
            num_key_value_heads=4,
            num_local_experts=args.experts,
        )
    prompt = torch.arange(1, 17)[None]

    def hf_generate(model):
        return lambda ids, n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    engines = {}
    for impl in ("grouped_mm", "eager"):
        plain = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation=impl).eval()
        engines[f"transformers ({impl} experts)"] = hf_generate(plain)
    models = {}
    for slots in (args.experts, args.experts // 2):
        llm = offload_moe.load(path, device="cpu", dtype=dtype, slots_per_layer=slots, progress=False)
        models[slots] = llm
        engines[f"offload_moe {slots}/{args.experts} slots"] = hf_generate(llm.model)
    for slots in (args.experts, args.experts // 2):  # the same with hqq4 experts (int4 CPU kernel)
        llm = offload_moe.load(path, device="cpu", dtype=dtype, slots_per_layer=slots, experts="hqq4", progress=False)
        models[f"hqq4-{slots}"] = llm
        engines[f"offload_moe hqq4 {slots}/{args.experts} slots"] = hf_generate(llm.model)
    results = best_tokens_per_s(engines, prompt, args.new_tokens, args.repeats)
    for key, llm in models.items():
        name = f"offload_moe {str(key).replace('-', ' ')}/{args.experts} slots"
        results[f"{name} (hit rate {llm.stats()['total']['hit_rate']:.2f})"] = results.pop(name)

    baseline = max(v for k, v in results.items() if k.startswith("transformers"))
    print(f"date: {time.strftime('%Y-%m-%d')}  nproc: {os.cpu_count()}  cpu: {cpu_model()}  torch {torch.__version__}")
    print(f"model: hidden {args.hidden}, ffn {args.ffn}, {args.layers} layers, {args.experts} experts top-2, "
          f"vocab 32000, {args.dtype}; {args.new_tokens} new tokens, best of {args.repeats}, round-robin")
    print(f"{'engine':<48} {'tok/s':>8} {'vs best transformers':>22}")
    for name, rate in results.items():
        print(f"{name:<48} {rate:8.2f} {rate / baseline:21.2f}x")


if __name__ == "__main__":
    main()
