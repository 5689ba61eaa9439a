"""Speculative prefetch, hybrid CPU compute and routing recording."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.runtime.cache import ExpertCache, LRUPolicy
from offload_moe.quant.formats import dense_format
from offload_moe.runtime.offloaded_experts import OffloadedExperts, PrefetchTarget, SlotPool
from offload_moe.runtime.hybrid import HybridCostModel, LinearTime
from offload_moe.model.arch import gated
from offload_moe.runtime.store import ExpertLayout, ExpertStore
from offload_moe.runtime.transfer import CpuTransferEngine


class _LazyEngine(CpuTransferEngine):
    """Copies run only when a fence is waited on (all earlier copies first, in order, as a real
    copy stream or worker would): a compute that reads a slot before waiting for the copy into
    it reads stale bytes, so a missing wait shows as a wrong output, deterministically."""

    def __init__(self):
        super().__init__()
        self.queue: list[list] = []

    def copy_many(self, copies):
        batch = list(copies)
        self.queue.append(batch)
        engine = self

        class Fence:
            def wait(self):
                while any(b is batch for b in engine.queue):
                    for src, dst, _ in engine.queue.pop(0):
                        dst.copy_(src)

        return Fence()


def _two_layers(num_experts=4, slots=2, hidden=8, ffn=16, next_router=None, prefetch_top_n=0, engine=None):
    """Layers 0 and 1; with `next_router`, layer 0 prefetches into layer 1 through it."""
    layout = ExpertLayout.dense(hidden, ffn, torch.float32)
    store = ExpertStore(layout, [0, 1], num_experts)
    gen = torch.Generator().manual_seed(0)
    for layer in (0, 1):
        for e in range(num_experts):
            for t in store.views(layer, e).values():
                t.copy_(torch.randn(t.shape, generator=gen))
    engine = engine or CpuTransferEngine()

    def make(layer, next_layer=None):
        return OffloadedExperts(layer, num_experts, gated(nn.functional.silu), store,
                                ExpertCache(num_experts, slots, LRUPolicy()), SlotPool(store, slots, torch.device("cpu")),
                                engine, fmt=dense_format(torch.float32), next_layer=next_layer,
                                prefetch_top_n=prefetch_top_n)

    l1 = make(1)
    l0 = make(0, None if next_router is None else PrefetchTarget(l1, next_router))
    return [l0, l1], store


def test_prefetch_stats_on_a_known_sequence():
    guesses = iter([[3, 2], [0, 3], [1, 0]])  # next-layer router's favourites, one per call

    def fake_router(hidden):  # [T, H] -> [T, 4], top-2 = the next guess
        probs = torch.zeros(hidden.shape[0], 4)
        first, second = next(guesses)
        probs[:, first], probs[:, second] = 0.6, 0.3
        return probs

    (l0, l1), store = _two_layers(next_router=fake_router, prefetch_top_n=2)
    x, w = torch.randn(1, 8), torch.tensor([[0.5, 0.5]])
    # Call 1: prefetch {3, 2} into cold layer 1 (2 copies); layer 1 then routes to [2, 1]:
    # 2 was prefetched (used, a hit), 3 wasted, 1 a miss (evicts 3, the least recently used).
    l0(x, torch.tensor([[0, 1]]), w)
    assert l1.cache.stats.prefetch_issued == 2
    l1(x, torch.tensor([[2, 1]]), w)
    s = l1.cache.stats
    assert (s.hits, s.misses, s.prefetch_used, s.prefetch_wasted) == (1, 1, 1, 1)
    assert l1.cache.resident == [1, 2]
    # Call 2: guess [0, 3]; both missing -> 2 more prefetches (evicting 1 and 2); route [0, 3].
    l0(x, torch.tensor([[0, 1]]), w)
    l1(x, torch.tensor([[3, 0]]), w)
    assert (s.hits, s.misses, s.prefetch_issued, s.prefetch_used, s.prefetch_wasted) == (3, 1, 4, 3, 1)
    # Call 3: guess [1, 0]; 0 resident (no copy), 1 prefetched evicting 3; route [1, 3]: 1 used, 3 a miss.
    l0(x, torch.tensor([[0, 1]]), w)
    out = l1(x, torch.tensor([[1, 3]]), w)
    assert (s.hits, s.misses, s.prefetch_issued, s.prefetch_used, s.prefetch_wasted) == (4, 2, 5, 4, 1)
    assert s.prefetch_precision == pytest.approx(4 / 5)
    assert s.prefetch_recall == pytest.approx(4 / 6)
    assert s.bytes_copied == (5 + 2) * store.layout.nbytes
    # The output is still right.
    ref = sum(0.5 * nn.functional.linear(
        nn.functional.silu(x @ store.views(1, e)["gate_up"][:16].T) * (x @ store.views(1, e)["gate_up"][16:].T),
        store.views(1, e)["down"]) for e in (1, 3))
    torch.testing.assert_close(out, ref)


def _expert_output(store, layer, experts, x):
    return sum(0.5 * nn.functional.linear(
        nn.functional.silu(x @ store.views(layer, e)["gate_up"][:16].T) * (x @ store.views(layer, e)["gate_up"][16:].T),
        store.views(layer, e)["down"]) for e in experts)


def test_an_unused_prefetch_is_waited_for_when_a_later_call_hits_it():
    """A prefetch the next call does not use stays resident with its copy possibly in flight; a
    later call that hits it must wait for that copy (the slot's fence), not read the slot early."""
    guesses = iter([[3, 2], [0, 1]])  # prefetch_top_n=1: 3, then 0 (resident: nothing copied)

    def fake_router(hidden):
        probs = torch.zeros(hidden.shape[0], 4)
        first, second = next(guesses)
        probs[:, first], probs[:, second] = 0.6, 0.3
        return probs

    (l0, l1), store = _two_layers(slots=3, next_router=fake_router, prefetch_top_n=1, engine=_LazyEngine())
    x, w = torch.randn(1, 8), torch.tensor([[0.5, 0.5]])
    l1(x, torch.tensor([[0, 1]]), w)  # two misses, waited for: 0 and 1 resident, one slot free
    l0(x, torch.tensor([[0, 1]]), w)  # prefetches 3 into the free slot (its copy not run yet)
    torch.testing.assert_close(l1(x, torch.tensor([[0, 1]]), w), _expert_output(store, 1, (0, 1), x))
    assert l1.cache.stats.prefetch_wasted == 1 and 3 in l1.cache.resident  # 3: resident, not waited for
    l0(x, torch.tensor([[0, 1]]), w)  # guesses 0: resident, nothing copied
    out = l1(x, torch.tensor([[3, 0]]), w)  # 3 is a hit: its slot's copy must land first
    assert l1.cache.stats.hits == 4
    torch.testing.assert_close(out, _expert_output(store, 1, (3, 0), x))


def test_prefetch_never_evicts_the_experts_it_is_bringing():
    (_, l1), _ = _two_layers(slots=2)
    l1.prefetch([0, 1, 2])  # more guesses than slots: the third finds only protected slots
    assert l1.cache.resident == [0, 1] and l1.cache.stats.prefetch_issued == 2


@pytest.mark.parametrize("slots", [1, 3])
def test_hybrid_equals_copy_and_reference(tiny_fp32, slots):
    ref = AutoModelForCausalLM.from_pretrained(tiny_fp32, dtype=torch.float32, experts_implementation="eager")
    copy = offload_moe.load(tiny_fp32, device="cpu", slots_per_layer=slots, hybrid=False, progress=False)
    hybrid = offload_moe.load(tiny_fp32, device="cpu", slots_per_layer=slots, hybrid=True, progress=False)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        want = ref(ids).logits
        assert torch.equal(copy.model(ids).logits, want)
        assert torch.equal(hybrid.model(ids).logits, want)
    g = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(hybrid.generate(ids, **g), ref.generate(ids, **g))
    stats = hybrid.stats()
    assert stats["hybrid"]["same_memory"] is True
    total = stats["total"]
    assert total["cpu_computed"] > 0 and total["cpu_computed"] == total["misses"]
    # On a CPU device hybrid never copies a miss; only prefetch copies remain.
    no_prefetch = offload_moe.load(tiny_fp32, device="cpu", slots_per_layer=slots, hybrid=True,
                                   prefetch_top_n=0, progress=False)
    no_prefetch.generate(ids, **g)
    assert no_prefetch.stats()["total"]["bytes_copied"] == 0


def test_cost_model_choice():
    model = HybridCostModel(copy_seconds=4e-3, cpu=LinearTime(1e-3, 1e-3), device=LinearTime(1e-4, 1e-5))
    assert model.prefer_cpu(1)  # 2 ms on the CPU < 4.1 ms copy + device
    assert not model.prefer_cpu(8)  # 9 ms on the CPU > 4.2 ms
    assert LinearTime.fit(2.0, 9.0) == LinearTime(1.0, 1.0)


def test_record_routing_writes_the_trace_format(tiny_fp32, tmp_path):
    trace = tmp_path / "routing.jsonl"
    llm = offload_moe.load(tiny_fp32, slots_per_layer=2, record_routing=trace, progress=False)
    prompt = torch.arange(1, 6)
    llm.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    llm.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    layers, experts, top_k = 2, 8, 2
    assert len(rows) == layers * ((5 + 3) + (5 + 2))  # prefill tokens + decode calls, per layer
    first = [r for r in rows if r["problem_id"] == 0 and r["layer"] == 1]
    assert [r["token_idx"] for r in first] == list(range(8))
    assert [r["phase"] for r in first] == ["prefill"] * 5 + ["decode"] * 3
    for r in rows:
        assert len(r["experts"]) == top_k and len(r["gating_probs"]) == top_k
        assert len(r["router_probs"]) == experts and abs(sum(r["router_probs"]) - 1) < 1e-4
        assert sorted(r["router_probs"], reverse=True)[:2] == pytest.approx(
            sorted((r["router_probs"][e] for e in r["experts"]), reverse=True), abs=1e-6)
        assert (r["next_router_probs"] is None) == (r["layer"] == layers - 1)
    assert {r["problem_id"] for r in rows} == {0, 1}


def test_a_cuda_fence_waits_on_the_models_device_stream(monkeypatch):
    """The compute stream that waits for a copy is the model's device's (cuda:1 here), not the
    current device's: torch.cuda.current_stream() without a device would be cuda:0's."""
    from offload_moe.runtime import transfer

    asked, waited = [], []

    class Stream:
        def wait_event(self, event):
            waited.append(event)

    def current_stream(device=None):
        asked.append(device)
        return Stream()

    monkeypatch.setattr(transfer.torch.cuda, "current_stream", current_stream)
    fence = transfer._CudaEventFence("event", torch.device("cuda:1"))
    fence.wait()
    assert asked == [torch.device("cuda:1")] and waited == ["event"]
