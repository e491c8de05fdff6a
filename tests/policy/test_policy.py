"""Keep-set policies on plain score tensors."""

from __future__ import annotations

import logging

import pytest
import torch

from premoe.errors import UsageError
from premoe.policy import (
    budget_count,
    coverage_count,
    expert_order,
    group_exact_possible,
    kept_share,
    merge_sum,
    normalize_rows,
    parse_bytes,
    random_order,
    select_experts,
    take,
    union_order,
)

LAYERS = [1, 2, 4]


def scores_le(n_layers: int = 3, n_experts: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n_layers, n_experts), generator=g) ** 3  # [L, E] skewed, non-negative


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("24GiB", 24 * 2**30),
        ("500MB", 500 * 10**6),
        ("1.5e9", 1_500_000_000),
        ("24G", 24 * 2**30),
        ("2 KiB", 2048),
        ("100", 100),
        (1e6, 1_000_000),
    ],
)
def test_parse_bytes(text, value) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "12 parsecs", "-5GB", "GB", "0"])
def test_parse_bytes_rejects(text) -> None:
    with pytest.raises(UsageError):
        parse_bytes(text)


def test_order_ties_broken_by_lower_id() -> None:
    s = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0]])
    assert expert_order(s).tolist() == [[1, 2, 4, 0, 5, 3]]


def test_keep_k_is_top_k_per_layer() -> None:
    s = scores_le()
    sel = select_experts(s, LAYERS, num_experts=8, routed=2, keep=3)
    for row, layer in enumerate(LAYERS):
        best = set(torch.topk(s[row], 3).indices.tolist())
        assert set(sel.keep.layers[layer]) == best
        assert sel.ranked[layer] == sorted(best, key=lambda e: -float(s[row, e]))
    assert sel.keep.count == 3 and sel.keep.is_uniform
    assert sel.provenance["name"] == "task" and sel.provenance["count"] == 3


def test_coverage_is_smallest_uniform_k_covering_every_layer() -> None:
    s = scores_le(seed=3)
    for c in (0.3, 0.6, 0.9, 0.99):
        sel = select_experts(s, LAYERS, num_experts=8, routed=2, coverage=c)
        k = sel.count
        share = kept_share(s, [sel.keep.layers[la] for la in LAYERS])
        assert float(share.min()) >= c - 1e-9
        if k > 2:  # one fewer would miss the coverage in some layer
            smaller = take(expert_order(s), k - 1)
            assert float(kept_share(s, smaller).min()) < c
    # uniform scores: coverage c needs ceil(c * E) experts
    flat = torch.ones(3, 8)
    assert select_experts(flat, LAYERS, num_experts=8, routed=1, coverage=0.5).count == 4


def test_coverage_never_below_routed() -> None:
    s = torch.zeros(3, 8)
    s[:, 5] = 1.0  # one expert holds everything
    assert select_experts(s, LAYERS, num_experts=8, routed=2, coverage=0.9).count == 2
    assert select_experts(s, LAYERS, num_experts=8, routed=2, coverage=0.9, top_k=1).count == 1


def test_budget_is_largest_k_that_fits() -> None:
    def bytes_for(k: int) -> int:
        return 1000 + 100 * k

    assert budget_count(1550, bytes_for, 8, routed=2) == 5
    assert budget_count(10_000, bytes_for, 8, routed=2) == 8
    sel = select_experts(
        scores_le(), LAYERS, num_experts=8, routed=2, budget="1.55KB", bytes_for=bytes_for
    )
    assert sel.count == 5 and sel.provenance["budget"] == 1550
    with pytest.raises(UsageError, match="smaller than the model without any routed expert"):
        budget_count(999, bytes_for, 8, routed=2)
    with pytest.raises(UsageError, match="fewer than the 2 experts routed"):
        budget_count(1150, bytes_for, 8, routed=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": 1}, "fewer than the 2 experts routed"),
        ({"keep": 9}, "more than the model's 8 experts"),
        ({"keep": 3, "coverage": 0.5}, "exactly one of"),
        ({}, "exactly one of"),
        ({"keep": 3, "top_k": 3}, "--top-k must be between 1"),
        ({"keep": 3, "policy": "best"}, "unknown policy"),
        ({"keep": 3, "merge": "max"}, "unknown merge"),
        ({"coverage": 1.5}, "coverage must be in"),
        ({"keep": 3, "policy": "global"}, "pooled scores"),
    ],
)
def test_bad_options(kwargs, message) -> None:
    with pytest.raises(UsageError, match=message):
        select_experts(scores_le(), LAYERS, num_experts=8, routed=2, **kwargs)


