"""The call schedule (runtime.schedule) on known sequences, and the one-protocol guarantee: a live
run's routing, recorded and replayed, gives the live run's counters exactly."""

from __future__ import annotations

import pytest
import torch

import offload_moe
from offload_moe.planning.replay import load_trace, replay_stats
from offload_moe.runtime.cache import CacheStats, ExpertCache, LRUPolicy
from offload_moe.runtime.schedule import (Compute, CopyIn, call_schedule, prefetch_schedule, resident_slots,
                                          settle_prefetches)


def _cache(num_experts=4, slots=2, resident=()):
    cache = ExpertCache(num_experts, slots, LRUPolicy())
    cache.preload(list(resident))
    return cache


def test_hits_first_then_misses_as_slots_free_up():
    cache = _cache(resident=[0])  # expert 0 in slot 0, slot 1 free
    steps = list(call_schedule(cache, [0, 1, 2], nbytes=10))
    assert steps == [
        CopyIn(((1, 1),)),  # the free slot at once; 2 must wait: 0 and 1 are still needed
        Compute(0, 0),  # the hit
        CopyIn(((2, 0),)),  # 0 is done: its slot takes 2
        Compute(1, 1, copied=True),
        Compute(2, 0, copied=True),
    ]
    s = cache.stats
    assert (s.hits, s.misses, s.evictions, s.bytes_copied) == (1, 2, 1, 20)
    assert cache.resident == [1, 2]


def test_resident_slots_is_the_schedule_of_a_call_of_hits_only():
    cache = _cache(num_experts=6, slots=3, resident=(1, 4, 5))
    steps = list(call_schedule(_cache(num_experts=6, slots=3, resident=(1, 4, 5)), [1, 5], 8))
    assert resident_slots(cache, [1, 5]) == [step.slot for step in steps]
    assert all(isinstance(step, Compute) and not step.copied for step in steps)
    assert (cache.stats.hits, cache.stats.misses) == (2, 0)
    assert resident_slots(cache, [1, 2]) is None  # 2 is missing: nothing recorded ...
    assert cache.stats.hits == 2
    assert cache.admit(2, protected={4}, nbytes=8) == steps[0].slot  # ... 1 is still less recent than 5
    assert resident_slots(cache, []) == []


def test_cpu_misses_are_computed_after_the_hits_without_a_copy():
    cache = _cache(resident=[0])
    steps = list(call_schedule(cache, [0, 2, 3], nbytes=10, on_cpu=lambda e: e == 3))
    assert steps == [CopyIn(((2, 1),)), Compute(0, 0), Compute(3, None), Compute(2, 1, copied=True)]
    s = cache.stats
    assert (s.hits, s.misses, s.cpu_computed, s.bytes_copied) == (1, 2, 1, 10)
    assert cache.resident == [0, 2]


def test_one_slot_serialises_every_miss():
    cache = _cache(slots=1)
    steps = list(call_schedule(cache, [1, 3], nbytes=1))
    assert steps == [CopyIn(((1, 0),)), Compute(1, 0, copied=True), CopyIn(((3, 0),)), Compute(3, 0, copied=True)]


def test_prefetch_admission_and_settling():
    cache = _cache(resident=[0])
    assert prefetch_schedule(cache, [2, 0, 3], nbytes=5) == [(2, 1)]  # 3 finds only protected slots
    assert cache.stats.prefetch_issued == 1 and cache.stats.misses == 0
    assert settle_prefetches(cache.stats, [2], {1, 2}) == [2]
    assert settle_prefetches(cache.stats, [3], {1}) == []
    assert (cache.stats.prefetch_used, cache.stats.prefetch_wasted) == (1, 1)


def test_cache_stats_add_up():
    a = CacheStats(hits=3, misses=1, prefetch_issued=2, prefetch_used=1)
    b = CacheStats(hits=1, misses=3, evictions=2, bytes_copied=7, cpu_computed=1)
    total = a + b
    assert (total.hits, total.misses, total.evictions, total.bytes_copied, total.cpu_computed) == (4, 4, 2, 7, 1)
    assert total.hit_rate == 0.5 and total.prefetch_recall == 1 / 5
    assert sum([a, b], CacheStats()) == total


@pytest.mark.parametrize("policy", ["lru", "lfu-decay", "markov"])
@pytest.mark.parametrize("slots,prefetch", [(1, 0), (2, 2), (3, 1)])
def test_recorded_run_replays_to_the_live_counters(tiny_fp32, tmp_path, policy, slots, prefetch):
    """The same routing through the live module (prompt + greedy decode, prefetch on or off) and
    through the replay of its recorded trace: every counter of every layer is equal."""
    trace_path = tmp_path / "run.jsonl"
    llm = offload_moe.load(tiny_fp32, device="cpu", slots_per_layer=slots, policy=policy, prefetch_top_n=prefetch,
                           record_routing=trace_path, progress=False)
    ids = torch.randint(1, 200, (1, 24), generator=torch.Generator().manual_seed(slots))
    llm.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    live = {layer: module.cache.stats for layer, module in llm.runtime.experts.items()}
    nbytes, num_experts = llm.runtime.store.layout.nbytes, llm.runtime.spec.num_experts
    llm.close()  # flushes the trace
    replayed = replay_stats(load_trace(trace_path), policy, slots, num_experts=num_experts, warm=True,
                            prefetch_top_n=prefetch, expert_bytes=nbytes)
    assert sorted(replayed) == sorted(live)
    for layer, stats in live.items():
        assert stats.hits + stats.misses > 0
        assert replayed[layer] == stats, f"layer {layer}"
    if prefetch:
        assert sum(s.prefetch_issued for s in live.values()) > 0
