"""Record the routing of a model of ours on a few chat prompts, for bench/replay_policies.py.

The recorded trace keeps what the shared Mixtral trace lacks (each layer's full router
distribution, and the next layer's router applied to this layer's input), so policies that use
them can be judged offline.

    python bench/record_routing.py --out bench/out/demo-routing.jsonl        # the demo model
    python bench/replay_policies.py bench/out/demo-routing.jsonl --policies lru lfu-decay markov markov-router
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import offload_moe
from offload_moe.demo import ensure_demo_checkpoint

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain why the sky is blue in three sentences.",
    "List five fruits and their colours.",
    "Write a short story about a robot who learns to paint.",
    "What are the main differences between TCP and UDP?",
    "Translate 'good morning, how are you?' into French and Spanish.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="checkpoint directory (default: the demo model)")
    parser.add_argument("--out", default="bench/out/demo-routing.jsonl")
    parser.add_argument("--new-tokens", type=int, default=96)
    args = parser.parse_args()
    path = args.model or ensure_demo_checkpoint()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    llm = offload_moe.load(path, device="cpu", record_routing=args.out, progress=False)
    for prompt in PROMPTS:
        reply = llm.chat([{"role": "user", "content": prompt}], max_new_tokens=args.new_tokens, do_sample=False)
        print(f"> {prompt}\n{reply[:200]!r}\n")
    llm.runtime.recorder.close()
    print(f"routing of {len(PROMPTS)} prompts written to {args.out}")


if __name__ == "__main__":
    main()
