"""OffloadedExperts: the module that replaces a transformers MoE layer's `experts`.

It keeps the experts contract of transformers 5.x, `forward(hidden_states [T, H],
top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`, so the model's router, attention and
generate() run unchanged. Which expert is a hit, what is copied where and when, and what runs
on the CPU is decided by the tensor-free call schedule (runtime.schedule); this module carries
its steps out with tensors: copies through the transfer engine (one fence per submission),
expert matmuls (runtime.expert_compute), and, while this layer computes, a prefetch of the next
MoE layer's likely experts (its router applied to this call's input). Outputs are combined in
ascending expert order, as transformers' eager implementation does, so results are exact
whatever order the cache makes experts ready in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from offload_moe.runtime.cache import ExpertCache
from offload_moe.runtime.hybrid import HybridCostModel
from offload_moe.model.arch import ExpertsKind
from offload_moe.model.arch import GateFn
from offload_moe.runtime.expert_compute import expert_forward
from offload_moe.model.arch import GateSpec
from offload_moe.quant import moe_kernel
from offload_moe.quant.formats import FormatKind
from offload_moe.quant.int4_layout import cpu_int4_block_n
from offload_moe.runtime.fused_torch import DequantTile, experts_from_slots
from offload_moe.runtime.policies import observe_routing
from offload_moe.runtime.routing import SMALL_CALL, RoutedRows, route_rows
from offload_moe.runtime.routing_recorder import RoutingRecorder
from offload_moe.runtime.schedule import (CopyIn, call_schedule, prefetch_schedule, resident_slots, settle_prefetches,
                                          wants_routing)
from offload_moe.quant.formats import QuantFormat
from offload_moe.runtime.store import ExpertStore
from offload_moe.runtime.transfer import BATCH_BYTES, DONE, Fence, HostCopy, TransferEngine

RouterProbs = Callable[[torch.Tensor], torch.Tensor]  # hidden [T, H] -> probabilities [T, E]


@dataclass
class PrefetchTarget:
    """The next MoE layer's experts and its router (held outside nn.Module attributes so the
    layers do not become each other's submodules)."""

    experts: "OffloadedExperts"
    router_probs: RouterProbs


