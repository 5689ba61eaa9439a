"""Eviction policies (exact decisions worked by hand), the registry, trace loading and replay,
Belady against brute force, and the default policy against LRU on the real Mixtral trace."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from offload_moe.runtime.cache import ExpertCache, LRUPolicy
from offload_moe.config import OffloadConfig
from offload_moe.errors import ConfigError
from offload_moe.quant.formats import dense_format
from offload_moe.runtime.offloaded_experts import OffloadedExperts, SlotPool
from offload_moe.model.arch import gated
from offload_moe.runtime.policies import (
    DEFAULT_POLICY,
    POLICIES,
    ARCPolicy,
    BeladyPolicy,
    DecayedFrequencyPolicy,
    LRU2Policy,
    MarkovPolicy,
    make_policy,
    observe_routing,
)
from offload_moe.planning.replay import Step, load_trace, num_experts_of, replay, replay_stats, run_call
from offload_moe.runtime.store import ExpertLayout, ExpertStore
from offload_moe.runtime.transfer import CpuTransferEngine

REAL_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mixtral-8x7b-instruct-humaneval.jsonl"


def _call(policy, routed: dict[int, float], accessed=(), inserted=()) -> None:
    """One forward call as the runtime makes it: observe, then hits, then insertions."""
    observe_routing(policy, routed)
    for e in accessed:
        policy.on_access(e)
    for e in inserted:
        policy.on_insert(e)


# --- registry ----------------------------------------------------------------------------------


def test_registry_knows_every_policy_and_old_entry_points_still_work():
    assert {"lru", "lru2", "arc", "lfu-decay", "markov"} <= set(POLICIES)
    assert DEFAULT_POLICY in POLICIES
    for name in POLICIES:
        policy = make_policy(name)
        assert policy.name == name
        assert make_policy(name) is not policy  # a fresh one per layer
    assert isinstance(make_policy("lru"), LRUPolicy)
    with pytest.raises(ConfigError, match="policy='mru'"):
        make_policy("mru")
    assert OffloadConfig(device=torch.device("cpu"), dtype=torch.float32, policy="markov").policy == "markov"
    with pytest.raises(ConfigError, match="policy='mru'"):
        OffloadConfig(device=torch.device("cpu"), dtype=torch.float32, policy="mru")


def test_observe_routing_skips_policies_without_the_hook():
    observe_routing(LRUPolicy(), {0: 1.0})  # no hook: nothing happens, no error
    seen = []

    class Spy:
        def observe(self, routed, router_probs=None):
            seen.append((dict(routed), router_probs))

    observe_routing(Spy(), {3: 0.75, 1: 0.25}, {1: 0.2, 3: 0.6})
    assert seen == [({3: 0.75, 1: 0.25}, {1: 0.2, 3: 0.6})]


# --- decisions worked by hand ------------------------------------------------------------------


def test_decayed_frequency_keeps_the_frequent_expert_that_lru_would_evict():
    p = DecayedFrequencyPolicy(decay=0.9)
    # count after each call (x0.9 at each call's start, +1 per use):
    _call(p, {0: 1.0}, inserted=[0])  # c0 = 1
    _call(p, {0: 1.0}, accessed=[0])  # c0 = 0.9 + 1 = 1.9
    _call(p, {0: 1.0}, accessed=[0])  # c0 = 1.71 + 1 = 2.71
    _call(p, {1: 1.0}, inserted=[1])  # c0 = 2.439, c1 = 1
    _call(p, {2: 1.0})  # c0 = 2.1951, c1 = 0.9: 1 goes (LRU would evict 0, used longer ago)
    assert p.choose_victim({0, 1}) == 1
    p.on_evict(1)
    p.on_insert(2)  # c2 = 1
    # Counts survive eviction: 1 comes back with 0.9 * 0.9 + 1 = 1.81 > c2 = 0.9
    _call(p, {1: 1.0})
    p.on_insert(1)
    _call(p, {3: 1.0})  # c0 = 1.778, c1 = 1.629, c2 = 0.81
    assert p.choose_victim({0, 1, 2}) == 2
    with pytest.raises(ValueError):
        p.choose_victim(set())


def test_decayed_frequency_ties_go_to_the_least_recently_used():
    p = DecayedFrequencyPolicy(decay=1.0)
    _call(p, {5: 1.0}, inserted=[5])
    _call(p, {3: 1.0}, inserted=[3])  # both counted once: 5 is older
    assert p.choose_victim({3, 5}) == 5


def test_markov_keeps_the_expert_that_follows_the_current_one():
    p = MarkovPolicy(decay=1.0, prior=1.0)
    # Calls route 0, 1, 2, 2, 2, 0. Learned transitions (context -> next call's experts):
    # 0->1 once, 1->2 once, 2->2 twice, 2->0 once; seen[0] = 1, seen[2] = 3; rates over 6 calls:
    # r0 = 2/6, r1 = 1/6, r2 = 3/6.
    for e in (0, 1, 2):
        _call(p, {e: 1.0}, inserted=[e])
    _call(p, {2: 1.0}, accessed=[2])
    _call(p, {2: 1.0}, accessed=[2])
    _call(p, {0: 1.0}, accessed=[0])
    # Context {0}: P(1) = (1 + 1/6) / (1 + 1) = 7/12; P(2) = (0 + 3/6) / (1 + 1) = 1/4.
    assert p.probability(1) == pytest.approx(7 / 12)
    assert p.probability(2) == pytest.approx(1 / 4)
    # So 2 is evicted, though it is the more frequent and the more recent (LRU, lfu-decay: 1).
    assert p.choose_victim({1, 2}) == 2
    # A two-expert call: it teaches 0->0 and 0->2 (seen[0] = 2, 7 calls), and becomes the
    # context with each expert weighted by its share of the routing weight: {0: .25, 2: .75}.
    _call(p, {0: 0.3, 2: 0.9}, accessed=[0, 2])
    r = {0: 3 / 7, 1: 1 / 7, 2: 4 / 7}
    trans = {0: {1: 1, 0: 1, 2: 1}, 2: {2: 2, 0: 1}}
    seen = {0: 2, 2: 3}
    for e in (0, 1, 2):
        from_0 = (trans[0].get(e, 0) + r[e]) / (seen[0] + 1)
        from_2 = (trans[2].get(e, 0) + r[e]) / (seen[2] + 1)
        assert p.probability(e) == pytest.approx(0.25 * from_0 + 0.75 * from_2)


def test_markov_without_the_hook_counts_each_use_as_a_call():
    p = MarkovPolicy(decay=1.0, prior=1.0)
    for e in (0, 1, 0, 1, 0):  # uses only, no observe(): 0->1 twice, 1->0 twice
        p.on_insert(e) if e not in p.last_use else p.on_access(e)
    p.on_insert(2)  # context now {2}, never seen: P falls back to the use rates
    # rates over 6 one-expert calls: r0 = 3/6, r1 = 2/6: 1 goes
    assert p.probability(1) == pytest.approx(2 / 6)
    assert p.choose_victim({0, 1}) == 1


def test_markov_scores_survive_many_steps_of_decay():
    p = MarkovPolicy(decay=0.5)
    for step in range(2000):  # 0.5**-2000 would overflow without the lazy rescaling
        _call(p, {step % 3: 1.0, 3: 1.0}, accessed=[])
    assert 0.0 <= p.probability(1) <= 1.0 and p.probability(3) == pytest.approx(1.0, abs=0.05)


def test_lru2_evicts_by_second_most_recent_use():
    p = LRU2Policy()
    for e in (0, 1):
        p.on_insert(e)  # times 1, 2
    p.on_access(0)  # 0: (3, 1)
    p.on_insert(2)  # 2: (4, -)
    # 1 and 2 were used once: the older of them, 1, goes first.
    assert p.choose_victim({0, 1, 2}) == 1
    # 2 was used once, 0 twice: 2 goes although 0 is least recently used (LRU would take 0).
    assert p.choose_victim({0, 2}) == 2
    p.on_evict(1)
    p.on_insert(1)  # 1: (5, 2): its history survived eviction
    assert p.choose_victim({0, 1}) == 0  # 0's previous use (1) is older than 1's (2)


def test_arc_moves_between_recency_and_frequency_lists():
    p = ARCPolicy()
    p.on_insert(0)
    p.on_insert(1)  # T1 = [0, 1], capacity 2
    p.on_access(0)  # T1 = [1], T2 = [0]
    assert p.choose_victim({0, 1}) == 1  # |T1| = 1 > p = 0: T1's LRU
    p.on_evict(1)  # B1 = [1]
    p.on_insert(2)  # T1 = [2]
    assert p.choose_victim({0, 2}) == 2
    p.on_evict(2)  # B1 = [1, 2]
    p.on_insert(1)  # ghost hit in B1: p = 0 + max(1, 0/2) = 1; T2 = [0, 1]
    assert p.p == 1 and list(p.t2) == [0, 1] and list(p.b1) == [2]
    assert p.choose_victim({0, 1}) == 0  # T1 empty: T2's LRU
    p.on_evict(0)  # B2 = [0]
    p.on_insert(2)  # ghost hit in B1: p = min(2, 1 + max(1, 1/1)) = 2; T2 = [1, 2]
    assert p.p == 2
    p.on_evict(p.choose_victim({1, 2}))  # T2's LRU, 1 -> B2 = [0, 1]
    p.on_insert(3)  # T1 = [3]
    p.on_access(2)  # T2 = [2], now the most recently used
    # |T1| = 1 <= p = 2: T1 is under target, so T2 gives up 2 (LRU would evict 3).
    assert p.choose_victim({2, 3}) == 2


def test_belady_evicts_the_farthest_next_use():
    future = [{0, 1}, {2}, {1}, {3}, {0}, {2}]
    p = BeladyPolicy(future)
    for call in future[:2]:
        observe_routing(p, {e: 1.0 for e in call})
    # During call 1 ({2}): next uses after it: 0 at 4, 1 at 2: evict 0.
    assert p.next_use(0) == 4 and p.next_use(1) == 2 and p.next_use(3) == 3
    assert p.choose_victim({0, 1}) == 0
    for call in future[2:4]:
        observe_routing(p, {e: 1.0 for e in call})
    # During call 3: 1 is never used again, 2 at call 5.
    assert p.next_use(1) == float("inf")
    assert p.choose_victim({1, 2}) == 1


# --- Belady against brute force ----------------------------------------------------------------


def _brute_force_best_hits(calls: list[tuple[int, ...]], slots: int) -> int:
    """Most hits over every sequence of eviction choices, cold start, misses admitted ascending
    with the call's experts protected (slots >= experts per call)."""

    @functools.lru_cache(maxsize=None)
    def best(i: int, resident: frozenset[int]) -> int:
        if i == len(calls):
            return 0
        needed = sorted(set(calls[i]))
        hits = sum(e in resident for e in needed)
        states = {resident}
        for e in needed:
            if e in resident:
                continue
            nxt = set()
            for state in states:
                if len(state) < slots:
                    nxt.add(state | {e})
                else:
                    nxt.update((state - {v}) | {e} for v in state if v not in needed)
            states = nxt
        return hits + max(best(i + 1, s) for s in states)

    return best(0, frozenset())