def test_scores_shape_and_nan_refused() -> None:
    with pytest.raises(UsageError, match="expected"):
        select_experts(torch.rand(2, 8), LAYERS, num_experts=8, routed=2, keep=2)
    bad = scores_le()
    bad[1, 3] = float("nan")
    with pytest.raises(UsageError, match="NaN"):
        select_experts(bad, LAYERS, num_experts=8, routed=2, keep=2)


def test_top_k_lowers_routed_count() -> None:
    sel = select_experts(scores_le(), LAYERS, num_experts=8, routed=2, keep=1, top_k=1)
    assert sel.count == 1 and sel.top_k == 1


def test_merge_sum_normalises_each_task_per_layer() -> None:
    a = torch.tensor([[10.0, 0.0, 0.0, 0.0]])  # large raw scale
    b = torch.tensor([[0.0, 0.3, 0.2, 0.5]])
    merged = merge_sum([a, b])
    assert torch.allclose(merged, torch.tensor([[1.0, 0.3, 0.2, 0.5]], dtype=torch.float64))
    sel = select_experts({"a": a, "b": b}, [0], num_experts=4, routed=1, keep=2)
    assert sel.keep.layers[0] == (0, 3)
    assert sel.provenance["merge"] == "sum"
    assert torch.allclose(normalize_rows(torch.zeros(1, 4)), torch.zeros(1, 4, dtype=torch.float64))


def test_merge_union_takes_each_tasks_best_in_turn() -> None:
    a = torch.tensor([[0.5, 0.4, 0.3, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 0.0, 0.1, 0.2, 0.3]])
    assert union_order([expert_order(a), expert_order(b)]).tolist() == [[0, 5, 1, 4, 2, 3]]
    sel = select_experts({"a": a, "b": b}, [0], num_experts=6, routed=1, keep=4, merge="union")
    assert sel.keep.layers[0] == (0, 1, 4, 5)
    assert "union" in sel.provenance["merge_rule"]
    # sum ranks by total normalised mass instead: b's third beats a's second here
    a2 = torch.tensor([[0.9, 0.05, 0.05, 0.0, 0.0, 0.0]])
    b2 = torch.tensor([[0.0, 0.0, 0.0, 0.1, 0.2, 0.7]])
    tasks = {"a": a2, "b": b2}
    summed = select_experts(tasks, [0], num_experts=6, routed=1, keep=4, merge="sum")
    union = select_experts(tasks, [0], num_experts=6, routed=1, keep=4, merge="union")
    assert summed.keep.layers[0] == (0, 3, 4, 5)
    assert union.keep.layers[0] == (0, 1, 4, 5)
    # union coverage: every task covered to C by the union
    cov = select_experts(
        {"a": a, "b": b}, [0], num_experts=6, routed=1, coverage=0.5, merge="union"
    )
    # {0, 5} covers 0.42 of a and 0.5 of b; adding a's second best covers 0.75 of a
    assert cov.keep.layers[0] == (0, 1, 5)
    assert cov.provenance["coverage_min"] == pytest.approx(0.5)


