"""Record the routing of a Switch Transformers model of ours and replay it through the eviction
policies with 1 slot per layer, encoder and decoder apart (issue 14).

No published Switch checkpoint can be downloaded here, so the model is a random-weight one with
google/switch-base-8's layer structure (12 + 12 blocks, experts in every other block, 8
experts, top-1 routing, expert capacity 64) and small widths; its decoding is sampled (seed
fixed), since a random model decoded greedily repeats one token and routes it the same way.
Give a checkpoint directory to record a real model instead.

    python bench/switch_routing.py                                   # record, then replay
    python bench/switch_routing.py --trace bench/out/switch-routing.jsonl --replay-only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import offload_moe  # noqa: E402
from offload_moe.planning.replay import load_trace, replay  # noqa: E402
from offload_moe.runtime.policies import POLICIES, BeladyPolicy  # noqa: E402
from offload_moe.testing import make_tiny_checkpoint  # noqa: E402

# switch-base-8's structure at small widths (see the module docstring).
STRUCTURE = dict(num_layers=12, num_decoder_layers=12, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6,
                 num_experts=8, expert_capacity=64, d_model=128, d_ff=512, d_kv=32, num_heads=4)
PROMPTS = [
    "translate English to German: The house is wonderful and the garden is green.",
    "summarize: Mixture-of-experts models route every token to a few of many feed-forward experts.",
    "translate English to French: Where is the train station? I would like to buy a ticket.",
    "question: What is the capital of France? context: Paris is the capital and largest city of France.",
    "cola sentence: The book was written by the author who lives in the city.",
    "translate English to Romanian: Offloading experts keeps the device memory small.",
]


def record(model: str | None, trace: Path, new_tokens: int, seed: int) -> dict:
    path = model or make_tiny_checkpoint(REPO / "bench" / "out" / "switch-bench", arch="switch_transformers",
                                         seed=seed, **STRUCTURE)
    llm = offload_moe.load(path, device="cpu", slots_per_layer=1, record_routing=trace, progress=False)
    torch.manual_seed(seed)
    for prompt in PROMPTS:
        llm.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0)
    live = llm.stats()["total"]
    llm.close()
    return live


def stacks_of(trace_file: Path) -> dict[str, set[int]]:
    stacks: dict[str, set[int]] = {}
    with open(trace_file) as f:
        for line in f:
            row = json.loads(line)
            stacks.setdefault(row.get("stack", ""), set()).add(int(row["layer"]))
    return stacks


def table(trace_file: Path, slots: list[int]) -> str:
    trace = load_trace(trace_file)
    parts = {"all": trace, **{f"{name} only": {k: v for k, v in trace.items() if k in layers}
                               for name, layers in sorted(stacks_of(trace_file).items())}}
    lines = ["hit rate (caches cold per problem)   " + "".join(f"{f'{n} {s}':>16s}" for n in parts for s in slots)]
    factories = {**{name: name for name in POLICIES}, "belady": BeladyPolicy}
    for name, policy in factories.items():
        cells = [replay(part, policy, s, num_experts=8) for part in parts.values() for s in slots]
        lines.append(f"{name:37s}" + "".join(f"{c:16.4f}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="a Switch checkpoint directory (default: the random one above)")
    p.add_argument("--trace", type=Path, default=REPO / "bench" / "out" / "switch-routing.jsonl")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slots", type=int, nargs="+", default=[1])
    p.add_argument("--replay-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not args.replay_only:
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        live = record(args.model, args.trace, args.new_tokens, args.seed)
        print(f"recorded {len(PROMPTS)} prompts x {args.new_tokens} tokens -> {args.trace}; live run (1 slot, "
              f"markov, warm start): hit rate {live['hit_rate']:.4f} ({live['hits']} hits, {live['misses']} misses)")
    print(table(args.trace, args.slots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