@pytest.mark.parametrize("seed", range(6))
def test_belady_matches_brute_force(seed):
    rng = random.Random(seed)
    experts, slots = 5, 3
    calls = [tuple(rng.sample(range(experts), rng.choice([1, 2, 2]))) for _ in range(12)]
    trace = {0: [Step(c, tuple(1.0 / len(c) for _ in c)) for c in calls]}
    stats = replay_stats(trace, BeladyPolicy, slots, num_experts=experts)[0]
    assert stats.hits == _brute_force_best_hits(calls, slots)
    for name in POLICIES:  # and no online policy beats it
        assert replay_stats(trace, name, slots, num_experts=experts)[0].hits <= stats.hits


# --- trace loading and replay ------------------------------------------------------------------


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(problem, layer, token, experts, probs=(0.6, 0.4), **extra):
    row = {"problem_id": problem, "layer": layer, "token_idx": token, "experts": experts, "gating_probs": list(probs)}
    return {**row, **extra}


def test_load_trace_orders_rows_and_merges_prefill_into_one_call(tmp_path):
    rows = [
        _row(1, 0, 0, [3, 1]),
        _row(0, 0, 2, [2, 0], (0.9, 0.1)),
        _row(0, 0, 0, [0, 1], (0.6, 0.4), phase="prefill", router_probs=[0.5, 0.3, 0.1, 0.1]),
        _row(0, 0, 1, [1, 2], (0.7, 0.3), phase="prefill", router_probs=[0.1, 0.6, 0.2, 0.1]),
        _row(0, 1, 0, [3, 2]),
    ]
    trace = load_trace(_write(tmp_path / "t.jsonl", rows))
    assert sorted(trace) == [0, 1]
    first, second, third = trace[0]
    assert (first.experts, first.problem_id, first.token_idx) == ((0, 1, 2), 0, 0)
    assert first.probs == pytest.approx((0.6, 1.1, 0.3))
    assert first.router_probs == pytest.approx((0.6, 0.9, 0.3, 0.2))
    assert (second.experts, second.probs, second.token_idx, second.router_probs) == ((2, 0), (0.9, 0.1), 2, None)
    assert (third.experts, third.problem_id) == ((3, 1), 1)
    assert num_experts_of(trace) == 4  # from router_probs
    with pytest.raises(ValueError, match="t2.jsonl:1"):
        load_trace(_write(tmp_path / "t2.jsonl", [{"layer": 0}]))


