"""Replay recorded routing through real `ExpertCache`s to judge eviction policies offline.

A trace is JSON lines, one object per (token, MoE layer), as in ../shared/traces/:

    {"problem_id": 0, "layer": 3, "token_idx": 17, "experts": [5, 1], "gating_probs": [0.71, 0.29]}

optionally with "phase" ("decode" / "prefill") and "router_probs" (the layer's full softmax), as
`routing.RoutingRecorder` writes. `load_trace` groups it per layer, problem after problem, tokens
in order; consecutive prefill rows of one problem become one call (the runtime runs a prompt as one
forward call), every other row is one call.

`replay` drives one cache per layer through the runtime's own call schedule
(`runtime.schedule.call_schedule`, the code `OffloadedExperts.forward` runs), minus the tensors,
so its counters are the runtime's by construction. Each problem starts with empty (cold) caches,
so first uses are misses: this is the convention that reproduces the Belady and decayed-frequency
columns of the traces README exactly (see `replay` for LRU). `warm=True` starts each cache as
`load()` does (experts 0..slots-1 resident), and `prefetch_top_n` replays speculative prefetch
from a trace that recorded the next layer's router (`next_router_probs`), so a recorded live run
replays to the very counters the live run reported.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from offload_moe.runtime.cache import CacheStats, EvictionPolicy, ExpertCache
from offload_moe.runtime.schedule import call_schedule, prefetch_schedule, settle_prefetches, wants_routing
from offload_moe.runtime.policies import make_policy, observe_routing


@dataclass(frozen=True)
class Step:
    """One forward call of one layer: the routed experts (distinct, in gate order for a decode
    token) with their routing weights summed over the call's tokens, and where it came from."""

    experts: tuple[int, ...]
    probs: tuple[float, ...]
    problem_id: int = 0
    token_idx: int = 0  # first token of the call
    router_probs: tuple[float, ...] | None = None  # full softmax summed over the call's tokens
    next_router_probs: tuple[float, ...] | None = None  # next layer's router on this input, summed

    @property
    def routed(self) -> dict[int, float]:
        return dict(zip(self.experts, self.probs))


Trace = dict[int, list[Step]]  # layer -> its calls, problem after problem
PolicyFactory = Callable[..., EvictionPolicy]


def load_trace(path: str | Path) -> Trace:
    """Read a routing trace: layer -> calls ordered by (problem_id, token_idx)."""
    path = Path(path)
    rows: dict[tuple[int, int], list[tuple[int, dict]]] = defaultdict(list)
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = (int(row["layer"]), int(row["problem_id"]))
                token = int(row["token_idx"])
                if len(row["experts"]) != len(row["gating_probs"]):
                    raise ValueError("experts and gating_probs differ in length")
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a routing row ({e})") from None
            rows[key].append((token, row))
    trace: Trace = defaultdict(list)
    for layer, problem in sorted(rows):
        group = sorted(rows[(layer, problem)], key=lambda item: item[0])
        i = 0
        while i < len(group):
            j = i + 1
            if group[i][1].get("phase") == "prefill":
                while j < len(group) and group[j][1].get("phase") == "prefill":
                    j += 1
            trace[layer].append(_merge(problem, group[i:j]))
            i = j
    return dict(trace)


def _merge(problem: int, rows: list[tuple[int, dict]]) -> Step:
    """The call made of `rows` (token_idx, row): distinct experts in first-seen order, summed
    weights and router probabilities."""
    weight: dict[int, float] = {}
    for _, row in rows:
        for e, p in zip(row["experts"], row["gating_probs"]):
            weight[int(e)] = weight.get(int(e), 0.0) + float(p)
    return Step(
        experts=tuple(weight),
        probs=tuple(weight.values()),
        problem_id=problem,
        token_idx=rows[0][0],
        router_probs=_summed(rows, "router_probs"),
        next_router_probs=_summed(rows, "next_router_probs"),
    )


def _summed(rows: list[tuple[int, dict]], key: str) -> tuple[float, ...] | None:
    """The per-expert sum of a distribution every row recorded under `key`, else None."""
    if not all(row.get(key) is not None for _, row in rows):
        return None
    width = len(rows[0][1][key])
    return tuple(sum(float(row[key][e]) for _, row in rows) for e in range(width))


def num_experts_of(trace: Trace) -> int:
    """Experts per layer: the router distribution's length if recorded, else the largest id + 1."""
    for steps in trace.values():
        for step in steps:
            if step.router_probs is not None:
                return len(step.router_probs)
    return 1 + max((e for steps in trace.values() for step in steps for e in step.experts), default=0)


def run_call(cache: ExpertCache, step: Step, nbytes: int = 0) -> None:
    """One forward call through the runtime's call schedule (`runtime.schedule`), without
    tensors: the policy observes the routing, then every step is taken (copies finish in order)."""
    if wants_routing(cache):
        router = dict(enumerate(step.router_probs)) if step.router_probs is not None else None
        routed = step.routed
        observe_routing(cache.policy, {e: routed[e] for e in sorted(routed)}, router)  # ascending, as live
    for _ in call_schedule(cache, sorted(set(step.experts)), nbytes):
        pass


