"""OffloadedExperts: the module that replaces a transformers MoE layer's `experts`.

It keeps the experts contract of transformers 5.x, `forward(hidden_states [T, H],
top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`, so the model's router, attention and
generate() run unchanged. One call:

1. resident experts (hits, including those a prefetch brought in) are computed first, while
2. missing experts are copied into slots by the transfer engine, as many ahead as there are
   slots not holding an expert this call still needs, or, with hybrid compute, computed on the
   CPU straight from the host store when the cost model says that is cheaper;
3. the next MoE layer's router is applied to this call's input and its likely experts are
   prefetched into the next layer's slots, overlapping this layer's compute;
4. outputs are combined in ascending expert order, as transformers' eager implementation does,
   so results are exact whatever order the cache makes experts ready in.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from offload_moe.runtime.cache import ExpertCache
from offload_moe.runtime.hybrid import HybridCostModel
from offload_moe.model.arch import ExpertsKind
from offload_moe.runtime.expert_compute import GateFn, expert_forward
from offload_moe.runtime.policies import observe_routing
from offload_moe.runtime.routing_recorder import RoutingRecorder
from offload_moe.quant.quantize import QuantFormat
from offload_moe.runtime.store import ExpertStore
from offload_moe.runtime.transfer import BATCH_BYTES, DONE, Fence, TransferEngine

RouterProbs = Callable[[torch.Tensor], torch.Tensor]  # hidden [T, H] -> probabilities [T, E]


@dataclass
class PrefetchTarget:
    """The next MoE layer's experts and its router (held outside nn.Module attributes so the
    layers do not become each other's submodules)."""

    experts: "OffloadedExperts"
    router_probs: RouterProbs


class SlotPool:
    """Preallocated device memory for one layer's expert slots: [num_slots, nbytes] uint8."""

    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device):
        self.buffers = torch.empty((num_slots, store.layout.nbytes), dtype=torch.uint8, device=device)
        self.views = [store.layout.views(self.buffers[s]) for s in range(num_slots)]
        self.last_use: list[Fence | None] = [None] * num_slots  # compute fence of each slot's last reader

    @property
    def nbytes(self) -> int:
        return self.buffers.numel()