def test_replay_lru_hit_rate_on_a_hand_made_trace(tmp_path):
    rows = [
        # layer 0, problem 0, 2 slots: miss 0 1 | hit 1, miss 2 evicts 0 | hit 1, miss 0 evicts 2
        _row(0, 0, 0, [0, 1]), _row(0, 0, 1, [1, 2]), _row(0, 0, 2, [0, 1]),
        # layer 0, problem 1, cold again: miss 0 1 | hit 0 1
        _row(1, 0, 0, [0, 1]), _row(1, 0, 1, [1, 0]),
        # layer 1, problem 0: miss 2 3 | hit 2 3 | hit 3, miss 0 evicts 2
        _row(0, 1, 0, [2, 3]), _row(0, 1, 1, [3, 2]), _row(0, 1, 2, [0, 3]),
        # layer 1, problem 1: miss 1 0
        _row(1, 1, 0, [1, 0]),
    ]
    random.Random(0).shuffle(rows)
    trace = load_trace(_write(tmp_path / "t.jsonl", rows))
    assert num_experts_of(trace) == 4
    # hits 2 + 2 + 3 + 0 over 6 + 4 + 6 + 2 uses
    assert replay(trace, "lru", 2) == pytest.approx(7 / 18)
    assert replay(trace, LRUPolicy, 2) == pytest.approx(7 / 18)
    # Caches running on into problem 1: layer 0 holds {0, 1} (4 hits), layer 1 {0, 3} (hit 0).
    assert replay(trace, "lru", 2, reset_per_problem=False) == pytest.approx(10 / 18)
    stats = replay_stats(trace, "lru", 2)
    assert (stats[0].hits, stats[0].misses, stats[0].evictions) == (4, 6, 2)
    # Enough slots for every expert: only the first use of each expert in each problem misses.
    assert replay(trace, "markov", 4) == pytest.approx((18 - 3 - 2 - 3 - 2) / 18)


