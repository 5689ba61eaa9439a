"""Cache bookkeeping: LRU decisions, protection of experts in use, and exact hit/miss counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.runtime.cache import ExpertCache, LRUPolicy
from offload_moe.runtime.policies import make_policy
from offload_moe.errors import ConfigError
from offload_moe.quant.formats import dense_format
from offload_moe.runtime.offloaded_experts import OffloadedExperts, SlotPool
from offload_moe.model.arch import gated
from offload_moe.runtime.store import ExpertLayout, ExpertStore
from offload_moe.runtime.transfer import CpuTransferEngine


def test_lru_policy_evicts_least_recently_used():
    lru = LRUPolicy()
    for e in (0, 1, 2):
        lru.on_insert(e)
    lru.on_access(0)  # order now 1, 2, 0
    assert lru.choose_victim({0, 1, 2}) == 1
    assert lru.choose_victim({0, 2}) == 2
    lru.on_evict(1)
    lru.on_insert(3)  # order 2, 0, 3
    assert lru.choose_victim({0, 2, 3}) == 2
    with pytest.raises(ValueError):
        lru.choose_victim(set())


def test_cache_never_evicts_protected_and_counts():
    cache = ExpertCache(num_experts=4, num_slots=2, policy=LRUPolicy())
    assert cache.admit(0, protected={0}, nbytes=10) == 0
    assert cache.admit(1, protected={1}, nbytes=10) == 1
    # 0 is least recently used but protected: 1 goes instead.
    assert cache.admit(2, protected={0, 2}, nbytes=10) == 1
    assert cache.slot_of(1) is None and cache.resident == [0, 2]
    # Every slot protected: no slot, nothing changes.
    assert cache.admit(3, protected={0, 2, 3}, nbytes=10) is None
    assert cache.resident == [0, 2]
    assert (cache.stats.misses, cache.stats.evictions, cache.stats.bytes_copied) == (3, 1, 30)
    with pytest.raises(ValueError):
        cache.admit(0, protected=set(), nbytes=10)


def test_bad_slot_counts_and_policy_names_are_refused():
    with pytest.raises(ConfigError, match="num_slots=0"):
        ExpertCache(num_experts=4, num_slots=0, policy=LRUPolicy())
    with pytest.raises(ConfigError, match="policy='mru'"):
        make_policy("mru")


def _module(num_experts=4, slots=2, hidden=8, ffn=16):
    layout = ExpertLayout.dense(hidden, ffn, torch.float32)
    store = ExpertStore(layout, [0], num_experts)
    gen = torch.Generator().manual_seed(0)
    for e in range(num_experts):
        for t in store.views(0, e).values():
            t.copy_(torch.randn(t.shape, generator=gen))
    module = OffloadedExperts(
        layer=0,
        num_experts=num_experts,
        apply_gate=gated(nn.functional.silu),
        store=store,
        cache=ExpertCache(num_experts, slots, LRUPolicy()),
        pool=SlotPool(store, slots, torch.device("cpu")),
        engine=CpuTransferEngine(),
        fmt=dense_format(torch.float32),
    )
    return module, store


def _dense_reference(store, x, idx, w, num_experts):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            v = store.views(0, int(idx[t, k]))
            g, u = (x[t] @ v["gate_up"].T).chunk(2)
            out[t] += w[t, k] * ((nn.functional.silu(g) * u) @ v["down"].T)
    return out


def test_known_routing_sequence_gives_exact_hits_and_misses():
    module, store = _module(num_experts=4, slots=2)
    # Cold cache; one token per call, top-2. Expected LRU trace worked by hand:
    steps = [
        ([0, 1], 0, 2),  # miss 0, miss 1            -> resident {0, 1}
        ([1, 0], 2, 0),  # hit 1, hit 0 (same call)  -> LRU order 0, 1 (touched ascending)
        ([2, 0], 1, 1),  # hit 0, miss 2 evicts 1    -> {0, 2}
        ([1, 3], 0, 2),  # both miss; evict 0 then 2 -> {1, 3}
        ([3, 2], 1, 1),  # hit 3, miss 2 evicts 1    -> {2, 3}
        ([2, 3], 2, 0),
    ]
    hidden = torch.randn(1, 8)
    for experts, hits, misses in steps:
        before = (module.cache.stats.hits, module.cache.stats.misses)
        idx = torch.tensor([experts])
        w = torch.tensor([[0.7, 0.3]])
        out = module(hidden, idx, w)
        assert (module.cache.stats.hits - before[0], module.cache.stats.misses - before[1]) == (hits, misses)
        torch.testing.assert_close(out, _dense_reference(store, hidden, idx, w, 4))
    assert module.cache.resident == [2, 3]
    assert module.cache.stats.bytes_copied == 6 * store.layout.nbytes


def test_prefill_needing_more_experts_than_slots_is_served_one_slot_at_a_time():
    module, store = _module(num_experts=4, slots=1)
    x = torch.randn(6, 8)
    idx = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2], [1, 3]])
    w = torch.rand(6, 2)
    out = module(x, idx, w)
    torch.testing.assert_close(out, _dense_reference(store, x, idx, w, 4))
    assert (module.cache.stats.hits, module.cache.stats.misses) == (0, 4)
    # A hit is served first, before misses evict it: expert 3 is resident now.
    assert module.cache.resident == [3]
    module(x[:1], torch.tensor([[3, 1]]), w[:1])
    assert (module.cache.stats.hits, module.cache.stats.misses) == (1, 5)


def _replay_lru(routing: list[list[int]], num_experts: int, slots: int) -> tuple[int, int]:
    """Independent LRU replay of per-call expert sets, starting warm with experts 0..slots-1.

    Within a call: hits are touched and computed first (ascending), misses are admitted in
    ascending order as soon as a slot holds no expert the call still has to compute."""
    order = list(range(slots))  # resident experts, least recent first
    hits = misses = 0
    for needed in routing:
        needed = sorted(set(needed))
        todo = [e for e in needed if e in order] + [e for e in needed if e not in order]
        hits += sum(e in order for e in needed)
        for e in needed:
            if e in order:
                order.remove(e)
                order.append(e)
        queue = [e for e in needed if e not in order]
        misses += len(queue)
        remaining = set(needed)
        for current in todo:
            while queue:  # admit as many misses as slots allow
                victims = [v for v in order if v not in remaining]
                if len(order) == slots and not victims:
                    break
                if len(order) == slots:
                    order.remove(victims[0])
                order.append(queue.pop(0))
            assert current in order
            remaining.discard(current)
    return hits, misses


@pytest.mark.parametrize("slots", [2, 4, 8])
def test_model_stats_match_lru_replay_of_the_reference_routing(tiny_fp32, slots):
    ref = AutoModelForCausalLM.from_pretrained(tiny_fp32, dtype=torch.float32, experts_implementation="eager")
    llm = offload_moe.load(tiny_fp32, device="cpu", slots_per_layer=slots, prefetch_top_n=0, policy="lru", progress=False)
    config = ref.config
    prompt = torch.arange(3, 20)[None]
    # Reference routing: the prompt as one call, then each greedy token as one call.
    out = ref.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    calls = [out[:, : prompt.shape[1]]] + [out[:, : n + 1] for n in range(prompt.shape[1], out.shape[1] - 1)]
    per_layer: list[list[list[int]]] = [[] for _ in range(config.num_hidden_layers)]
    for ids in calls:
        logits = ref(ids, output_router_logits=True).router_logits
        new = ids.shape[1] if ids is calls[0] else 1
        for layer, lg in enumerate(logits):
            top = lg[-new:].topk(config.num_experts_per_tok, dim=-1).indices
            per_layer[layer].append(top.flatten().tolist())
    assert torch.equal(llm.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False), out)
    stats = llm.stats()
    for layer in range(config.num_hidden_layers):
        hits, misses = _replay_lru(per_layer[layer], config.num_local_experts, slots)
        row = stats["layers"][layer]
        assert (row["hits"], row["misses"]) == (hits, misses), f"layer {layer}"
        assert row["bytes_copied"] == misses * llm.runtime.store.layout.nbytes
    assert stats["total"]["hits"] == sum(r["hits"] for r in stats["layers"])


class _CountingEngine(CpuTransferEngine):
    """The CPU engine, counting submissions and copies."""

    def __init__(self):
        super().__init__()
        self.submissions, self.copies = 0, 0

    def copy_many(self, copies):
        self.submissions += 1
        self.copies += len(copies)
        return super().copy_many(copies)


def test_small_experts_are_copied_in_batches(monkeypatch):
    """Many small experts (Qwen3-30B-A3B-like: 128 experts, top-8): the misses of one call go
    out in submissions of about BATCH_BYTES, not one per expert; results stay exact."""
    from offload_moe.runtime import offloaded_experts as experts_module

    num_experts, slots = 16, 12
    module, store = _module(num_experts=num_experts, slots=slots)
    engine = module.engine = _CountingEngine()
    monkeypatch.setattr(experts_module, "BATCH_BYTES", 3 * store.layout.nbytes)  # 3 experts per submission
    x = torch.randn(4, 8)
    idx = torch.tensor([[4, 5], [6, 7], [8, 9], [10, 11]])  # 8 misses (experts 0..11 start cold)
    w = torch.rand(4, 2)
    out = module(x, idx, w)
    torch.testing.assert_close(out, _dense_reference(store, x, idx, w, num_experts))
    assert module.cache.stats.misses == 8
    assert (engine.copies, engine.submissions) == (8, 3)  # 3 + 3 + 2
