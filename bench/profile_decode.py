"""Where one decode step's time goes: torch.profiler over greedy decode steps of a model.

    python bench/side_by_side.py --build-only      # the Mixtral-dimension model, once
    python bench/profile_decode.py bench/out/side_by_side/mixtral-dims-l2/hf-hqq4 --dtype float16

Prints ms per token (with the profiler on), and the ops by self CPU time; with the weight bytes
each op reads (RESULTS.md) that gives each kernel's GB/s.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from machine import machine_line  # bench/machine.py
from torch.profiler import ProfilerActivity, profile

import offload_moe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint or converted directory")
    parser.add_argument("--dtype", default=None, help="compute dtype of the non-expert weights (default: the checkpoint's)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="decode steps profiled (after 5 warm-up steps)")
    parser.add_argument("--rows", type=int, default=15, help="ops listed")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(machine_line())
    llm = offload_moe.load(args.model, device="cpu", dtype=args.dtype, progress=False)
    ids = torch.randint(3, llm.model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = llm.model(ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)

        def step():
            nonlocal out, token
            out = llm.model(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)

        for _ in range(5):
            step()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
    print(f"{(time.perf_counter() - start) / args.steps * 1e3:.1f} ms per token (profiler on), {args.steps} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
