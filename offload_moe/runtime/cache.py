"""Per-layer expert caches: which expert sits in which device slot, who gets evicted, and counts.

Pure bookkeeping: this module knows nothing of models or tensors. An eviction policy is a small
object with four hooks, so new policies plug in without touching the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from typing import Protocol

from offload_moe.errors import ConfigError


class EvictionPolicy(Protocol):
    """Decides which resident expert leaves when a slot is needed."""

    name: str

    def on_insert(self, expert: int) -> None: ...

    def on_access(self, expert: int) -> None: ...

    def on_evict(self, expert: int) -> None: ...

    def choose_victim(self, candidates: Collection[int]) -> int:
        """One of `candidates` (resident, evictable experts) to evict."""


class LRUPolicy:
    """Least recently used: evict the resident expert whose last use is oldest."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def on_insert(self, expert: int) -> None:
        self._order[expert] = None
        self._order.move_to_end(expert)

    def on_access(self, expert: int) -> None:
        self._order.move_to_end(expert)

    def on_evict(self, expert: int) -> None:
        del self._order[expert]

    def choose_victim(self, candidates: Collection[int]) -> int:
        for expert in self._order:
            if expert in candidates:
                return expert
        raise ValueError("no evictable expert among the candidates")



@dataclass
class CacheStats:
    """Counters of one layer's cache. A hit or miss is one expert used by one forward call.

    A miss is served by a copy into a slot or, with hybrid compute, on the CPU (`cpu_computed`).
    Prefetch: `prefetch_issued` copies started for the next call, `prefetch_used` of them were
    routed to, `prefetch_wasted` were not (precision = used / issued; recall = used / (used +
    misses), the share of would-be misses that prefetch turned into hits).
    """

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_copied: int = 0
    cpu_computed: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0

    def __add__(self, other: "CacheStats") -> "CacheStats":
        return CacheStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def hit_rate(self) -> float:
        uses = self.hits + self.misses
        return self.hits / uses if uses else 0.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_used / self.prefetch_issued if self.prefetch_issued else 0.0

    @property
    def prefetch_recall(self) -> float:
        wanted = self.prefetch_used + self.misses
        return self.prefetch_used / wanted if wanted else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hit_rate,
            "evictions": self.evictions,
            "bytes_copied": self.bytes_copied,
            "cpu_computed": self.cpu_computed,
            "prefetch_issued": self.prefetch_issued,
            "prefetch_used": self.prefetch_used,
            "prefetch_wasted": self.prefetch_wasted,
            "prefetch_precision": self.prefetch_precision,
            "prefetch_recall": self.prefetch_recall,
        }


@dataclass
class ExpertCache:
    """Slot table of one layer: `num_slots` device slots shared by `num_experts` experts."""

    num_experts: int
    num_slots: int
    policy: EvictionPolicy
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        if not 1 <= self.num_slots <= self.num_experts:
            raise ConfigError(f"num_slots={self.num_slots} must be between 1 and num_experts={self.num_experts}")
        self._slot_of: dict[int, int] = {}
        self._free = list(range(self.num_slots - 1, -1, -1))  # pop() gives slot 0 first

    def slot_of(self, expert: int) -> int | None:
        """The slot holding `expert`, or None if it is not resident."""
        return self._slot_of.get(expert)

    @property
    def resident(self) -> list[int]:
        return sorted(self._slot_of)

    def preload(self, experts: list[int]) -> list[int]:
        """Fill free slots with `experts` at load time (not counted as misses); returns their slots."""
        if len(experts) > len(self._free):
            raise ValueError(f"cannot preload {len(experts)} experts into {len(self._free)} free slots")
        slots = []
        for expert in experts:
            slots.append(self._free.pop())
            self._slot_of[expert] = slots[-1]
            self.policy.on_insert(expert)
        return slots

    def record_hit(self, expert: int) -> None:
        self.stats.hits += 1
        if self.num_slots < self.num_experts:  # a cache that never evicts has nothing to learn
            self.policy.on_access(expert)

    def admit(self, expert: int, protected: Collection[int], nbytes: int, prefetch: bool = False) -> int | None:
        """Give a slot to non-resident `expert` (counted as a miss, or as a prefetch), evicting an
        expert not in `protected` if no slot is free. Returns None, changing nothing, when every
        slot holds a protected expert."""
        if expert in self._slot_of:
            raise ValueError(f"expert {expert} is already resident")
        if self._free:
            slot = self._free.pop()
        else:
            candidates = [e for e in self._slot_of if e not in protected]
            if not candidates:
                return None
            victim = self.policy.choose_victim(candidates)
            slot = self._slot_of.pop(victim)
            self.policy.on_evict(victim)
            self.stats.evictions += 1
        self._slot_of[expert] = slot
        self.policy.on_insert(expert)
        if prefetch:
            self.stats.prefetch_issued += 1
        else:
            self.stats.misses += 1
        self.stats.bytes_copied += nbytes
        return slot

    def record_cpu_compute(self) -> None:
        """A miss served on the CPU straight from the host store (nothing copied, nothing evicted)."""
        self.stats.misses += 1
        self.stats.cpu_computed += 1