class OffloadedExperts(nn.Module):
    """Routed experts of one MoE layer, served from a device cache backed by a host store."""

    def __init__(
        self,
        layer: int,
        num_experts: int,
        apply_gate: GateFn,
        store: ExpertStore,
        cache: ExpertCache,
        pool: SlotPool,
        engine: TransferEngine,
        hybrid: HybridCostModel | None = None,
        fmt: QuantFormat | None = None,
        kind: ExpertsKind = ExpertsKind.FUSED,
        slot_prepare: Callable[[dict[str, torch.Tensor]], None] | None = None,
    ):
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.apply_gate = apply_gate  # gate_up output [T, 2F] -> down input [T, F]
        self.kind = kind  # which eager forward the experts reproduce (arch.ExpertsKind)
        self.store = store
        self.cache = cache
        self.pool = pool
        self.engine = engine
        self.hybrid = hybrid
        self.fmt = fmt  # expert format; None: unquantized
        # run on a slot's views after an expert's bytes land in it (CUDA int4: host -> GPU layout)
        self.slot_prepare = slot_prepare
        self.host_views = [store.views(layer, e) for e in range(num_experts)]
        # Wired by the loader after all layers exist:
        self.prefetch_target: PrefetchTarget | None = None
        self.prefetch_top_n = 0
        self.recorder: RoutingRecorder | None = None
        self.router_logits: torch.Tensor | None = None  # this call's router logits (set by a hook)
        self._prefetched: dict[int, Fence] = {}  # expert -> its copy, admitted by the previous layer

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer}, num_experts={self.num_experts}, slots={self.cache.num_slots}, "
            f"prefetch_top_n={self.prefetch_top_n}, hybrid={self.hybrid is not None}, "
            f"format={self.fmt.name if self.fmt else 'dense'}, kind={self.kind.value}"
        )

    def expert_forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return expert_forward(x, weights, self.fmt, self.apply_gate, self.kind)

    def preload(self, experts: list[int]) -> None:
        """Copy `experts` into free slots now, synchronously (used at load to start warm)."""
        for expert, slot in zip(experts, self.cache.preload(experts)):
            self.pool.buffers[slot].copy_(self.store.buffer(self.layer, expert))
            if self.slot_prepare is not None:
                self.slot_prepare(self.pool.views[slot])

    def _copy_into(self, placed: list[tuple[int, int]]) -> dict[int, Fence]:
        """Copy experts into their slots, [(expert, slot)], in submissions of about BATCH_BYTES:
        one copy per submission for big experts, several for small ones; on CUDA with int4
        experts each slot is re-laid for the GPU kernel right after its copy, in copy order.
        Expert -> its fence."""
        fences: dict[int, Fence] = {}
        per_batch = max(1, BATCH_BYTES // self.store.layout.nbytes)
        for start in range(0, len(placed), per_batch):
            batch = placed[start : start + per_batch]
            fence = self.engine.copy_many([
                (self.store.buffer(self.layer, expert), self.pool.buffers[slot], self.pool.last_use[slot],
                 None if self.slot_prepare is None else functools.partial(self.slot_prepare, self.pool.views[slot]))
                for expert, slot in batch
            ])
            fences.update({expert: fence for expert, _ in batch})
        return fences

    def prefetch(self, experts: list[int]) -> None:
        """Start copying `experts` (likely next) into slots; never evicts one of them for another."""
        protected = set(experts)
        placed = []
        for expert in experts:
            if self.cache.slot_of(expert) is not None:
                continue
            slot = self.cache.admit(expert, protected, self.store.layout.nbytes, prefetch=True)
            if slot is not None:
                placed.append((expert, slot))
        self._prefetched.update(self._copy_into(placed))

    def _prefetch_next(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Prefetch the next layer's likely experts; returns the next router's probabilities
        when they were computed (for the routing recorder)."""
        target = self.prefetch_target
        if target is None:
            return None
        next_all_resident = target.experts.cache.num_slots == target.experts.num_experts
        if self.recorder is None and (self.prefetch_top_n == 0 or next_all_resident):
            return None
        probs = target.router_probs(hidden_states)  # [T, E_next]
        if self.prefetch_top_n > 0 and not next_all_resident:
            scores = probs.sum(dim=0)  # expected uses per expert over this call's tokens
            n = min(self.prefetch_top_n, scores.numel(), target.experts.cache.num_slots)
            target.experts.prefetch(scores.topk(n).indices.tolist())
        return probs

    def _observe_routing(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, needed: list[int]) -> None:
        """Tell a policy that wants it (one with `observe`) this call's routing weights and the
        router's full distribution, summed over the call's tokens (one host transfer)."""
        if not hasattr(self.cache.policy, "observe"):
            return
        # bincount, not index_add_/scatter_add_: those stall for milliseconds on busy cores.
        weight_sums = torch.bincount(top_k_index.flatten(), weights=top_k_weights.flatten().float(),
                                     minlength=self.num_experts + 1)[: self.num_experts].float()
        rows = [weight_sums]
        if self.router_logits is not None:
            rows.append(torch.softmax(self.router_logits.float(), dim=-1).sum(dim=0).to(weight_sums.device))
        values = torch.stack(rows).tolist()
        routed = {e: values[0][e] for e in needed}
        router_probs = dict(enumerate(values[1])) if len(values) > 1 else None
        observe_routing(self.cache.policy, routed, router_probs)

    @torch.no_grad()
    def forward(
        self,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, K] expert ids; id == num_experts means "no expert"
        top_k_weights: torch.Tensor,  # [T, K] routing weights
    ) -> torch.Tensor:  # [T, H]
        if hidden_states.dim() == 3:  # DBRX's experts take [B, S, H] and give it back
            shape = hidden_states.shape
            return self.forward(hidden_states.reshape(-1, shape[-1]), top_k_index, top_k_weights).view(shape)
        final_hidden_states = torch.zeros_like(hidden_states)
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)  # [T, K, E+1]
        expert_mask = expert_mask.permute(2, 1, 0)  # [E+1, K, T]
        tokens_per_expert = expert_mask.sum(dim=(-1, -2)).tolist()  # the call's one host sync
        needed = [e for e in range(self.num_experts) if tokens_per_expert[e]]  # ascending
        stats = self.cache.stats

        # Prefetches issued by the previous layer: used ones are hits once their copy lands.
        ready: dict[int, Fence] = {}
        for expert, fence in self._prefetched.items():
            if expert in needed:
                stats.prefetch_used += 1
                ready[expert] = fence
            else:
                stats.prefetch_wasted += 1
        self._prefetched.clear()

        all_resident = self.cache.num_slots == self.num_experts  # nothing to evict or prefetch
        if not all_resident:
            self._observe_routing(top_k_index, top_k_weights, needed)
        hits = [e for e in needed if self.cache.slot_of(e) is not None]
        for expert in hits:
            self.cache.record_hit(expert)
        missing = [e for e in needed if self.cache.slot_of(e) is None]
        on_cpu: list[int] = []
        if self.hybrid is not None:
            on_cpu = [e for e in missing if self.hybrid.prefer_cpu(tokens_per_expert[e])]
            missing = [e for e in missing if e not in on_cpu]
        protected = set(needed)  # experts this call still needs: never evicted
        pending = deque(missing)
        in_flight: dict[int, tuple[int, Fence]] = {}
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def compute(expert: int, weights: dict[str, torch.Tensor], x_source: torch.Tensor) -> None:
            top_k_pos, token_idx = torch.where(expert_mask[expert])  # [T_e], [T_e]
            x = x_source[token_idx.to(x_source.device)]
            out = self.expert_forward(x, weights).to(hidden_states.device)
            outputs[expert] = (token_idx, out * top_k_weights[token_idx, top_k_pos, None])

        def compute_in_slot(expert: int, slot: int) -> None:
            compute(expert, self.pool.views[slot], hidden_states)
            self.pool.last_use[slot] = self.engine.compute_fence()
            protected.discard(expert)

        def start_copies() -> None:
            placed = []
            while pending:
                slot = self.cache.admit(pending[0], protected, self.store.layout.nbytes)
                if slot is None:
                    break  # every slot holds an expert still needed; wait for one to finish
                placed.append((pending.popleft(), slot))
            fences = self._copy_into(placed)
            for expert, slot in placed:
                in_flight[expert] = (slot, fences[expert])

        host_hidden = hidden_states.cpu() if on_cpu and hidden_states.device.type != "cpu" else hidden_states
        start_copies()
        next_probs = self._prefetch_next(hidden_states)  # overlaps this layer's compute below
        for expert in hits:
            ready.get(expert, DONE).wait()
            compute_in_slot(expert, self.cache.slot_of(expert))
            start_copies()
        for expert in on_cpu:  # CPU work; on CUDA it overlaps the device kernels queued above
            self.cache.record_cpu_compute()
            compute(expert, self.host_views[expert], host_hidden)
            protected.discard(expert)
            start_copies()
        while in_flight or pending:
            start_copies()
            expert = next(e for e in needed if e in in_flight)
            slot, fence = in_flight.pop(expert)
            fence.wait()
            compute_in_slot(expert, slot)

        for expert in needed:  # ascending, like the eager reference
            token_idx, out = outputs[expert]
            # == index_add_(0, token_idx, out) bit for bit (an expert sees a token at most once), but
            # without index_add_'s multi-threaded path, which stalls for milliseconds on busy cores.
            final_hidden_states.index_put_((token_idx,), out.to(final_hidden_states.dtype), accumulate=True)

        if self.recorder is not None:
            probs = None if self.router_logits is None else torch.softmax(self.router_logits.float(), dim=-1)
            self.recorder.record(self.layer, top_k_index, top_k_weights, probs, next_probs)
        self.router_logits = None
        return final_hidden_states