def _module(policy, num_experts: int, slots: int) -> OffloadedExperts:
    layout = ExpertLayout.dense(4, 8, torch.float32)
    store = ExpertStore(layout, [0], num_experts)
    for e in range(num_experts):
        for t in store.views(0, e).values():
            t.fill_(0.01 * (e + 1))
    return OffloadedExperts(
        layer=0,
        num_experts=num_experts,
        apply_gate=gated(nn.functional.silu),
        store=store,
        cache=ExpertCache(num_experts, slots, policy),
        pool=SlotPool(store, slots, torch.device("cpu")),
        engine=CpuTransferEngine(),
        fmt=dense_format(torch.float32),
    )


@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("policy", ["lru", "lru2", "arc"])
def test_run_call_drives_the_cache_as_the_runtime_does(policy, slots):
    """Same routing through the real experts module and through replay's run_call: same hits,
    misses, evictions and residents after every call, multi-token calls and 1 slot included."""
    rng = random.Random(slots)
    num_experts = 5
    module = _module(make_policy(policy), num_experts, slots)
    cache = ExpertCache(num_experts, slots, make_policy(policy))
    for _ in range(40):
        tokens = rng.choice([1, 1, 1, 3])
        idx = [rng.sample(range(num_experts), 2) for _ in range(tokens)]
        w = [[0.7, 0.3] for _ in range(tokens)]
        module(torch.ones(tokens, 4), torch.tensor(idx), torch.tensor(w))
        routed: dict[int, float] = {}
        for row, ws in zip(idx, w):
            for e, x in zip(row, ws):
                routed[e] = routed.get(e, 0.0) + x
        run_call(cache, Step(tuple(routed), tuple(routed.values())))
        got, want = cache.stats, module.cache.stats
        assert (got.hits, got.misses, got.evictions) == (want.hits, want.misses, want.evictions)
        assert cache.resident == module.cache.resident


