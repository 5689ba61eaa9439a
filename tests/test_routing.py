"""route_rows: a call's (token, expert) pairs grouped by expert in the eager reference's order,
everything the host needs read back at once, and the fixed-op combine."""

from __future__ import annotations

import pytest
import torch

from offload_moe.runtime.routing import route_rows

E = 6


def routing(tokens: int, k: int, seed: int = 0, dropped: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-k routing [T, K] with distinct experts per token; id E ("no expert") allowed."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E + int(dropped), generator=g)[:k] for _ in range(tokens)])
    return ids, torch.rand(tokens, k, generator=g)


@pytest.mark.parametrize("tokens,k", [(1, 1), (1, 2), (9, 2), (40, 3)])
def test_rows_follow_the_eager_masks_order(tokens, k):
    ids, weights = routing(tokens, k)
    rows = route_rows(ids, weights, E)
    mask = torch.nn.functional.one_hot(ids, E + 1).permute(2, 1, 0)  # [E+1, K, T], as transformers builds it
    for expert in range(E):
        position, token = torch.where(mask[expert])
        assert torch.equal(rows.tokens(expert), token)
        assert torch.equal(rows.weight_of_row[rows.rows(expert)], weights[token, position])
    assert rows.needed() == [e for e in range(E) if (ids == e).any()]
    assert rows.starts[-1] == int((ids < E).sum())  # dropped pairs belong to no expert


def test_everything_asked_for_comes_back_in_one_transfer():
    ids, weights = routing(12, 2, seed=1)
    logits, scores = torch.randn(12, E), torch.rand(5)
    rows = route_rows(ids, weights, E, sums=True, logits=logits, host_rows=True, next_scores=scores)
    for expert in range(E):
        assert rows.weight_sums[expert] == pytest.approx(float(weights[ids == expert].sum()), abs=1e-6)
    assert rows.prob_sums == pytest.approx(torch.softmax(logits, -1).sum(0).tolist())
    assert rows.next_scores == pytest.approx(scores.tolist())
    assert torch.equal(rows.host_token_of_row, rows.token_of_row)
    assert torch.equal(rows.host_weight_of_row, rows.weight_of_row)
    plain = route_rows(ids, weights, E)
    assert plain.weight_sums is None and plain.prob_sums is None and plain.next_scores is None


@pytest.mark.parametrize("tokens,k", [(1, 2), (17, 2), (33, 4)])
def test_combine_sums_each_tokens_rows_in_ascending_expert_order(tokens, k):
    ids, weights = routing(tokens, k, seed=2)
    rows = route_rows(ids, weights, E)
    outputs = torch.randn(rows.starts[-1], 8)
    expected = torch.zeros(tokens, 8)
    for expert in range(E):  # ascending, one add per expert: the eager reference's order
        expected.index_put_((rows.tokens(expert),), outputs[rows.rows(expert)], accumulate=True)
    assert torch.equal(rows.combine(outputs, k), expected)


def test_a_token_routed_nowhere_gets_zeros():
    ids = torch.tensor([[E, E], [1, E]])
    rows = route_rows(ids, torch.ones(2, 2), E)
    assert rows.needed() == [1]
    out = rows.combine(torch.full((1, 3), 2.0), 2)
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]))


@pytest.mark.parametrize("tokens,k", [(1, 1), (1, 2), (1, 6), (5, 3), (9, 6)])
def test_small_cpu_calls_give_the_general_paths_rows(tokens, k):
    """Few pairs on the CPU take a host sort; the rows are the general path's, field for field."""
    ids, weights = routing(tokens, k, seed=3)
    small = route_rows(ids, weights, E)
    general = route_rows(ids, weights, E, host_rows=True)  # an extra forces the tensor path
    assert small.starts == general.starts
    assert torch.equal(small.token_of_row, general.token_of_row)
    assert torch.equal(small.weight_of_row, general.weight_of_row)
    assert torch.equal(small.pair_of_row, general.pair_of_row)
