"""Replay recorded routing through real `ExpertCache`s to judge eviction policies offline.

A trace is JSON lines, one object per (token, MoE layer), as in ../shared/traces/:

    {"problem_id": 0, "layer": 3, "token_idx": 17, "experts": [5, 1], "gating_probs": [0.71, 0.29]}

optionally with "phase" ("decode" / "prefill") and "router_probs" (the layer's full softmax), as
`routing.RoutingRecorder` writes. `load_trace` groups it per layer, problem after problem, tokens
in order; consecutive prefill rows of one problem become one call (the runtime runs a prompt as one
forward call), every other row is one call.

`replay` drives one cache per layer exactly as `experts.OffloadedExperts.forward` does within a
call: the policy's `observe` hook first (when it has one), then `record_hit` for the resident
experts in ascending order, then `admit` of the missing ones in ascending order with the call's
experts protected until they are computed. Each problem starts with empty (cold) caches, so first
uses are misses: this is the convention that reproduces the Belady and decayed-frequency columns of
the traces README exactly (see `replay` for LRU).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from offload_moe.runtime.cache import CacheStats, EvictionPolicy, ExpertCache
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
    router: list[float] | None = None
    if all(row.get("router_probs") is not None for _, row in rows):
        width = len(rows[0][1]["router_probs"])
        router = [sum(float(row["router_probs"][e]) for _, row in rows) for e in range(width)]
    return Step(
        experts=tuple(weight),
        probs=tuple(weight.values()),
        problem_id=problem,
        token_idx=rows[0][0],
        router_probs=tuple(router) if router is not None else None,
    )


def num_experts_of(trace: Trace) -> int:
    """Experts per layer: the router distribution's length if recorded, else the largest id + 1."""
    for steps in trace.values():
        for step in steps:
            if step.router_probs is not None:
                return len(step.router_probs)
    return 1 + max((e for steps in trace.values() for step in steps for e in step.experts), default=0)


def run_call(cache: ExpertCache, step: Step) -> None:
    """One forward call, as `OffloadedExperts.forward` does it, minus the tensors: observe,
    hits ascending, then misses admitted ascending as soon as a slot holds no expert the call
    still has to compute (copies are taken to finish in order)."""
    router = dict(enumerate(step.router_probs)) if step.router_probs is not None else None
    observe_routing(cache.policy, step.routed, router)
    needed = sorted(set(step.experts))
    hits = [e for e in needed if cache.slot_of(e) is not None]
    for e in hits:
        cache.record_hit(e)
    protected = set(needed)
    pending = deque(e for e in needed if cache.slot_of(e) is None)
    in_flight: list[int] = []

    def start_copies() -> None:
        while pending:
            if cache.admit(pending[0], protected, 0) is None:
                return
            in_flight.append(pending.popleft())

    start_copies()
    for e in hits:  # computed first
        protected.discard(e)
        start_copies()
    while in_flight or pending:
        start_copies()
        e = next(x for x in needed if x in in_flight)  # ascending, like the runtime
        in_flight.remove(e)
        protected.discard(e)


def _build(policy: PolicyFactory | str, segment: Sequence[Step]) -> EvictionPolicy:
    if isinstance(policy, str):
        return make_policy(policy)
    if getattr(policy, "needs_future", False):  # offline policies (BeladyPolicy) see the future
        return policy([s.experts for s in segment])
    return policy()


def replay_stats(
    trace: Trace,
    policy: PolicyFactory | str,
    slots: int,
    num_experts: int | None = None,
    reset_per_problem: bool = True,
) -> dict[int, CacheStats]:
    """Per-layer cache counters of a replay (see `replay`)."""
    num_experts = num_experts if num_experts is not None else num_experts_of(trace)
    stats: dict[int, CacheStats] = {}
    for layer, steps in sorted(trace.items()):
        total = CacheStats()
        for segment in _segments(steps, reset_per_problem):
            cache = ExpertCache(num_experts, slots, _build(policy, segment))
            for step in segment:
                run_call(cache, step)
            for name in ("hits", "misses", "evictions", "bytes_copied"):
                setattr(total, name, getattr(total, name) + getattr(cache.stats, name))
        stats[layer] = total
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

    On the Mixtral HumanEval trace this gives Belady 0.397/0.620/0.747/0.834/0.898 and
    lfu-decay 0.397/0.532/0.642/0.742/0.832 at 2..6 slots, as the README says; LRU gives
    0.397/0.515/0.622/0.719/0.813, the README 0.518/0.621 at 3/4 slots: LRU's choice between two
    experts last used in the same call depends on the order they were touched (the runtime
    touches hits before misses, ascending), and no such order we tried gives both README figures.
    """
    stats = replay_stats(trace, policy, slots, num_experts, reset_per_problem)
    hits = sum(s.hits for s in stats.values())
    uses = hits + sum(s.misses for s in stats.values())
    return hits / uses if uses else math.nan


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
