"""One call's routing, grouped by expert and read back to the host once.

The router gives every token K (expert, weight) pairs. The layer needs them the other way round:
for every expert, the tokens sent to it. `route_rows` sorts the T*K pairs into "rows" grouped by
expert (ascending) and, within one expert, in the order transformers' eager experts visit them
(`torch.where` on its [E, K, T] one-hot mask: top-k position first, then token), so an expert
computed from its rows sees the same tokens in the same order as the reference. The first row of
every expert comes from `searchsorted` on the sorted ids, on the routing's device; the host gets
them, and optionally per-expert sums for the eviction policy, in ONE transfer (the layer's one
host sync on CUDA: the cache must know which experts a call needs).

Ids equal to `num_experts` mean "no expert" (a token dropped at capacity): they sort last and
belong to no expert's rows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutedRows:
    """The (token, expert) pairs of one call, grouped by expert ascending."""

    token_of_row: torch.Tensor  # int64 [R]: the token of each row
    weight_of_row: torch.Tensor  # [R]: its routing weight (the router's dtype)
    starts: list[int]  # len E+1, host: rows of expert e are starts[e]:starts[e+1]
    weight_sums: list[float] | None  # per expert, sum of its rows' weights (asked for: `route_rows(sums=True)`)
    prob_sums: list[float] | None  # per expert, sum over tokens of the router's softmax (given logits)
    host_token_of_row: torch.Tensor | None = None  # token_of_row on the host (`route_rows(host_rows=True)`)
    host_weight_of_row: torch.Tensor | None = None  # fp32 weight_of_row on the host (the same)
    next_scores: list[float] | None = None  # `route_rows(next_scores=...)` read back with the rest
    pair_of_row: torch.Tensor | None = None  # int64 [K*T]: the (k * T + t) pair of each row

    def combine(self, outputs: torch.Tensor, top_k: int, sequential: bool = True) -> torch.Tensor:
        """[T, H] sums of the rows' outputs `outputs` [starts[E], H] per token, with a fixed number
        of ops whatever the number of experts (no atomics: the same bits on every run).

        sequential: one add per top-k position, in ascending expert order and in outputs' dtype,
        which is the eager reference's index_add_ per expert bit for bit; otherwise one reduction
        (fp32 accumulation for 16-bit outputs: as exact or better, one op whatever top_k)."""
        tokens = self.token_of_row.numel() // top_k
        routed = self.starts[-1]
        row_of_pair = torch.empty_like(self.pair_of_row)
        row_of_pair[self.pair_of_row] = torch.arange(row_of_pair.numel(), device=row_of_pair.device)
        per_token = row_of_pair.view(top_k, tokens).t().sort(dim=1).values  # [T, K] rows, ascending experts
        padded = torch.cat([outputs[:routed], outputs.new_zeros(1, outputs.shape[1])])  # dropped pairs add 0
        picked = padded[per_token.clamp(max=routed)]  # [T, K, H]
        if not sequential:
            return picked.sum(dim=1)
        total = picked[:, 0].clone()
        for k in range(1, top_k):
            total += picked[:, k]
        return total

    def tokens(self, expert: int, on_host: bool = False) -> torch.Tensor:
        """The tokens of `expert`'s rows [R_e], on the routing's device or the host."""
        return (self.tokens_on_host() if on_host else self.token_of_row)[self.rows(expert)]

    def tokens_on_host(self) -> torch.Tensor:
        return self.token_of_row if self.host_token_of_row is None else self.host_token_of_row

    def weights_on_host(self) -> torch.Tensor:
        return self.weight_of_row if self.host_weight_of_row is None else self.host_weight_of_row

    @property
    def num_experts(self) -> int:
        return len(self.starts) - 1

    def count(self, expert: int) -> int:
        return self.starts[expert + 1] - self.starts[expert]

    def needed(self) -> list[int]:
        """Experts with at least one row, ascending."""
        return [e for e in range(self.num_experts) if self.starts[e + 1] > self.starts[e]]

    def rows(self, expert: int) -> slice:
        return slice(self.starts[expert], self.starts[expert + 1])


SMALL_CALL = 64  # (token, expert) pairs up to which a CPU call is sorted on the host (decode)


def route_rows(
    top_k_index: torch.Tensor,  # [T, K] expert ids; num_experts: no expert
    top_k_weights: torch.Tensor,  # [T, K]
    num_experts: int,
    *,
    sums: bool = False,
    logits: torch.Tensor | None = None,  # [T, E] router logits, for `prob_sums`
    host_rows: bool = False,  # also bring token_of_row and weight_of_row to the host, in the same transfer
    next_scores: torch.Tensor | None = None,  # [E'] the next layer's expected uses (prefetch), read back too
) -> RoutedRows:
    tokens, k = top_k_index.shape
    extras = sums or logits is not None or host_rows or next_scores is not None
    if top_k_index.is_cpu and tokens * k <= SMALL_CALL and not extras:
        return _small_call_rows(top_k_index, top_k_weights, num_experts)
    by_position = top_k_index.t().reshape(-1)  # [K*T]: pair p = k * T + t, the eager mask's order
    order = torch.argsort(by_position, stable=True)  # [K*T] grouped by expert; (k, t) order within one
    sorted_ids = by_position[order]
    bounds = torch.arange(num_experts + 1, device=sorted_ids.device, dtype=sorted_ids.dtype)
    starts = torch.searchsorted(sorted_ids, bounds)  # [E+1]: first row of each expert, then the end
    weight_of_row = top_k_weights.t().reshape(-1)[order]  # [K*T]
    readback = [starts.to(torch.float64)]  # exact for any count below 2**53
    if sums:
        cumulative = torch.cat([weight_of_row.new_zeros(1, dtype=torch.float64), weight_of_row.double().cumsum(0)])
        readback.append(cumulative[starts[1:]] - cumulative[starts[:-1]])  # [E] segment sums, deterministic
    if logits is not None:
        readback.append(torch.softmax(logits.float(), dim=-1).sum(dim=0).double())
    if next_scores is not None:
        readback.append(next_scores.double())
    token_of_row = order % tokens
    if host_rows:
        readback += [token_of_row.double(), weight_of_row.double()]
    host = torch.cat(readback).tolist()  # the one host transfer
    start_list = [int(v) for v in host[: num_experts + 1]]
    at = num_experts + 1
    weight_sums = host[at : at + num_experts] if sums else None
    at += num_experts if sums else 0
    prob_sums = host[at : at + num_experts] if logits is not None else None
    at += num_experts if logits is not None else 0
    scores = host[at : at + next_scores.numel()] if next_scores is not None else None
    at += next_scores.numel() if next_scores is not None else 0
    routed_pairs = token_of_row.numel()
    host_token_of_row = torch.tensor(host[at : at + routed_pairs], dtype=torch.int64) if host_rows else None
    host_weight_of_row = torch.tensor(host[at + routed_pairs :], dtype=torch.float32) if host_rows else None
    return RoutedRows(token_of_row, weight_of_row, start_list, weight_sums, prob_sums, host_token_of_row,
                      host_weight_of_row, scores, order)


def _small_call_rows(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> RoutedRows:
    """route_rows for a few pairs on the CPU: the same rows, sorted in Python (a handful of list
    operations cost less than the ~10 tensor ops of the general path at decode)."""
    tokens = top_k_index.shape[0]
    by_position = top_k_index if tokens == 1 else top_k_index.t()  # pair p = k * T + t
    ids = by_position.reshape(-1).tolist()
    order = sorted(range(len(ids)), key=ids.__getitem__)  # stable: (k, t) order within an expert
    counts = [0] * (num_experts + 1)
    for e in ids:
        if e < num_experts:
            counts[e + 1] += 1
    starts = list(itertools.accumulate(counts))  # the first row of each expert, then the end
    pair_of_row = torch.tensor(order, dtype=torch.int64)
    weight_of_row = (top_k_weights if tokens == 1 else top_k_weights.t()).reshape(-1)[pair_of_row]
    token_of_row = torch.zeros(len(order), dtype=torch.int64) if tokens == 1 else \
        torch.tensor([p % tokens for p in order], dtype=torch.int64)
    return RoutedRows(token_of_row, weight_of_row, starts, None, None, pair_of_row=pair_of_row)