def _build(policy: PolicyFactory | str, segment: Sequence[Step]) -> EvictionPolicy:
    if isinstance(policy, str):
        return make_policy(policy)
    if getattr(policy, "needs_future", False):  # offline policies (BeladyPolicy) see the future
        return policy([s.experts for s in segment])
    return policy()


@dataclass(frozen=True)
class ReplayOptions:
    """reset_per_problem: a fresh cache per problem (the traces README's convention; False lets a
    layer's cache run on from one problem into the next). warm: each cache starts with experts
    0..slots-1 resident, as `load()` leaves it. prefetch_top_n: replay the runtime's speculative
    prefetch from the trace's `next_router_probs`. expert_bytes: bytes counted per copy."""

    reset_per_problem: bool = True
    warm: bool = False
    prefetch_top_n: int = 0
    expert_bytes: int = 0


def _prefetch_lists(previous: Sequence[Step] | None, steps: Sequence[Step], top_n: int, num_experts: int,
                    slots: int) -> list[list[int]]:
    """Per call of this layer, what the previous MoE layer prefetched into it just before (most
    likely first: the runtime's top-n of the summed next-layer router probabilities)."""
    if previous is None or top_n <= 0 or slots >= num_experts:
        return [[] for _ in steps]
    if len(previous) != len(steps):
        raise ValueError(f"cannot replay prefetch: consecutive layers have {len(previous)} and {len(steps)} calls")
    n = min(top_n, num_experts, slots)
    lists = []
    for step in previous:
        scores = step.next_router_probs
        lists.append([] if scores is None else sorted(range(len(scores)), key=lambda e: (-scores[e], e))[:n])
    return lists


def _replay_layer(steps: Sequence[Step], prefetches: Sequence[list[int]], policy: PolicyFactory | str,
                  slots: int, num_experts: int, options: ReplayOptions) -> CacheStats:
    """One layer's calls, cache by cache (one per problem when `reset_per_problem`)."""
    total = CacheStats()
    planned = iter(prefetches)
    for segment in _segments(steps, options.reset_per_problem):
        cache = ExpertCache(num_experts, slots, _build(policy, segment))
        if options.warm:
            cache.preload(list(range(slots)))
        for step, prefetch in zip(segment, planned):
            prefetched = [e for e, _ in prefetch_schedule(cache, prefetch, options.expert_bytes)]
            settle_prefetches(cache.stats, prefetched, set(step.experts))
            run_call(cache, step, options.expert_bytes)
        total = total + cache.stats
    return total


def replay_stats(
    trace: Trace,
    policy: PolicyFactory | str,
    slots: int,
    num_experts: int | None = None,
    reset_per_problem: bool = True,
    *,
    warm: bool = False,
    prefetch_top_n: int = 0,
    expert_bytes: int = 0,
) -> dict[int, CacheStats]:
    """Per-layer cache counters of a replay (see `replay` and `ReplayOptions`)."""
    num_experts = num_experts if num_experts is not None else num_experts_of(trace)
    options = ReplayOptions(reset_per_problem, warm, prefetch_top_n, expert_bytes)
    stats: dict[int, CacheStats] = {}
    previous: list[Step] | None = None
    for layer, steps in sorted(trace.items()):
        prefetches = _prefetch_lists(previous, steps, prefetch_top_n, num_experts, slots)
        stats[layer] = _replay_layer(steps, prefetches, policy, slots, num_experts, options)
        previous = steps
    return stats


def replay(
    trace: Trace,
    policy: PolicyFactory | str,
    slots: int,
    num_experts: int | None = None,
    reset_per_problem: bool = True,
) -> float:
    """Hit rate (hits / expert uses over all layers and problems) of `policy` with `slots` slots
    per layer, caches starting empty.

    `policy`: a registered name, a no-argument factory (a policy class), or a factory with
    `needs_future = True` (BeladyPolicy), called with the segment's expert sets. One policy and
    cache per layer, and per problem when `reset_per_problem` (the traces README's convention;
    False lets a layer's cache run on from one problem into the next).

    On the Mixtral HumanEval trace this reproduces the Belady and lfu-decay columns of the traces
    README exactly (`python bench/replay_policies.py`; figures in bench/RESULTS.md). LRU differs
    from that README's LRU column at 3 and 4 slots: LRU's choice between two experts last used in
    the same call depends on the order they were touched (the runtime touches hits before misses,
    ascending), and no such order we tried gives both README figures.
    """
    total = sum(replay_stats(trace, policy, slots, num_experts, reset_per_problem).values(), CacheStats())
    return total.hit_rate if total.hits + total.misses else math.nan


def _segments(steps: Sequence[Step], reset_per_problem: bool) -> Iterable[list[Step]]:
    if not reset_per_problem:
        yield list(steps)
        return
    segment: list[Step] = []
    for step in steps:
        if segment and step.problem_id != segment[-1].problem_id:
            yield segment
            segment = []
        segment.append(step)
    if segment:
        yield segment
