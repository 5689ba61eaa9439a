"""Expert-cache hit rates of the eviction policies on recorded routing traces (no model, no GPU).

Replays each trace through per-layer `ExpertCache`s exactly as the runtime drives them (see
`offload_moe.planning.replay`), caches cold at the start of each problem, and prints policy x slots hit
rates, with Belady's offline optimum and, for each online policy, the fraction of the LRU-to-Belady
gap it closes.

    python bench/replay_policies.py                        # the shared Mixtral HumanEval trace
    python bench/replay_policies.py a.jsonl b.jsonl --slots 3 4
    python bench/replay_policies.py --problems 1           # one problem of each trace only
    python bench/replay_policies.py --synthetic topics     # a generated trace (see synthetic_trace)
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from offload_moe.runtime.policies import POLICIES, BeladyPolicy  # noqa: E402
from offload_moe.planning.replay import Step, Trace, load_trace, replay  # noqa: E402

DEFAULT_TRACE = REPO.parent / "shared" / "traces" / "mixtral-8x7b-instruct-humaneval.jsonl"


def synthetic_trace(
    kind: str,
    seed: int = 0,
    layers: int = 32,
    experts: int = 8,
    top_k: int = 2,
    tokens: tuple[int, ...] = (300, 300),
    zipf: float = 1.0,
    drift: float = 0.02,
    topics: int = 4,
    stay: float = 0.8,
    topic_scale: float = 1.0,
) -> Trace:
    """Generated routing, independent of the real trace.

    Each layer has Zipf(`zipf`) expert popularity over a random permutation whose ranks drift
    (each token, with probability `drift`, two neighbouring ranks swap). kind "zipf-drift": tokens
    route independently given the popularity (Gumbel-top-k of the popularity logits). kind
    "topics": a hidden topic per token, sticky (kept with probability `stay`, else redrawn out
    of `topics`), adds its own random logit offsets (normal, `topic_scale`) per layer, so
    consecutive tokens route alike, as real text does. Gating probs are the softmax of the
    chosen logits; router_probs the softmax over all experts."""
    if kind not in ("zipf-drift", "topics"):
        raise ValueError(f"unknown synthetic kind {kind!r}")
    rng = random.Random(seed)
    trace: Trace = {layer: [] for layer in range(layers)}
    for problem, count in enumerate(tokens):
        ranks = [rng.sample(range(experts), experts) for _ in range(layers)]  # rank -> expert
        offsets = [  # layer -> topic -> expert -> logit offset
            [[rng.gauss(0.0, topic_scale) for _ in range(experts)] for _ in range(topics)] for _ in range(layers)
        ]
        topic = rng.randrange(topics)
        for t in range(count):
            if rng.random() > stay:
                topic = rng.randrange(topics)
            for layer in range(layers):
                order = ranks[layer]
                if rng.random() < drift:
                    i = rng.randrange(experts - 1)
                    order[i], order[i + 1] = order[i + 1], order[i]
                logits = [0.0] * experts
                for rank, e in enumerate(order):
                    logits[e] = -zipf * math.log(rank + 1)
                    if kind == "topics":
                        logits[e] += offsets[layer][topic][e]
                noisy = [x - math.log(-math.log(rng.random() or 1e-300)) for x in logits]
                chosen = sorted(range(experts), key=lambda e: -noisy[e])[:top_k]
                z = max(noisy)
                w = [math.exp(noisy[e] - z) for e in range(experts)]
                total = sum(w)
                probs = tuple(x / total for x in w)
                top = sum(probs[e] for e in chosen)
                trace[layer].append(
                    Step(tuple(chosen), tuple(probs[e] / top for e in chosen), problem, t, router_probs=probs)
                )
    return trace


def keep_problems(trace: Trace, problems: list[int] | None) -> Trace:
    if problems is None:
        return trace
    return {layer: [s for s in steps if s.problem_id in problems] for layer, steps in trace.items()}


def table(trace: Trace, policies: list[str], slots: list[int], persist: bool = False) -> str:
    reset = not persist
    rates = {name: [replay(trace, name, s, reset_per_problem=reset) for s in slots] for name in policies}
    rates["belady"] = [replay(trace, BeladyPolicy, s, reset_per_problem=reset) for s in slots]
    lines = ["hit rate        " + "".join(f"{s:>9d}" for s in slots)]
    for name, row in rates.items():
        lines.append(f"{name:16s}" + "".join(f"{r:9.4f}" for r in row))
    if "lru" in rates:
        lines.append("")
        lines.append("gap closed      " + "".join(f"{s:>9d}" for s in slots) + "   (policy - lru) / (belady - lru)")
        for name in policies:
            if name == "lru":
                continue
            cells = []
            for r, lru, opt in zip(rates[name], rates["lru"], rates["belady"]):
                cells.append(f"{(r - lru) / (opt - lru):9.1%}" if opt - lru > 1e-9 else f"{'-':>9s}")
            lines.append(f"{name:16s}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("traces", nargs="*", type=Path, help=f"routing traces, JSON lines (default: {DEFAULT_TRACE})")
    p.add_argument("--slots", type=int, nargs="+", default=[2, 3, 4, 5, 6], help="slots per layer")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=sorted(POLICIES))
    p.add_argument("--problems", type=int, nargs="+", help="replay only these problem_ids")
    p.add_argument("--persist", action="store_true", help="keep each layer's cache from one problem to the next")
    p.add_argument("--synthetic", choices=["zipf-drift", "topics"], help="replay a generated trace instead")
    p.add_argument("--seed", type=int, default=0, help="seed of --synthetic")
    args = p.parse_args(argv)

    if args.synthetic:
        sources = [(f"synthetic {args.synthetic} (seed {args.seed})", synthetic_trace(args.synthetic, args.seed))]
    else:
        paths = args.traces or [DEFAULT_TRACE]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            hint = "" if args.traces else " (the default trace lives in ../shared/traces/ beside the repository)"
            p.error(f"trace file not found: {', '.join(missing)}{hint}")
        sources = [(str(path), load_trace(path)) for path in paths]
    for label, trace in sources:
        trace = keep_problems(trace, args.problems)
        uses = sum(len(s.experts) for steps in trace.values() for s in steps)
        print(f"{label}: {len(trace)} layers, {uses} expert uses")
        print(table(trace, args.policies, args.slots, args.persist))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
