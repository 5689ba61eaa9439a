"""The decode-speed cost model: hand-computed timelines, data-sheet arithmetic, the paper's bytes,
replayed hit/miss sequences, the check against Eliseev & Mazur 2023, and the planner using it."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload_moe.planning import paper_settings as paper
from offload_moe.planning import perfmodel as pm
from offload_moe.planning.planner import GPUS, PCIE
from offload_moe.planning.replay import Step, load_trace

REAL_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mixtral-8x7b-instruct-humaneval.jsonl"
GiB = 2**30

# attention 1 s, GPU expert 0.5 s, copy 2 s; three layers: 2 hits, 1 hit + 1 miss, 2 misses
COSTS = pm.Costs(attention=1.0, expert_gpu=0.5, copy=2.0)
TOKEN = [pm.LayerCall(2, 0), pm.LayerCall(1, 1), pm.LayerCall(0, 2)]


def test_token_time_demand_copies_by_hand():
    # L0: 1 + 2*0.5 = 2.  L1: copy 1..3, computed 3..3.5 (hit done at 2) -> 3.5.
    # L2: copies 1..5, last computed 5..5.5 -> 5.5.  Total 11.
    assert pm.token_time(TOKEN, COSTS) == pytest.approx(11.0)
    assert pm.tokens_per_s([TOKEN, TOKEN], COSTS) == pytest.approx(2 / 22)


def test_token_time_prefetch_by_hand():
    # L0 ends at 2; at its A=1 it queues L1's one expert: on the link 1..3 -> 1 s into L1.
    # L1: hit 1..1.5, prefetched expert 1.5..2 -> ends 2; at its A=1 it queues L2's two: 1..5 -> 3 s into L2.
    # L2: both arrive at 3, computed 3..3.5 (the last one computed after it arrives) -> 3.5.  Total 7.5.
    assert pm.token_time(TOKEN, COSTS, prefetch_recall=1.0) == pytest.approx(7.5)
    # Half of each miss prefetched. L0 ends at 2, queues 0.5 expert for L1 on the link 1..2.
    # L1: hit 1..1.5, half expert 1.5..1.75; its demand half copies 1..2, computed 2..2.25 -> 2.25;
    #     it queues 1 expert for L2 behind: 2..4 -> 1.75 s into L2.
    # L2: prefetched expert computed 1.75..2.25; demand expert copies 1.75..3.75, computed -> 4.25.
    assert pm.token_time(TOKEN, COSTS, prefetch_recall=0.5) == pytest.approx(2 + 2.25 + 4.25)


def test_token_time_hybrid_by_hand():
    hybrid = pm.Costs(attention=1.0, expert_gpu=0.5, copy=2.0, expert_cpu=0.75)
    # L1: CPU 1..1.75 beats copying (3.5); L2: CPU 1..2.5 beats 5.5.  Total 2 + 1.75 + 2.5.
    assert pm.token_time(TOKEN, hybrid) == pytest.approx(6.25)
    slow_cpu = pm.Costs(attention=1.0, expert_gpu=0.5, copy=2.0, expert_cpu=10.0)
    assert pm.token_time(TOKEN, slow_cpu) == pytest.approx(11.0)  # copying wins, as without a CPU


def test_link_is_shared_between_demand_and_prefetch():
    # L0 misses one expert (copy 1..3, done 3.5) and queues L1's prefetch behind it: 3..5 -> 1.5 s into L1.
    # L1: prefetched expert computed 1.5..2.  Total 3.5 + 2.
    calls = [pm.LayerCall(0, 1), pm.LayerCall(0, 1)]
    assert pm.token_time(calls, COSTS, prefetch_recall=1.0) == pytest.approx(5.5)


def test_costs_from_data_sheets():
    assert pm.pcie_bandwidth(3) == pytest.approx(15.753846e9, rel=1e-6)  # 8 GT/s x 128/130 x 16 / 8
    assert pm.pcie_bandwidth(4, 8) == pytest.approx(15.753846e9, rel=1e-6)
    hw = pm.Hardware("x", gpu_bandwidth=100e9, pcie_gen=4, cpu_bandwidth=50e9)
    wl = pm.Workload(layers=2, expert_bytes=10**9, nonexpert_bytes=4 * 10**9)
    c = pm.Costs.of(hw, wl, overhead_per_layer=0.01, hybrid=True)
    assert c.attention == pytest.approx(0.01 + 2e9 / 80e9)  # GPU derated to 80%
    assert c.expert_gpu == pytest.approx(1e9 / 80e9)
    assert c.copy == pytest.approx(1e9 / (31.507692e9 * 0.8))  # PCIe 4.0 x16 derated to 80%
    assert c.expert_cpu == pytest.approx(1e9 / 35e9)  # DRAM derated to 70%
    assert pm.Costs.of(hw, wl).expert_cpu is None
    with pytest.raises(ValueError, match="DRAM"):
        pm.Costs.of(pm.HARDWARE["t4"], wl, hybrid=True)


def test_paper_bytes():
    # 2-bit codes, 8-bit scales and zeros per 16 weights, fp16 meta per 128 scales, 4 bytes per matrix
    n = 14336 * 4096
    assert paper.hqq_matrix_bytes(14336, 4096, 2, 16, 128) == n // 4 + n // 16 + n // 16 // 128 * 4 + n // 16 + 4
    assert paper.expert_bytes() == 3 * 22_134_788 == 66_404_364
    # attention at 4-bit, group 64, scales in groups of 256: q, o 4096x4096; k, v 1024x4096
    q, k = 4096 * 4096, 1024 * 4096
    per = [w // 2 + w // 64 + w // 64 // 256 * 4 + w // 64 + 4 for w in (q, q, k, k)]
    assert paper.attention_bytes_per_layer() == sum(per) == 22_292_496


def test_replay_calls_per_token():
    trace = {
        0: [Step((0, 1), (0.6, 0.4), 0, 0), Step((0, 2), (0.5, 0.5), 0, 1), Step((1, 2), (0.5, 0.5), 0, 2)],
        1: [Step((3, 4), (0.5, 0.5), 0, 0), Step((3, 4), (0.5, 0.5), 0, 1)],  # token 2 lacks layer 1
    }
    calls = pm.replay_calls(trace, "lru", 2, num_experts=8)
    # layer 0, 2 LRU slots: {0,1} cold; 0 hits, 2 misses (1 evicted); then 2 hits, 1 misses
    assert calls == [[pm.LayerCall(0, 2), pm.LayerCall(0, 2)], [pm.LayerCall(1, 1), pm.LayerCall(2, 0)]]
    assert pm.replay_calls(trace, None, 0, num_experts=8) == [[pm.LayerCall(0, 2)] * 2] * 2
    assert pm.hit_rate(calls) == pytest.approx(3 / 8)


def test_expected_token_and_planner_use_the_same_model(mixtral_plan):
    plan = mixtral_plan
    kw = {"prefetch_recall": 0.85, "overhead_per_layer": 0.002}
    wl = pm.Workload(plan.moe_layers, plan.expert_bytes, plan.non_expert_bytes)
    for pcie, gpu, cpu in [(PCIE["pcie4"], GPUS["rtx4090"], None), (PCIE["pcie3"], GPUS["rtx3090"], 60e9)]:
        costs = pm.Costs.from_bandwidths(wl, gpu, pcie, cpu, kw["overhead_per_layer"])
        expected = pm.tokens_per_s([pm.expected_token(32, 2, plan.hit_rate)], costs, kw["prefetch_recall"])
        assert plan.tokens_per_s(pcie, gpu, cpu, **kw) == expected
    # the planner's named bandwidths are the data sheets derated: same as Costs.of on the hardware
    on_4090 = pm.Costs.of(pm.HARDWARE["rtx4090"], wl)
    assert plan.tokens_per_s(PCIE["pcie4"], GPUS["rtx4090"]) == pytest.approx(
        pm.tokens_per_s([pm.expected_token(32, 2, plan.hit_rate)], on_4090))
    # by hand, no prefetch, no overhead: each layer A + max(2c, m (x + c)) with m expected misses
    a = plan.non_expert_bytes / 32 / GPUS["rtx4090"]
    c, x = plan.expert_bytes / GPUS["rtx4090"], plan.expert_bytes / PCIE["pcie4"]
    m = 2 * (1 - plan.hit_rate)
    assert plan.tokens_per_s(PCIE["pcie4"], GPUS["rtx4090"]) == pytest.approx(1 / (32 * (a + max(2 * c, m * (x + c)))))


@pytest.fixture
def mixtral_plan():
    from transformers import MixtralConfig

    from offload_moe.planning.planner import plan_model

    config = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                           num_experts_per_tok=2, tie_word_embeddings=False)
    return plan_model(config, "hqq4", 24 * GiB, 64 * GiB, 4096)


@pytest.fixture(scope="module")
def paper_calls():
    if not REAL_TRACE.is_file():
        pytest.skip(f"{REAL_TRACE} not found")
    return paper.lru_calls(load_trace(REAL_TRACE))


def test_paper_settings_within_30_percent(paper_calls):
    """Replaying the real routing through the model at the paper's settings lands within 30% of
    its published full-algorithm speed on each of the four GPUs (one fitted global overhead)."""
    assert pm.hit_rate(paper_calls[4]) == pytest.approx(0.620, abs=5e-4)  # LRU, 4 slots (traces README 0.621)
    assert pm.hit_rate(paper_calls[2]) == pytest.approx(0.395, abs=5e-4)
    rows = paper.check(paper_calls)
    assert [r.setup.hardware for r in rows] == ["t4", "rtx3060", "rtx3080-mobile", "a100"]
    assert [r.setup.full for r in rows] == [2.092, 2.278, 2.655, 3.061]
    for r in rows:
        assert abs(r.error) < 0.30, (r.setup.label, r.full, r.setup.full)
        assert r.no_cache < r.no_prefetch < r.full  # the cache helps, prefetch helps more
    assert paper.fit(paper_calls) == pytest.approx(paper.FITTED_OVERHEAD_PER_LAYER, rel=1e-4)
