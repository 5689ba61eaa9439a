"""Eviction policies beyond LRU, the policy registry, and the optional routing hook.

Every policy implements `cache.EvictionPolicy` (on_insert, on_access, on_evict, choose_victim) and
is built with no arguments by `make_policy(name)`, one instance per layer. A policy may also
define the optional routing hook

    observe(routed: Mapping[int, float], router_probs: Mapping[int, float] | None = None) -> None

which the runtime (and `replay`) calls once per forward call of the layer, before any hit or miss
of that call is recorded (use `observe_routing`, which skips policies without the hook):

- `routed`: every expert the call routes to -> its routing weight summed over the call's tokens
  (the top-k weights the experts module gets; for one decode token these are the trace's
  `gating_probs`). Keys are exactly the experts the call needs.
- `router_probs`: optional, the router's softmax probability of every expert of the layer summed
  over the call's tokens, when the runtime has it; None otherwise (the traces only keep top-k).

The hook is also the policies' clock: one call = one step. A policy whose hook is never called
still works, counting each use (on_access/on_insert) as one step of one expert.

Policies: "lru" (cache.LRUPolicy), "lru2" (LRU-K with K=2), "arc" (adaptive replacement),
"lfu-decay" (decayed use counts), "markov" (the default candidate: an online-learned, gate-weighted
expert-to-expert transition model on top of decayed frequency). `BeladyPolicy`, the offline
optimum, needs the future and is for replays only, so it is not registered.
"""

from __future__ import annotations

import functools

import bisect
import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence

from offload_moe.runtime.cache import EvictionPolicy, LRUPolicy
from offload_moe.errors import ConfigError

__all__ = [
    "ARCPolicy",
    "BeladyPolicy",
    "DEFAULT_POLICY",
    "DecayedFrequencyPolicy",
    "LRU2Policy",
    "LRUPolicy",
    "MarkovPolicy",
    "POLICIES",
    "make_policy",
    "observe_routing",
]


def observe_routing(
    policy: EvictionPolicy, routed: Mapping[int, float], router_probs: Mapping[int, float] | None = None
) -> None:
    """Feed one forward call's routing to `policy` if it has the optional `observe` hook."""
    hook = getattr(policy, "observe", None)
    if hook is not None:
        hook(routed, router_probs)


class _DecayClock:
    """Exponential decay done lazily: values are stored multiplied by `scale` = decay**-step, so
    a step costs nothing; stored / scale is the decayed value. Rescales before overflow."""

    _RESCALE_AT = 1e100

    def __init__(self, decay: float):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay={decay} must be in (0, 1]")
        self.growth = 1.0 / decay
        self.scale = 1.0

    def tick(self, stores: Sequence[dict[int, float]]) -> None:
        self.scale *= self.growth
        if self.scale > self._RESCALE_AT:
            for store in stores:
                for key in store:
                    store[key] /= self.scale
            self.scale = 1.0


class _Stepped:
    """Shared clock logic: a step is one observed forward call, or one use when unobserved."""

    def __init__(self) -> None:
        self.step = 0
        self._observed = False  # has observe() ever been called?
        self.last_use: dict[int, int] = {}

    def _begin_step(self, routed: Mapping[int, float]) -> None:  # overridden
        self.step += 1

    def observe(self, routed: Mapping[int, float], router_probs: Mapping[int, float] | None = None) -> None:
        self._start_observing()
        self._begin_step(routed)

    def _start_observing(self) -> None:
        """At the first observe(): forget what was learned from bare uses (e.g. the runtime's
        warm-start preload), so a hooked policy learns from routing only."""
        if not self._observed:
            self._observed = True
            self._forget()

    def _forget(self) -> None:  # overridden
        pass

    def _use(self, expert: int) -> None:
        if not self._observed:  # no hook calls: each use is a call of one expert
            self._begin_step({expert: 1.0})
        self.last_use[expert] = self.step

    def on_insert(self, expert: int) -> None:
        self._use(expert)

    def on_access(self, expert: int) -> None:
        self._use(expert)

    def on_evict(self, expert: int) -> None:
        pass  # history is kept: it is what frequency-aware policies learn from


class DecayedFrequencyPolicy(_Stepped):
    """Evict the resident expert with the lowest decayed use count (x`decay` per step, +1 per
    step that routes to it; counts survive eviction); ties go to the least recently used. With
    decay 0.95 this is the "decayed frequency" column of the traces README."""

    name = "lfu-decay"

    def __init__(self, decay: float = 0.95):
        super().__init__()
        self._clock = _DecayClock(decay)
        self._count: dict[int, float] = defaultdict(float)  # stored scaled by the clock

    def _forget(self) -> None:
        self._count.clear()

    def _begin_step(self, routed: Mapping[int, float]) -> None:
        super()._begin_step(routed)
        self._clock.tick([self._count])
        for expert in routed:  # counts come from routing, so prefetch insertions do not count
            self._count[expert] += self._clock.scale

    def choose_victim(self, candidates: Collection[int]) -> int:
        if not candidates:
            raise ValueError("no evictable expert among the candidates")
        return min(candidates, key=lambda e: (self._count[e], self.last_use.get(e, -1), e))