def dispatch_mask_ids(mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids [T, K] of a one-hot dispatch mask [T, K, E]; a row of zeros (a token the
    router dropped at expert capacity: the reference computes nothing for it, so it adds zero)
    becomes `num_experts`, "no expert". Each expert then sees the same tokens in the same
    (ascending) order as the reference's torch.where on the mask."""
    return torch.where(mask.any(dim=-1), mask.argmax(dim=-1), num_experts)


def combine_ids(combine: torch.Tensor, num_experts: int, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [T, k] and weights [T, k] of NLLB-MoE's combine weights [T, E]: the experts
    with a non-zero weight (the top-1 and top-2 experts its router kept within capacity), in
    ascending order; a missing one is `num_experts`, "no expert", weight 0."""
    experts = torch.arange(num_experts, device=combine.device)
    ids = torch.where(combine != 0, experts, num_experts).sort(dim=-1).values[:, :k]
    weights = torch.gather(combine, 1, ids.clamp(max=num_experts - 1))
    return ids, torch.where(ids < num_experts, weights, torch.zeros_like(weights))


class RouterLogits:
    """The hand-off of one call's router logits from the layer's router (a forward hook the
    loader registers) to its experts module, which takes them once per call."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._logits: torch.Tensor | None = None

    def hook(self, router: nn.Module, args: tuple, output: object) -> None:
        logits = output[0] if isinstance(output, tuple) else output
        if isinstance(logits, torch.Tensor) and logits.shape[-1] == self.num_experts:
            self._logits = logits.reshape(-1, self.num_experts)  # [T, E]

    def take(self) -> torch.Tensor | None:
        logits, self._logits = self._logits, None
        return logits


class SlotPool:
    """Preallocated device memory for one layer's expert slots: [num_slots, nbytes] uint8."""

    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device):
        self.buffers = torch.empty((num_slots, store.layout.nbytes), dtype=torch.uint8, device=device)
        self.views = [store.layout.views(self.buffers[s]) for s in range(num_slots)]
        self.last_use: list[Fence | None] = [None] * num_slots  # compute fence of each slot's last reader
        # The fence of the last copy into each slot: every compute from a slot waits on it, so a
        # slot is never read before its bytes land, however the copy was started (a miss of this
        # call, or a prefetch of an earlier one that this call did not use).
        self.filled: list[Fence] = [DONE] * num_slots

    @classmethod
    def empty(cls) -> "SlotPool":
        """A pool of no slots (what a released layer keeps)."""
        pool = cls.__new__(cls)
        pool.buffers, pool.views, pool.last_use, pool.filled = torch.empty((0, 0), dtype=torch.uint8), [], [], []
        return pool

    @property
    def nbytes(self) -> int:
        return self.buffers.numel()


@dataclass
class _Call:
    """One forward call: its [T, H] inputs, its routing (read back once) and the outputs so far."""

    hidden: torch.Tensor  # [T, H]
    rows: RoutedRows
    needed: list[int]  # experts with tokens, ascending
    top_k: int
    row_out: torch.Tensor | None = None  # [R, H] in hidden's dtype: every routed row's weighted output
    host_hidden: HostCopy | None = None  # the inputs on the host (hybrid), copied once
    final: torch.Tensor | None = None  # [T, H] in hidden's dtype when one native call combined the whole call

    def rows_buffer(self) -> torch.Tensor:
        """row_out, allocated when a group first writes rows (a call combined in one native
        call never needs it)."""
        if self.row_out is None:
            self.row_out = self.hidden.new_empty(self.rows.starts[-1], self.hidden.shape[-1])
        return self.row_out


def _row_span(spans: list[slice]) -> tuple[slice | torch.Tensor, list[int]]:
    """The rows of a group of experts (each a span of the call's rows, ascending): a slice when
    they are contiguous, else a host index; and each expert's offsets within them."""
    offsets = [0]
    for span in spans:
        offsets.append(offsets[-1] + span.stop - span.start)
    if all(a.stop == b.start for a, b in zip(spans, spans[1:])):
        return slice(spans[0].start, spans[-1].stop), offsets
    return torch.cat([torch.arange(span.start, span.stop) for span in spans]), offsets


class OffloadedExperts(nn.Module):
    """Routed experts of one MoE layer, served from a device cache backed by a host store.

    Complete when constructed: `next_layer` (prefetch target), `recorder` and `router_logits`
    (the hand-off from this layer's router) are given here, not set afterwards."""

    def __init__(
        self,
        layer: int,
        num_experts: int,
        apply_gate: GateFn,
        store: ExpertStore,
        cache: ExpertCache,
        pool: SlotPool,
        engine: TransferEngine,
        *,
        fmt: QuantFormat,
        kind: ExpertsKind = ExpertsKind.FUSED,
        hybrid: HybridCostModel | None = None,
        tile: DequantTile | None = None,
        gate: GateSpec | None = None,
        next_layer: PrefetchTarget | None = None,
        prefetch_top_n: int = 0,
        recorder: RoutingRecorder | None = None,
        router_logits: RouterLogits | None = None,
        stack: str = "",
        combine_routing: bool = False,
        output_scale: float | None = None,
    ):
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.apply_gate = apply_gate  # gate_up output [T, 2F] -> down input [T, F]
        self.kind = kind  # which eager forward the experts reproduce (model.arch.ExpertsKind)
        self.fmt = fmt  # the experts' format (dense included)
        self.store = store
        self.cache = cache
        self.pool = pool
        self.engine = engine
        self.hybrid = hybrid
        # quantized experts on a GPU: groups of resident experts computed at once from their slots
        # (runtime.fused_torch) through this shared dequantization tile
        self.tile = tile
        # the gate as the fused CPU kernel computes it (quant.moe_kernel), checked against
        # apply_gate at load; None: experts on the CPU take the per-expert path
        self.gate = gate
        self._block_n = cpu_int4_block_n() if fmt.kind is FormatKind.AFFINE else None
        self.prefetch_target = next_layer
        self.prefetch_top_n = prefetch_top_n if next_layer is not None else 0
        self.recorder = recorder
        self.router_logits = router_logits
        self.stack = stack  # "encoder" / "decoder" in an encoder-decoder model (for the recorder)
        # NLLB-MoE: called with the router's [T, E] top-1 mask and combine weights (see arch.ArchSpec)
        self.combine_routing = combine_routing
        self.output_scale = output_scale  # each weighted expert output times this (NLLB-MoE in eval)
        self.host_views = [store.views(layer, e) for e in range(num_experts)]
        # the fused CPU kernel's pointer tables of the host store's experts and of CPU slots,
        # checked once (built at first use: a kernel switched on later finds them too)
        self._tables: dict[bool, moe_kernel.ExpertTable] = {}
        # mutated in place, never reassigned: nn.Module.__setattr__ costs more than the call's schedule
        self._prefetched: list[int] = []  # experts the previous layer admitted here for this call
        self._slots_in_group: list[int] = []  # slots the group being collected reads

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer}, num_experts={self.num_experts}, slots={self.cache.num_slots}, "
            f"prefetch_top_n={self.prefetch_top_n}, hybrid={self.hybrid is not None}, "
            f"format={self.fmt.name}, kind={self.kind.value}"
        )

    def release(self) -> None:
        """Drop this layer's slot buffers and its views of the host store (see Runtime.close)."""
        self.host_views = []
        self._tables = {}
        self.pool = SlotPool.empty()
        self._prefetched.clear()
        self.prefetch_target = None

    def expert_forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return expert_forward(x, weights, self.fmt, self.apply_gate, self.kind)

    def preload(self, experts: list[int]) -> None:
        """Copy `experts` into free slots now, synchronously (used at load to start warm)."""
        for expert, slot in zip(experts, self.cache.preload(experts)):
            self.pool.buffers[slot].copy_(self.store.buffer(self.layer, expert))

    def _copy_into(self, placed: Iterable[tuple[int, int]]) -> None:
        """Copy experts into their slots, [(expert, slot)], in submissions of about BATCH_BYTES:
        one copy per submission for big experts, several for small ones. Each slot's fence
        (`pool.filled`) becomes its submission's."""
        placed = list(placed)
        per_batch = max(1, BATCH_BYTES // self.store.layout.nbytes)
        for start in range(0, len(placed), per_batch):
            batch = placed[start : start + per_batch]
            fence = self.engine.copy_many([
                (self.store.buffer(self.layer, expert), self.pool.buffers[slot], self.pool.last_use[slot])
                for expert, slot in batch
            ])
            for _, slot in batch:
                self.pool.filled[slot] = fence

    def prefetch(self, experts: list[int]) -> None:
        """Start copying `experts` (likely next) into slots; never evicts one of them for another."""
        placed = prefetch_schedule(self.cache, experts, self.store.layout.nbytes)
        self._copy_into(placed)
        self._prefetched.extend(expert for expert, _ in placed)

    def _next_router_probs(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The next layer's router on this call's input [T, E_next], when a prefetch or the
        recorder wants it (computed on the device; the prefetch reads its sums back with the
        routing, in the call's one transfer)."""
        target = self.prefetch_target
        if target is None or (self.recorder is None and not self._prefetching()):
            return None
        return target.router_probs(hidden_states)

    def _prefetching(self) -> bool:
        target = self.prefetch_target
        return (target is not None and self.prefetch_top_n > 0
                and target.experts.cache.num_slots < target.experts.num_experts)

    def _prefetch_next(self, scores: list[float] | None) -> None:
        """Prefetch the next layer's likely experts: `scores` are its expected uses per expert
        over this call's tokens (host values)."""
        if scores is None or not self._prefetching():
            return
        experts = self.prefetch_target.experts
        n = min(self.prefetch_top_n, len(scores), experts.cache.num_slots)
        experts.prefetch(sorted(range(len(scores)), key=lambda e: -scores[e])[:n])

    def _route(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
               logits: torch.Tensor | None, next_probs: torch.Tensor | None) -> _Call:
        """The call's routing, read back once; shows the policy this call's routing weights and
        the router's full distribution, summed over the call's tokens, when it wants them."""
        observe = wants_routing(self.cache)
        hybrid_on_gpu = self.hybrid is not None and hidden_states.device.type != "cpu"
        rows = route_rows(top_k_index, top_k_weights, self.num_experts, sums=observe,
                          logits=logits if observe else None, host_rows=hybrid_on_gpu,
                          next_scores=next_probs.sum(dim=0) if next_probs is not None and self._prefetching() else None)
        needed = rows.needed()
        if observe:
            routed = {e: rows.weight_sums[e] for e in needed}
            router_probs = dict(enumerate(rows.prob_sums)) if rows.prob_sums is not None else None
            observe_routing(self.cache.policy, routed, router_probs)
        return _Call(hidden_states, rows, needed, top_k_index.shape[-1])

    def _start_host_copy(self, call: _Call) -> None:
        """Hybrid on a GPU: start copying the inputs to the host before any device compute is
        queued, so CPU experts wait for that copy only and overlap the GPU experts."""
        if self.hybrid is not None and call.hidden.device.type != "cpu":
            if any(self.cache.slot_of(e) is None for e in call.needed):
                call.host_hidden = self.engine.to_host(call.hidden)

    def _inputs(self, call: _Call, on_host: bool) -> torch.Tensor:
        """The call's inputs where a group computes: the device's, or the host copy."""
        if not on_host or call.hidden.device.type == "cpu":
            return call.hidden
        if call.host_hidden is None:
            call.host_hidden = self.engine.to_host(call.hidden)
        return call.host_hidden.get()

    def _compute(self, call: _Call, group: list[tuple[int, dict[str, torch.Tensor]]], on_host: bool) -> None:
        """Compute a group of experts (all from device slots, or all from the host store) into
        `call.row_out`: each expert's rows' outputs times their routing weights."""
        if not on_host and self.tile is not None:
            self._compute_from_slots(call, [expert for expert, _ in group])
            return
        if (on_host or call.hidden.device.type == "cpu") and moe_kernel.available(self.fmt, self._block_n, self.gate):
            self._compute_with_kernel(call, group, on_host)
            return
        x_source = self._inputs(call, on_host)
        rows = call.rows
        for expert, weights in group:
            x = x_source[rows.tokens(expert, on_host)]  # [R_e, H]
            out = self.expert_forward(x, weights)
            out = self.engine.to_device(out) if on_host else out
            out = out * rows.weight_of_row[rows.rows(expert), None]
            if self.output_scale is not None:
                out *= self.output_scale  # after the weight, as NLLB-MoE's experts scale it
            call.rows_buffer()[rows.rows(expert)] = out

    def _kernel_table(self, on_host: bool) -> moe_kernel.ExpertTable:
        """The pointer table of the host store's experts (on_host) or of this layer's CPU slots."""
        if on_host not in self._tables:
            views = self.host_views if on_host else self.pool.views
            self._tables[on_host] = moe_kernel.ExpertTable(views, self.fmt, self._block_n)
        return self._tables[on_host]

    def _compute_with_kernel(self, call: _Call, group: list[tuple[int, dict[str, torch.Tensor]]],
                             on_host: bool) -> None:
        """A group of experts whose weights are in host memory, in one native call (quant.moe_kernel)."""
        rows = call.rows
        where, offsets = _row_span([rows.rows(expert) for expert, _ in group])
        tokens = rows.tokens_on_host() if on_host else rows.token_of_row
        weights = rows.weights_on_host() if on_host else rows.weight_of_row
        if not (isinstance(where, slice) and where.start == 0 and where.stop == tokens.numel()):
            tokens, weights = tokens[where], weights[where]
        weights = weights if weights.dtype == torch.float32 else weights.float()
        if self.output_scale is not None:
            weights = weights * self.output_scale
        ids = [expert for expert, _ in group] if on_host else list(self._slots_in_group)
        x, table = self._inputs(call, on_host), self._kernel_table(on_host)
        if len(group) == len(call.needed) and call.hidden.device.type == "cpu":  # the whole call: combined inside
            call.final = moe_kernel.moe_experts(x, tokens, weights, offsets, table, self.fmt, self.gate, ids=ids)
            return
        out = torch.empty(offsets[-1], x.shape[1], dtype=torch.float32)
        moe_kernel.moe_experts(x, tokens, weights, offsets, table, self.fmt, self.gate, rows_out=out, ids=ids)
        out = out.to(call.hidden.dtype)
        call.rows_buffer()[where] = self.engine.to_device(out) if on_host else out

    def _compute_from_slots(self, call: _Call, experts: list[int]) -> None:
        """A group of resident experts in a fixed number of device ops (runtime.fused_torch)."""
        rows = call.rows
        slots = self.engine.to_device(torch.tensor(self._slots_in_group, dtype=torch.int64))
        where, offsets = _row_span([rows.rows(e) for e in experts])
        if not isinstance(where, slice):
            where = self.engine.to_device(where)
        counts = [b - a for a, b in zip(offsets, offsets[1:])]
        out = experts_from_slots(call.hidden, rows.token_of_row[where], rows.weight_of_row[where], counts, slots,
                                 self.pool.buffers, self.store.layout, self.fmt, self.apply_gate, self.tile,
                                 kind=self.kind)
        if self.output_scale is not None:
            out *= self.output_scale
        call.rows_buffer()[where] = out

    def _resident_only(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> bool:
        """Whether this call may take `_resident_call`: a few tokens on the CPU, experts the fused
        kernel computes as they are (no output scale, no routing shown to the policy or the
        recorder, no prefetch to start)."""
        return (hidden_states.device.type == "cpu" and top_k_index.dim() == 2 and top_k_index.numel() <= SMALL_CALL
                and self.recorder is None and self.output_scale is None and not self.combine_routing
                and not wants_routing(self.cache) and not self._prefetching()
                and moe_kernel.available(self.fmt, self._block_n, self.gate))

    def _resident_call(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor | None:  # [T, H], or None
        """A call whose experts are all resident in CPU slots (a CPU decode step's usual call): the
        schedule's hits, then one native call from the router's top-k (moe_kernel.moe_experts_topk,
        the general path's rows and result without building them). None, having changed nothing,
        when an expert is missing: the general path takes the call."""
        needed = sorted({e for e in top_k_index.view(-1).tolist() if e != self.num_experts})
        slots = resident_slots(self.cache, needed)  # the schedule of a call of hits only
        if slots is None:
            return None
        settle_prefetches(self.cache.stats, self._prefetched, needed)
        self._prefetched.clear()
        for slot in slots:
            self.pool.filled[slot].wait()
            self.pool.filled[slot] = DONE
        combined = moe_kernel.moe_experts_topk(hidden_states, top_k_index, top_k_weights, self.num_experts, needed,
                                               slots, self._kernel_table(on_host=False), self.gate)
        fence = self.engine.compute_fence()
        for slot in slots:
            self.pool.last_use[slot] = fence
        return combined

    def _combine(self, call: _Call) -> torch.Tensor:  # [T, H]
        if call.final is not None:  # one native call computed and combined the whole call
            return call.final
        # Unquantized experts: each token's rows summed in ascending expert order in hidden's
        # dtype, the eager reference's index_add_ per expert bit for bit; quantized ones (whose
        # results are approximate anyway): one reduction whatever top_k.
        return call.rows.combine(call.rows_buffer(), call.top_k, sequential=not self.fmt.quantized)

    def _run_schedule(self, call: _Call) -> None:
        """Carry out the call schedule's steps, computing consecutive experts of one kind (hits,
        CPU experts, copied experts) as one group."""
        on_cpu = None if self.hybrid is None else (lambda e: self.hybrid.prefer_cpu(call.rows.count(e)))
        prefetched_next = False
        group: list[tuple[int, dict[str, torch.Tensor]]] = []
        group_kind: tuple[bool, bool] | None = None  # (on the host, copied by this call)
        for step in call_schedule(self.cache, call.needed, self.store.layout.nbytes, on_cpu):
            if isinstance(step, CopyIn):  # a copy may reuse the slot of an expert already scheduled
                self._flush(call, group, group_kind)
                group, group_kind = [], None
                self._copy_into(step.placed)
                continue
            if not prefetched_next:  # after the first copies: overlaps this layer's compute
                self._prefetch_next(call.rows.next_scores)
                prefetched_next = True
            kind = (step.slot is None, step.copied)
            if group and kind != group_kind:
                self._flush(call, group, group_kind)
                group = []
            group_kind = kind
            if step.slot is None:  # hybrid: on the CPU, from the host store
                group.append((step.expert, self.host_views[step.expert]))
                continue
            self.pool.filled[step.slot].wait()  # its copy (this call's or a prefetch's) has landed
            self.pool.filled[step.slot] = DONE  # compute after this one is ordered after the wait
            group.append((step.expert, self.pool.views[step.slot]))
            self._slots_in_group.append(step.slot)
        self._flush(call, group, group_kind)
        if not prefetched_next:
            self._prefetch_next(call.rows.next_scores)

    def _flush(self, call: _Call, group: list[tuple[int, dict[str, torch.Tensor]]],
               kind: tuple[bool, bool] | None) -> None:
        """Compute a collected group, then mark its slots as read by this compute."""
        if group:
            self._compute(call, group, on_host=kind[0])
        if self._slots_in_group:
            fence = self.engine.compute_fence()
            for slot in self._slots_in_group:
                self.pool.last_use[slot] = fence
            self._slots_in_group.clear()

    def forward(
        self,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, K] expert ids; id == num_experts means "no expert"
        top_k_weights: torch.Tensor,  # [T, K] routing weights
    ) -> torch.Tensor:  # [T, H]
        if torch.is_grad_enabled():  # called outside no_grad / inference mode: never build a graph
            with torch.no_grad():
                return self._forward(hidden_states, top_k_index, top_k_weights)
        return self._forward(hidden_states, top_k_index, top_k_weights)

    def _forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() == 3:  # DBRX's experts take [B, S, H] and give it back
            shape = hidden_states.shape
            return self._forward(hidden_states.reshape(-1, shape[-1]), top_k_index, top_k_weights).view(shape)
        if top_k_index.dim() == 3:  # Switch: a one-hot dispatch mask [T, K, E]
            top_k_index = dispatch_mask_ids(top_k_index, self.num_experts)
        if self.combine_routing:  # NLLB-MoE: (top-1 mask [T, E], combine weights [T, E]); the mask is unused
            top_k_index, top_k_weights = combine_ids(top_k_weights, self.num_experts, min(2, self.num_experts))
        logits = self.router_logits.take() if self.router_logits is not None else None
        if self._resident_only(hidden_states, top_k_index):  # (logits only serve the policy and the recorder)
            combined = self._resident_call(hidden_states, top_k_index, top_k_weights)
            if combined is not None:
                return combined
        next_probs = self._next_router_probs(hidden_states)
        call = self._route(hidden_states, top_k_index, top_k_weights, logits, next_probs)
        # Prefetches issued by the previous layer: used ones are hits (computed once they land).
        settle_prefetches(self.cache.stats, self._prefetched, call.needed)
        self._prefetched.clear()
        self._start_host_copy(call)
        self._run_schedule(call)
        if self.recorder is not None:
            probs = None if logits is None else torch.softmax(logits.float(), dim=-1)
            self.recorder.record(self.layer, top_k_index, top_k_weights, probs, next_probs, stack=self.stack,
                                 num_experts=self.num_experts)
        return self._combine(call)
