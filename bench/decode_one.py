"""Decode time of one offload_moe configuration alone in its process (no other engine sharing
its caches or threads), optionally with a cProfile of one run; for before/after comparisons of
the runtime across source trees (`PYTHONPATH=<tree> python bench/decode_one.py ...`).

    python bench/decode_speed.py --dir /tmp/decode_model        # writes the checkpoint once
    PYTHONPATH=. python bench/decode_one.py /tmp/decode_model/h1024-f3584-l8-e8-bfloat16 --slots 4
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import offload_moe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--slots", type=int, default=None, help="slots per layer (default: all experts)")
    p.add_argument("--experts", default=None, help="expert format, e.g. hqq4 (default: the checkpoint's)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="print the top of a cProfile of one more run")
    args = p.parse_args()
    llm = offload_moe.load(args.checkpoint, device="cpu", slots_per_layer=args.slots, experts=args.experts,
                           progress=False)
    ids = torch.arange(1, 17)[None]
    g = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    llm.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        llm.generate(ids, **g)
        best = min(best, time.perf_counter() - start)
    print(f"{offload_moe.__file__}: slots={args.slots} experts={args.experts}: best of {args.repeats} "
          f"{best:.3f} s for {args.new_tokens} tokens ({args.new_tokens / best:.2f} tok/s)")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        llm.generate(ids, **g)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
        print(out.getvalue())


if __name__ == "__main__":
    main()