class MarkovPolicy(_Stepped):
    """Evict the resident expert least likely to be routed at the next call, as predicted from
    the experts routed now.

    Online, per layer, with exponential forgetting (`decay` per step):
    - `rate[e]`: decayed fraction of calls that routed e (the prior, "decayed frequency");
    - `trans[a][e]`: how often e was routed at the call right after a call that routed a, each
      context expert weighted by its share of the routing weight (gate probability).
    The score of e is sum_a w_a * (trans[a][e] + prior * rate[e]) / (seen[a] + prior) over this
    call's routed experts a with normalized weights w_a: a transition estimate shrunk towards
    the frequency prior by `prior` pseudo-calls. Lowest score is evicted; ties by recency.

    Scores need this call's routing, so the runtime should call `observe` (see module doc); an
    unobserved policy treats each use as a one-expert call and still learns transitions.
    With `use_router_probs=True` and `router_probs` given, the context weights are the router's
    full softmax instead of the routed weights (untested on real traces: they keep only top-2).
    """

    name = "markov"

    def __init__(self, decay: float = 0.95, prior: float = 4.0, use_router_probs: bool = False):
        super().__init__()
        if prior <= 0:
            raise ValueError(f"prior={prior} must be > 0")
        self.prior = prior
        self.use_router_probs = use_router_probs
        self.name = "markov-router" if use_router_probs else "markov"
        self._clock = _DecayClock(decay)
        self._used: dict[int, float] = defaultdict(float)  # decayed count of calls routing e
        self._calls: dict[int, float] = {0: 0.0}  # decayed count of calls (one key)
        self._trans: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self._seen: dict[int, float] = defaultdict(float)  # decayed context weight of a with a successor
        self._context: dict[int, float] = {}  # this call's normalized context weights

    def _forget(self) -> None:
        for store in (self._used, self._trans, self._seen):
            store.clear()
        self._calls[0] = 0.0
        self._context = {}

    def observe(self, routed: Mapping[int, float], router_probs: Mapping[int, float] | None = None) -> None:
        self._start_observing()
        context = router_probs if self.use_router_probs and router_probs is not None else routed
        self._begin_step(routed, context)

    def _begin_step(self, routed: Mapping[int, float], context: Mapping[int, float] | None = None) -> None:
        super()._begin_step(routed)
        self._clock.tick([self._used, self._calls, self._seen, *self._trans.values()])
        inc = self._clock.scale
        for a, w in self._context.items():  # learn: previous call's context -> this call's experts
            self._seen[a] += w * inc
            row = self._trans[a]
            for e in routed:
                row[e] += w * inc
        for e in routed:
            self._used[e] += inc
        self._calls[0] += inc
        self._context = _normalized(routed if context is None else context)

    def probability(self, expert: int) -> float:
        """Predicted probability that the next call routes to `expert`."""
        calls = self._calls[0]
        rate = self._used[expert] / calls if calls > 0 else 0.0
        if not self._context:
            return rate
        scale = self._clock.scale
        total = 0.0
        for a, w in self._context.items():
            row = self._trans.get(a)
            hits = row.get(expert, 0.0) / scale if row is not None else 0.0
            total += w * (hits + self.prior * rate) / (self._seen.get(a, 0.0) / scale + self.prior)
        return total

    def choose_victim(self, candidates: Collection[int]) -> int:
        if not candidates:
            raise ValueError("no evictable expert among the candidates")
        return min(candidates, key=lambda e: (self.probability(e), self.last_use.get(e, -1), e))


def _normalized(weights: Mapping[int, float]) -> dict[int, float]:
    """Weights scaled to sum to 1 (uniform if they are all zero, negative or not finite)."""
    clean = {e: float(w) for e, w in weights.items() if math.isfinite(w) and w > 0}
    total = sum(clean.values())
    if total <= 0:
        return {e: 1.0 / len(weights) for e in weights} if weights else {}
    return {e: w / total for e, w in clean.items()}


