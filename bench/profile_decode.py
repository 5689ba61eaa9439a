"""Where one decode step's time goes: the share outside matmul kernels, and the ops by self time.

    python bench/profile_decode.py --shape qwen3-30b-a3b         # builds side_by_side's model folder once
    python bench/profile_decode.py --shape mixtral --layers 1 --steps 5
    python bench/profile_decode.py path/to/model-or-converted-dir --dtype float16

Greedy decode steps after a short prompt, each inside a `bench::decode_step` record_function,
under torch.profiler. A matmul kernel is a call to aten::mm / addmm / bmm / baddbmm / mv / addmv
/ dot / _grouped_mm (what aten::matmul and aten::linear dispatch to), torch's
aten::_weight_int4pack_mm*, or one of offload_moe's own matmul kernels (record_function rows
`offload_moe::dense16_gemv`, `q8_gemv`, `int4_gemv`, `moe_experts`, and `decode_attention`, whose
call also runs the output projection; its rms_norm16, rope16 and route_topk are overhead);
a kernel's time is its whole call, counted once however they nest, and printed per kernel. The
headline share is 1 - (kernel time of a step, from the profiled steps) / (wall time of a step
without the profiler), so the profiler's own per-op cost is not charged to the overhead; the
share with the profiler on is printed beside it. Both use per-step medians, and plain and
profiled steps alternate in blocks (--rounds), so a machine that slows down or speeds up during
the run shifts both alike. A step picks its token as generate() does greedily: the last
position's logits in fp32, argmax. Then the ops by self CPU time.

With --shape (bench/moe_shapes.py) the model is side_by_side's hqq4 folder of that shape, run
with fp16 non-expert weights, as side_by_side's offload_moe engine.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import Counter

import torch
from machine import machine_line  # bench/machine.py (scripts run as python bench/<name>.py)
from moe_shapes import OFFLOAD_DTYPE, add_model_args, build_all
from torch.profiler import ProfilerActivity, profile, record_function

import offload_moe

STEP = "bench::decode_step"
MATMUL_OPS = frozenset(f"aten::{op}" for op in ("mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "dot", "_grouped_mm"))
KERNEL_PREFIXES = ("aten::_weight_int4pack_mm",)
# offload_moe's own matmul kernels; decode_attention is q . K, p . V and the output projection in
# one call (its time printed on its own, with the others'); its norm, rotary and top-k kernels
# (rms_norm16, rope16, route_topk) are not matmuls and count as the overhead they replace
OWN_MATMULS = frozenset(f"offload_moe::{k}" for k in ("dense16_gemv", "q8_gemv", "int4_gemv", "moe_experts",
                                                      "decode_attention"))


def is_kernel(name: str) -> bool:
    return name in MATMUL_OPS or name in OWN_MATMULS or name.startswith(KERNEL_PREFIXES)


def kernel_us(event, into: Counter) -> None:
    """Add each outermost kernel call under `event` to into[name] (microseconds, whole call)."""
    for child in event.cpu_children:
        if is_kernel(child.name):
            into[child.name] += child.cpu_time_total
        else:
            kernel_us(child, into)


def decoder(llm, prompt_tokens: int):
    """A `step()` that feeds the last greedy token and keeps the cache, after the prompt."""
    ids = torch.randint(3, llm.model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(1))
    state = {"out": llm.model(ids, use_cache=True)}

    def step() -> None:
        token = state["out"].logits[:, -1:].float().argmax(-1)  # generate()'s scores are fp32
        state["out"] = llm.model(token, cache=state["out"].cache, use_cache=True, logits_to_keep=1)

    return step


def profiled_steps(step, steps: int):
    """(the profiler, the step events) over `steps` steps, each in a STEP record_function."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function(STEP):
                step()
    return prof, [e for e in prof.events() if e.name == STEP]


def alternated(step, steps: int, rounds: int):
    """(the last profiler, every profiled step's event, every plain step's ms): `rounds` blocks of
    plain steps then profiled steps, `steps` of each in all."""
    events, plain_ms, prof = [], [], None
    for r in range(rounds):
        block = steps * (r + 1) // rounds - steps * r // rounds
        plain_ms += plain_steps(step, block)
        prof, mine = profiled_steps(step, block)
        events += mine
    return prof, events, plain_ms


def report(step_events, plain_ms: list[float]) -> None:
    """The kernels' ms per step and the headline share, from per-step medians (robust to a busy machine)."""
    kernels: Counter = Counter()
    kernel_ms, shares = [], []
    for event in step_events:
        mine: Counter = Counter()
        kernel_us(event, mine)
        kernels.update(mine)
        kernel_ms.append(sum(mine.values()) / 1e3)
        shares.append(1 - sum(mine.values()) / event.cpu_time_total)
    n, wall = len(step_events), statistics.median(plain_ms)
    print(f"median step: {wall:.1f} ms without the profiler, "
          f"{statistics.median(e.cpu_time_total for e in step_events) / 1e3:.1f} ms with it ({n} steps each); "
          f"matmul kernels {statistics.median(kernel_ms):.1f} ms")
    for name, us in kernels.most_common():
        print(f"  {name}: {us / n / 1e3:.2f} ms per step")
    print(f"outside matmul kernels: {100 * max(0.0, 1 - statistics.median(kernel_ms) / wall):.1f}% of a step "
          f"(with the profiler on: {100 * statistics.median(shares):.1f}%, "
          f"per step {min(shares) * 100:.1f}-{max(shares) * 100:.1f}%)", flush=True)


def plain_steps(step, steps: int) -> list[float]:
    """Each step's wall ms without the profiler."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="checkpoint or converted directory (or --shape)")
    add_model_args(parser, default_shape=None)
    parser.add_argument("--dtype", default=None, help="compute dtype of the non-expert weights (default: the "
                        f"checkpoint's; {OFFLOAD_DTYPE} with --shape)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="decode steps profiled, and as many timed "
                        "without the profiler (after 5 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=4, help="blocks the plain and profiled steps alternate in")
    parser.add_argument("--threads", type=int, default=None, help="torch's threads (default: torch's)")
    parser.add_argument("--rows", type=int, default=15, help="ops listed")
    args = parser.parse_args()
    if (args.model is None) == (args.shape is None):
        parser.error("give either a model directory or --shape")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model, dtype = (args.model, args.dtype) if args.shape is None else (build_all(args).hqq4, args.dtype or OFFLOAD_DTYPE)
    print(machine_line())
    print(f"model: {model}, non-expert dtype: {dtype or 'as the checkpoint'}")
    llm = offload_moe.load(model, device="cpu", dtype=dtype, progress=False)
    with torch.inference_mode():
        step = decoder(llm, args.prompt_tokens)
        for _ in range(5):
            step()
        prof, step_events, plain_ms = alternated(step, args.steps, max(1, min(args.rounds, args.steps)))
    report(step_events, plain_ms)
    print("ops of the last profiled block, by self time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