def test_random_is_seeded_and_global_uses_pooled() -> None:
    s = scores_le()
    r1 = select_experts(s, LAYERS, num_experts=8, routed=2, keep=4, policy="random", seed=7)
    r2 = select_experts(s, LAYERS, num_experts=8, routed=2, keep=4, policy="random", seed=7)
    r3 = select_experts(s, LAYERS, num_experts=8, routed=2, keep=4, policy="random", seed=8)
    assert r1.keep == r2.keep and r1.keep != r3.keep
    assert r1.provenance["seed"] == 7 and r1.scores is None
    assert sorted(random_order(2, 8, 1)[0].tolist()) == list(range(8))
    pooled = scores_le(seed=11)
    g = select_experts(s, LAYERS, num_experts=8, routed=2, keep=3, policy="global", pooled=pooled)
    assert g.keep == select_experts(pooled, LAYERS, num_experts=8, routed=2, keep=3).keep
    # baselines at matched K: the count comes from the task scores' coverage
    cov_task = select_experts(s, LAYERS, num_experts=8, routed=2, coverage=0.8)
    cov_rand = select_experts(s, LAYERS, num_experts=8, routed=2, coverage=0.8, policy="random")
    assert cov_rand.count == cov_task.count
    assert cov_rand.provenance["count_from"] == "coverage of the task scores"


def test_groups_keep_the_same_count_per_group() -> None:
    s = torch.zeros(1, 8)
    s[0, :4] = torch.tensor([0.9, 0.8, 0.7, 0.6])  # group 0 holds all of the best experts
    s[0, 4:] = torch.tensor([0.05, 0.04, 0.03, 0.02])
    groups = (2, 1)
    sel = select_experts(s, [3], num_experts=8, routed=2, keep=4, groups=groups)
    assert sel.keep.layers[3] == (0, 1, 4, 5)  # 2 per group, best of each group
    assert sel.provenance["group_selection"] == "per group"
    assert group_exact_possible(4, 8, groups, 2)
    assert not group_exact_possible(3, 8, groups, 2)
    assert not group_exact_possible(2, 8, groups, 2)  # one per group: group score needs 2
    assert not group_exact_possible(4, 8, (2, 1), 3)  # one group of 2 cannot supply top-3


def test_groups_fall_back_with_warning(caplog) -> None:
    s = scores_le(n_layers=1)
    with caplog.at_level(logging.WARNING, logger="premoe.policy"):
        sel = select_experts(s, [3], num_experts=8, routed=2, keep=3, groups=(2, 1))
    assert sel.keep.layers[3] == tuple(sorted(expert_order(s)[0, :3].tolist()))
    assert sel.provenance["group_selection"] == "global"
    assert "one group" in caplog.text


def test_groups_coverage_and_budget_prefer_exact_counts() -> None:
    s = torch.ones(1, 8)
    # coverage 0.35 of a flat layer: 3 experts, but 3 is not exact with 2 groups; 4 is
    assert select_experts(s, [0], num_experts=8, routed=2, coverage=0.35).count == 3
    sel = select_experts(s, [0], num_experts=8, routed=2, coverage=0.35, groups=(2, 1))
    assert sel.count == 4
    assert budget_count(1000 + 700, lambda k: 1000 + 100 * k, 8, routed=2, groups=(2, 1)) == 6
    assert (
        budget_count(
            1700, lambda k: 1000 + 100 * k, 8, routed=2, groups=(2, 1), prefer_exact_groups=False
        )
        == 7
    )


def test_coverage_refuses_negative_scores() -> None:
    s = scores_le() - 0.5
    with pytest.raises(UsageError, match="non-negative"):
        select_experts(s, LAYERS, num_experts=8, routed=2, coverage=0.5)
    # keep works on any ranking
    assert select_experts(s, LAYERS, num_experts=8, routed=2, keep=2).count == 2


def test_coverage_count_direct() -> None:
    s = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert coverage_count(0.5, expert_order(s), [s], routed=1) == 2  # layer 1 needs 2
    assert coverage_count(0.8, expert_order(s), [s], routed=1) == 4  # layer 1 needs 4