class LRU2Policy:
    """LRU-K with K=2: evict the expert whose second most recent use is oldest (experts used
    only once go first, least recently used first). Use history survives eviction."""

    name = "lru2"

    def __init__(self) -> None:
        self._clock = 0
        self._uses: dict[int, tuple[int, int]] = {}  # expert -> (last use, previous use or -1)

    def _use(self, expert: int) -> None:
        self._clock += 1
        last, _ = self._uses.get(expert, (-1, -1))
        self._uses[expert] = (self._clock, last)

    def on_insert(self, expert: int) -> None:
        self._use(expert)

    def on_access(self, expert: int) -> None:
        self._use(expert)

    def on_evict(self, expert: int) -> None:
        pass

    def choose_victim(self, candidates: Collection[int]) -> int:
        if not candidates:
            raise ValueError("no evictable expert among the candidates")
        return min(candidates, key=lambda e: (self._uses[e][1], self._uses[e][0], e))


class ARCPolicy:
    """Adaptive Replacement Cache (Megiddo & Modha) on the slot protocol.

    T1 holds experts used once since they were admitted, T2 those used again; B1/B2 remember
    experts recently evicted from each. A re-admission found in B1 grows the target size `p` of
    T1, one found in B2 shrinks it. The victim is T1's least recently used candidate while T1 is
    over target (or T2 has no candidate), else T2's. The cache size is learned as the most
    experts ever resident at once."""

    name = "arc"

    def __init__(self) -> None:
        self.t1: OrderedDict[int, None] = OrderedDict()  # least recent first
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()
        self.p = 0.0
        self.capacity = 0

    def on_insert(self, expert: int) -> None:
        if expert in self.b1:
            self.p = min(float(self.capacity), self.p + max(1.0, len(self.b2) / len(self.b1)))
            del self.b1[expert]
            self.t2[expert] = None
        elif expert in self.b2:
            self.p = max(0.0, self.p - max(1.0, len(self.b1) / len(self.b2)))
            del self.b2[expert]
            self.t2[expert] = None
        else:
            self.t1[expert] = None
        self.capacity = max(self.capacity, len(self.t1) + len(self.t2))

    def on_access(self, expert: int) -> None:
        self.t1.pop(expert, None)
        self.t2.pop(expert, None)
        self.t2[expert] = None

    def on_evict(self, expert: int) -> None:
        if expert in self.t1:
            del self.t1[expert]
            self.b1[expert] = None
        else:
            del self.t2[expert]
            self.b2[expert] = None
        for ghosts in (self.b1, self.b2):
            while len(ghosts) > max(self.capacity, 1):
                ghosts.popitem(last=False)

    def choose_victim(self, candidates: Collection[int]) -> int:
        in_t1 = [e for e in self.t1 if e in candidates]
        in_t2 = [e for e in self.t2 if e in candidates]
        if in_t1 and (len(self.t1) > self.p or not in_t2):
            return in_t1[0]
        if in_t2:
            return in_t2[0]
        raise ValueError("no evictable expert among the candidates")


class BeladyPolicy(_Stepped):
    """Belady's offline optimum: evict the candidate whose next use is farthest in the future
    (never used again counts as farthest; ties go to the lowest expert id).

    `future` is the layer's whole sequence of calls (each a collection of routed experts) that
    the cache will see. The policy must be told when each call starts through `observe`, which
    `replay` does; call k of `future` is the k-th observed call."""

    name = "belady"
    needs_future = True  # replay builds it with the future sequence of calls

    def __init__(self, future: Sequence[Collection[int]]):
        super().__init__()
        self._observed = True  # the position advances only on observe()
        self._uses: dict[int, list[int]] = defaultdict(list)  # expert -> ascending call indices
        for index, experts in enumerate(future):
            for e in set(experts):
                self._uses[e].append(index)

    def next_use(self, expert: int) -> float:
        """Index of the next call after the current one that routes to `expert` (inf if none)."""
        uses = self._uses.get(expert, [])
        i = bisect.bisect_right(uses, self.step - 1)  # current call is index step - 1
        return uses[i] if i < len(uses) else math.inf

    def choose_victim(self, candidates: Collection[int]) -> int:
        if not candidates:
            raise ValueError("no evictable expert among the candidates")
        return max(candidates, key=lambda e: (self.next_use(e), -e))


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lru2": LRU2Policy,
    "arc": ARCPolicy,
    "lfu-decay": DecayedFrequencyPolicy,
    "markov": MarkovPolicy,
    # Context from the router's full distribution instead of the routed top-k weights.
    "markov-router": functools.partial(MarkovPolicy, use_router_probs=True),
}

DEFAULT_POLICY = "markov"  # what load(), OffloadConfig and the CLI use unless told otherwise


def make_policy(name: str) -> EvictionPolicy:
    """A fresh instance of the registered policy `name` (one per layer)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ConfigError(f"policy={name!r} is unknown; choose one of {sorted(POLICIES)}") from None
    return factory()
