"""Decode-speed cost model for expert offloading: seconds per token from bytes, bandwidths and routing.

One token of an MoE decoder runs its layers one after the other. Per layer the model charges:

    A  = software overhead per layer + non-expert bytes per layer / GPU bandwidth
         (attention, norms, router; lm_head and KV-cache reads are spread evenly over the layers)
    c  = expert bytes / GPU bandwidth         one routed expert computed on the GPU (a batch-1
                                               matrix-vector product reads its weights once)
    x  = expert bytes / PCIe bandwidth        one expert copied from pinned host RAM to a slot
    y  = expert bytes / CPU DRAM bandwidth    one missing expert computed on the CPU (hybrid)

A layer call has `hits` experts resident and `misses` to fetch (counts from a cache replay, or
expected values; reals are allowed). The timeline, relative to the layer's start:

- [0, A]: attention. At A the router has chosen; hits start on the GPU.
- Speculative prefetch: a fraction `prefetch_recall` of each layer's misses (not layer 0's: no
  earlier layer to guess from) was guessed and queued on the copy link at the previous layer's A,
  right behind that layer's own demand copies; those experts are ready when the link has drained
  them. Wrong guesses are not charged (the routing traces keep no hidden states to replay the
  guess), so prefetch is modeled optimistically.
- Demand misses (the rest) queue on the link at A, behind whatever is still in flight; this layer's
  next-layer prefetch queues behind them. An expert is computed as soon as it has arrived and the
  GPU is free: the GPU finishes at max(busy-until + n*c, last arrival + c).
- Hybrid: the demand misses are instead computed on the CPU (from A, in parallel with the GPU),
  when that ends the layer earlier than copying them; then they take no link time.

The layer ends when the GPU (and the CPU) are done; the next layer starts then. Seconds per token
is the sum over layers; tokens/s over a replayed trace is tokens / total seconds.

Bandwidths are data-sheet peaks (`Hardware`) times stated efficiencies (`Derating`, assumptions,
not fitted). `overhead_per_layer` stands for what no data sheet gives: framework time per layer
(Python, kernel launches, synchronisations). For the paper check it is the one fitted parameter
(`fit_overhead`); for projections it is stated with the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from offload_moe.runtime.cache import ExpertCache
from offload_moe.planning.replay import Trace, _build, _segments, num_experts_of, run_call

# PCIe data-sheet payload bandwidth per lane and direction, bytes/s: transfer rate x 128b/130b / 8.
PCIE_LANE_BYTES_PER_S = {3: 8e9 * 128 / 130 / 8, 4: 16e9 * 128 / 130 / 8, 5: 32e9 * 128 / 130 / 8}


def pcie_bandwidth(gen: int, lanes: int = 16) -> float:
    """Data-sheet PCIe bandwidth in bytes/s (gen 3 x16: 15.75 GB/s)."""
    return PCIE_LANE_BYTES_PER_S[gen] * lanes


@dataclass(frozen=True)
class Hardware:
    """Data-sheet peaks of one machine: GPU memory, host link, host DRAM (all bytes/s)."""

    name: str
    gpu_bandwidth: float
    pcie_gen: int
    pcie_lanes: int = 16
    cpu_bandwidth: float | None = None  # host DRAM, for hybrid compute
    memory: float = 0.0  # GPU memory, bytes (informational)
    source: str = ""

    @property
    def pcie_bandwidth(self) -> float:
        return pcie_bandwidth(self.pcie_gen, self.pcie_lanes)


@dataclass(frozen=True)
class Derating:
    """Fraction of a data-sheet peak that real transfers reach. Stated assumptions, not fitted:
    pinned host-to-device copies reach ~80% of the PCIe payload rate, batch-1 matrix-vector
    products ~80% of GPU memory bandwidth, a CPU matrix-vector product ~70% of DRAM bandwidth."""

    gpu: float = 0.8
    pcie: float = 0.8
    cpu: float = 0.7


DERATING = Derating()

GB = 1e9

# Data sheets (NVIDIA product pages / whitepapers; JEDEC DDR rates x 2 channels x 8 bytes).
HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    Hardware("t4", 320 * GB, 3, 16, None, 16 * GB, "NVIDIA T4 data sheet: 320 GB/s GDDR6, PCIe 3.0 x16"),
    Hardware("rtx3060", 360 * GB, 3, 16, None, 12 * GB,
             "RTX 3060 12GB: 192-bit GDDR6 15 Gbps = 360 GB/s; PCIe Gen3 host per the paper"),
    Hardware("rtx3080-mobile", 448 * GB, 4, 16, None, 16 * GB,
             "RTX 3080 Laptop 16GB: 256-bit GDDR6 14 Gbps = 448 GB/s; PCIe Gen4 per the paper"),
    Hardware("a100", 2039 * GB, 4, 16, None, 80 * GB, "A100 80GB SXM data sheet: 2039 GB/s HBM2e, PCIe 4.0 x16"),
    Hardware("rtx3090", 936 * GB, 4, 16, 51.2 * GB, 24 * GB,
             "RTX 3090: 384-bit GDDR6X 19.5 Gbps = 936 GB/s, PCIe 4.0 x16; host DDR4-3200 x2 = 51.2 GB/s"),
    Hardware("rtx4090", 1008 * GB, 4, 16, 89.6 * GB, 24 * GB,
             "RTX 4090: 384-bit GDDR6X 21 Gbps = 1008 GB/s, PCIe 4.0 x16; host DDR5-5600 x2 = 89.6 GB/s"),
    Hardware("rtx4080", 716.8 * GB, 4, 16, 89.6 * GB, 16 * GB,
             "RTX 4080 16GB: 256-bit GDDR6X 22.4 Gbps = 716.8 GB/s, PCIe 4.0 x16; host DDR5-5600 x2"),
    Hardware("rtx4060ti-16gb", 288 * GB, 4, 8, 89.6 * GB, 16 * GB,
             "RTX 4060 Ti 16GB: 128-bit GDDR6 18 Gbps = 288 GB/s, PCIe 4.0 x8 (!); host DDR5-5600 x2"),
)}


@dataclass(frozen=True)
class Workload:
    """What one decode token moves: per-layer bytes of the model as deployed."""

    layers: int
    expert_bytes: int  # one expert as stored, copied and read by the kernel
    nonexpert_bytes: int  # bytes the GPU reads per token outside the experts (incl. lm_head, KV)


@dataclass(frozen=True)
class Costs:
    """Seconds per unit of work on one machine (see the module docstring for A, c, x, y)."""

    attention: float  # A, overhead included
    expert_gpu: float  # c
    copy: float  # x
    expert_cpu: float | None = None  # y; None: no hybrid compute

    @classmethod
    def from_bandwidths(cls, wl: Workload, gpu: float, pcie: float, cpu: float | None = None,
                        overhead_per_layer: float = 0.0) -> Costs:
        """Costs from effective (already derated) bandwidths in bytes/s; `cpu=None`: no hybrid."""
        return cls(
            attention=overhead_per_layer + wl.nonexpert_bytes / wl.layers / gpu,
            expert_gpu=wl.expert_bytes / gpu,
            copy=wl.expert_bytes / pcie,
            expert_cpu=wl.expert_bytes / cpu if cpu else None,
        )

    @classmethod
    def of(cls, hw: Hardware, wl: Workload, overhead_per_layer: float = 0.0, hybrid: bool = False,
           derating: Derating = DERATING) -> Costs:
        """Costs on `hw`: its data-sheet peaks times `derating`; `hybrid` needs its DRAM bandwidth."""
        if hybrid and hw.cpu_bandwidth is None:
            raise ValueError(f"{hw.name}: hybrid compute needs a host DRAM bandwidth")
        cpu = hw.cpu_bandwidth * derating.cpu if hybrid and hw.cpu_bandwidth else None
        return cls.from_bandwidths(wl, hw.gpu_bandwidth * derating.gpu, hw.pcie_bandwidth * derating.pcie, cpu,
                                   overhead_per_layer)


@dataclass(frozen=True)
class LayerCall:
    """One layer of one token: routed experts already resident (hits) and to fetch (misses)."""

    hits: float
    misses: float


def token_time(calls: Sequence[LayerCall], costs: Costs, prefetch_recall: float = 0.0) -> float:
    """Seconds for one token whose layers make `calls`, in order (see the module docstring)."""
    if not 0.0 <= prefetch_recall <= 1.0:
        raise ValueError(f"prefetch_recall={prefetch_recall} must be in [0, 1]")
    a, c, x, y = costs.attention, costs.expert_gpu, costs.copy, costs.expert_cpu
    total = 0.0
    link_free = 0.0  # when the copy link has drained its queue, relative to this layer's start
    for i, call in enumerate(calls):
        prefetched = prefetch_recall * call.misses if i > 0 else 0.0
        demand = call.misses - prefetched
        next_prefetch = prefetch_recall * calls[i + 1].misses if i + 1 < len(calls) else 0.0
        gpu = a + call.hits * c
        if prefetched > 0:  # queued last in the previous layer, so ready when the link drained
            gpu = max(gpu + prefetched * c, link_free + min(prefetched, 1.0) * c)
        link_start = max(a, link_free)
        arrived = link_start + demand * x
        end = max(gpu + demand * c, arrived + min(demand, 1.0) * c) if demand > 0 else gpu
        link_end = arrived + next_prefetch * x
        if y is not None and demand > 0:
            end_cpu = max(gpu, a + demand * y)
            if end_cpu < end:
                end, link_end = end_cpu, link_start + next_prefetch * x
        total += end
        link_free = link_end - end
    return total


def tokens_per_s(tokens: Iterable[Sequence[LayerCall]], costs: Costs, prefetch_recall: float = 0.0) -> float:
    """Tokens / total modeled seconds over `tokens` (each a sequence of layer calls)."""
    count, seconds = 0, 0.0
    for calls in tokens:
        count += 1
        seconds += token_time(calls, costs, prefetch_recall)
    if count == 0:
        raise ValueError("no tokens to model")
    return count / seconds


def expected_token(layers: int, experts_per_token: int, hit_rate: float) -> list[LayerCall]:
    """A token whose every layer has the expected hits and misses at `hit_rate` (the planner's
    input when no trace is replayed)."""
    return [LayerCall(experts_per_token * hit_rate, experts_per_token * (1.0 - hit_rate))] * layers


# ---------------------------------------------------------------------------------------------
# Layer calls from replayed routing

PolicyFactory = Callable[..., object]


def replay_calls(trace: Trace, policy: PolicyFactory | str | None, slots: int,
                 num_experts: int | None = None) -> list[list[LayerCall]]:
    """Per token (problem by problem, in order), its layers' hits and misses when the trace is
    replayed through per-layer caches exactly as `replay.replay` does (cold caches per problem).

    `policy=None` means no cache at all: every routed expert is a miss (the paper's
    "w/o LRU cache" row). Tokens missing a layer in the trace are skipped."""
    num_experts = num_experts if num_experts is not None else num_experts_of(trace)
    per_layer: dict[int, dict[tuple[int, int], LayerCall]] = {}
    for layer, steps in sorted(trace.items()):
        calls: dict[tuple[int, int], LayerCall] = {}
        if policy is None:
            for step in steps:
                calls[(step.problem_id, step.token_idx)] = LayerCall(0, len(set(step.experts)))
        else:
            for segment in _segments(steps, True):
                cache = ExpertCache(num_experts, slots, _build(policy, segment))
                for step in segment:
                    hits, misses = cache.stats.hits, cache.stats.misses
                    run_call(cache, step)
                    calls[(step.problem_id, step.token_idx)] = LayerCall(
                        cache.stats.hits - hits, cache.stats.misses - misses)
        per_layer[layer] = calls
    layers = sorted(per_layer)
    keys = sorted(set.intersection(*(set(calls) for calls in per_layer.values()))) if layers else []
    return [[per_layer[layer][key] for layer in layers] for key in keys]


def hit_rate(tokens: Iterable[Sequence[LayerCall]]) -> float:
    hits = misses = 0.0
    for calls in tokens:
        for call in calls:
            hits += call.hits
            misses += call.misses
    return hits / (hits + misses) if hits + misses else math.nan


def fit_overhead(cases: Sequence[tuple[Callable[[float], float], float]], hi: float = 0.1) -> float:
    """The one overhead per layer (seconds, in [0, hi]) minimising the summed squared log error of
    `cases`: (overhead -> modeled tok/s, published tok/s). Golden-section search; the objective is
    unimodal here because every modeled speed falls monotonically with the overhead."""

    def loss(o: float) -> float:
        return sum(math.log(model(o) / published) ** 2 for model, published in cases)

    lo, hi_ = 0.0, hi
    g = (math.sqrt(5) - 1) / 2
    a, b = hi_ - g * (hi_ - lo), lo + g * (hi_ - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(80):
        if fa < fb:
            hi_, b, fb = b, a, fa
            a = hi_ - g * (hi_ - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi_ - lo)
            fb = loss(b)
    return (lo + hi_) / 2
