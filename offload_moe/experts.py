"""OffloadedExperts: the module that replaces a transformers MoE layer's `experts`.

It keeps the experts contract of transformers 5.x, `forward(hidden_states [T, H],
top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`, so the model's router, attention and
generate() run unchanged. Each routed expert is served from a device slot: resident experts
(hits) first, while the missing ones (misses) are copied into slots by the transfer engine, as
many ahead as there are slots not holding an expert this call still needs. Outputs are combined
in ascending expert order, as transformers' eager implementation does, so results are exact
whatever order the cache makes experts ready in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
from torch import nn

from .cache import ExpertCache
from .kernels import dense_expert_forward
from .store import ExpertStore
from .transfer import Fence, TransferEngine


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
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        store: ExpertStore,
        cache: ExpertCache,
        pool: SlotPool,
        engine: TransferEngine,
    ):
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.act_fn = act_fn
        self.store = store
        self.cache = cache
        self.pool = pool
        self.engine = engine

    def preload(self, experts: list[int]) -> None:
        """Copy `experts` into free slots now, synchronously (used at load to start warm)."""
        for expert, slot in zip(experts, self.cache.preload(experts)):
            self.pool.buffers[slot].copy_(self.store.buffer(self.layer, expert))

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, slots={self.cache.num_slots}"

    @torch.no_grad()
    def forward(
        self,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, K] expert ids; id == num_experts means "no expert"
        top_k_weights: torch.Tensor,  # [T, K] routing weights
    ) -> torch.Tensor:  # [T, H]
        final_hidden_states = torch.zeros_like(hidden_states)
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)  # [T, K, E+1]
        expert_mask = expert_mask.permute(2, 1, 0)  # [E+1, K, T]
        used = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()  # ascending
        needed = [e for e in used if e != self.num_experts]

        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def compute(expert: int, slot: int) -> None:
            top_k_pos, token_idx = torch.where(expert_mask[expert])  # [T_e], [T_e]
            out = dense_expert_forward(hidden_states[token_idx], self.pool.views[slot], self.act_fn)
            outputs[expert] = (token_idx, out * top_k_weights[token_idx, top_k_pos, None])
            self.pool.last_use[slot] = self.engine.compute_fence()

        hits = [e for e in needed if self.cache.slot_of(e) is not None]
        for expert in hits:
            self.cache.record_hit(expert)
        protected = set(needed)  # experts this call still needs: never evicted
        pending = deque(e for e in needed if self.cache.slot_of(e) is None)
        in_flight: dict[int, tuple[int, Fence]] = {}

        def start_copies() -> None:
            while pending:
                slot = self.cache.admit(pending[0], protected, self.store.layout.nbytes)
                if slot is None:
                    return  # every slot holds an expert still needed; wait for one to finish
                expert = pending.popleft()
                src = self.store.buffer(self.layer, expert)
                fence = self.engine.copy(src, self.pool.buffers[slot], after=self.pool.last_use[slot])
                in_flight[expert] = (slot, fence)

        start_copies()
        for expert in hits:
            compute(expert, self.cache.slot_of(expert))
            protected.discard(expert)
            start_copies()
        while in_flight or pending:
            start_copies()
            expert = next(e for e in needed if e in in_flight)
            slot, fence = in_flight.pop(expert)
            fence.wait()
            compute(expert, slot)
            protected.discard(expert)

        for expert in needed:  # ascending, like the eager reference
            token_idx, out = outputs[expert]
            # == index_add_(0, token_idx, out) bit for bit (an expert sees a token at most once), but
            # without index_add_'s multi-threaded path, which stalls for milliseconds on busy cores.
            final_hidden_states.index_put_((token_idx,), out.to(final_hidden_states.dtype), accumulate=True)
        return final_hidden_states
