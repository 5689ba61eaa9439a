"""The cache protocol of one forward call of one MoE layer, written once and without tensors.

`call_schedule` decides, for the experts a call needs (ascending ids), which are hits, which are
copied into which slot and when, and which run on the CPU; it yields the steps in the order the
layer must carry them out. `OffloadedExperts.forward` drives it with tensors (copies, fences,
matmuls); `planning.replay` drives it with nothing, so replayed hit rates are the runtime's by
construction. The protocol:

1. the hits (resident experts, prefetched ones included) are computed first, ascending;
2. the misses are admitted ascending, each as soon as a slot holds no expert the call still has
   to compute (those are protected from eviction), and copied in; after every computed expert
   the admission is retried, so copies overlap compute;
3. misses the hybrid cost model sends to the CPU are computed straight from the host store after
   the hits (nothing copied, nothing evicted);
4. copied experts are computed in ascending order as their copies land.

The layer combines the outputs in ascending expert order whatever order they were computed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

from offload_moe.runtime.cache import CacheStats, ExpertCache


@dataclass(frozen=True)
class CopyIn:
    """Start copying these experts into their slots now, in this order: ((expert, slot), ...)."""

    placed: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Compute:
    """Compute `expert` now: from `slot`, or on the CPU from the host store when `slot` is None.
    `copied`: its copy was started by this call (wait for that copy first)."""

    expert: int
    slot: int | None
    copied: bool = False


def wants_routing(cache: ExpertCache) -> bool:
    """Whether the call's routing weights should be shown to the policy (its `observe` hook)
    before the call: only policies that have one, and only when something can be evicted."""
    return hasattr(cache.policy, "observe") and cache.num_slots < cache.num_experts


def call_schedule(
    cache: ExpertCache,
    needed: Sequence[int],  # the call's experts, distinct, ascending
    nbytes: int,  # bytes one expert's copy moves (for the counters)
    on_cpu: Callable[[int], bool] | None = None,  # hybrid: compute this missing expert on the CPU?
) -> Iterator[CopyIn | Compute]:
    """The steps of one call (see the module docstring); updates `cache` as it goes."""
    slots = resident_slots(cache, needed)
    if slots is not None:  # hits only (the CPU's usual call): one Compute each, ascending
        yield from (Compute(expert, slot) for expert, slot in zip(needed, slots))
        return
    hits = [e for e in needed if cache.slot_of(e) is not None]
    for expert in hits:
        cache.record_hit(expert)
    missing = [e for e in needed if cache.slot_of(e) is None]
    cpu = [e for e in missing if on_cpu is not None and on_cpu(e)]
    pending = deque(e for e in missing if e not in cpu)
    protected = set(needed)  # experts this call still has to compute: never evicted
    in_flight: dict[int, int] = {}  # expert -> slot, copy started

    def copies() -> Iterator[CopyIn]:
        placed = []
        while pending:
            slot = cache.admit(pending[0], protected, nbytes)
            if slot is None:
                break  # every slot holds an expert still needed; retry after the next compute
            placed.append((pending.popleft(), slot))
        in_flight.update(placed)
        if placed:
            yield CopyIn(tuple(placed))

    yield from copies()  # a miss waits (a call of hits only returned above)
    for expert in hits:
        yield Compute(expert, cache.slot_of(expert))
        protected.discard(expert)
        if pending:
            yield from copies()
    for expert in cpu:
        cache.record_cpu_compute()
        yield Compute(expert, None)
        protected.discard(expert)
        if pending:
            yield from copies()
    while in_flight or pending:
        yield from copies()
        expert = next(e for e in needed if e in in_flight)  # ascending
        yield Compute(expert, in_flight.pop(expert), copied=True)
        protected.discard(expert)


def resident_slots(cache: ExpertCache, needed: Sequence[int]) -> list[int] | None:
    """When every one of `needed` is resident: their slots, each recorded as a hit (step 1 of the
    protocol is then the whole call: what call_schedule yields for it, without the steps). Else
    None, recording nothing."""
    slots = [cache.slot_of(e) for e in needed]
    if None in slots:
        return None
    for expert in needed:
        cache.record_hit(expert)
    return slots


def prefetch_schedule(cache: ExpertCache, experts: Sequence[int], nbytes: int) -> list[tuple[int, int]]:
    """Admit the likely next `experts` (most likely first) that are not resident, as prefetches:
    one never evicts another of them. Returns [(expert, slot)] to copy now."""
    protected = set(experts)
    placed = []
    for expert in experts:
        if cache.slot_of(expert) is not None:
            continue
        slot = cache.admit(expert, protected, nbytes, prefetch=True)
        if slot is not None:
            placed.append((expert, slot))
    return placed


def settle_prefetches(stats: CacheStats, prefetched: Iterable[int], needed: Collection[int]) -> list[int]:
    """Count the previous layer's prefetches into this one as used or wasted by this call;
    returns the used ones."""
    used = []
    for expert in prefetched:
        if expert in needed:
            stats.prefetch_used += 1
            used.append(expert)
        else:
            stats.prefetch_wasted += 1
    return used