# --- the real trace ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_trace():
    if not REAL_TRACE.is_file():
        pytest.skip(f"{REAL_TRACE} not found")
    return load_trace(REAL_TRACE)


def test_replay_reproduces_the_readme_reference_columns(real_trace):
    # Belady and decayed frequency (x0.95 per token) at 3 and 4 slots, as in the traces README.
    assert round(replay(real_trace, BeladyPolicy, 3), 3) == 0.620
    assert round(replay(real_trace, BeladyPolicy, 4), 3) == 0.747
    assert round(replay(real_trace, "lfu-decay", 4), 3) == 0.642
    assert round(replay(real_trace, "lru", 2), 3) == 0.397


def test_default_policy_beats_lru_on_the_real_trace(real_trace):
    lru = replay(real_trace, "lru", 4)
    best = replay(real_trace, DEFAULT_POLICY, 4)
    assert best >= lru + 0.015 and best >= 0.636
    assert best <= replay(real_trace, BeladyPolicy, 4)


@pytest.mark.parametrize("name", ["lfu-decay", "markov"])
def test_warm_start_preload_does_not_bias_a_hooked_policy(name):
    """The runtime preloads experts 0..slots-1 (on_insert, before any call): once the hook is
    used, a policy decides as if the preload had not been counted as uses."""
    warm, fresh = make_policy(name), make_policy(name)
    for e in (0, 1, 2):
        warm.on_insert(e)
    for call in ({3: 0.6, 0: 0.4}, {1: 0.7, 3: 0.3}, {2: 0.5, 3: 0.5}):
        for p in (warm, fresh):
            observe_routing(p, call)
    for candidates in ({0, 1}, {0, 2}, {1, 2}, {0, 1, 2}):
        assert warm.choose_victim(candidates) == fresh.choose_victim(candidates)
