"""Non-uniform allocation under a total budget: more experts where a layer's scores are spread."""

from __future__ import annotations

import pytest
import torch

from premoe.errors import UsageError
from premoe.policy import allocate_counts, select_nonuniform


def test_spread_layers_get_more() -> None:
    peaked = torch.tensor([10.0, 1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    flat = torch.ones(8)
    counts = allocate_counts(torch.stack([peaked, flat]), 8, routed=2)
    assert sum(counts) == 8 and counts[1] > counts[0] >= 2


def test_uniform_scores_split_evenly_and_bounds() -> None:
    counts = allocate_counts(torch.ones(3, 8), 12, routed=2)
    assert counts == [4, 4, 4]
    assert allocate_counts(torch.rand(3, 8), 24, routed=2) == [8, 8, 8]
    with pytest.raises(UsageError):
        allocate_counts(torch.ones(3, 8), 5, routed=2)
    with pytest.raises(UsageError):
        allocate_counts(torch.ones(3, 8), 25, routed=2)


def test_select_nonuniform_keeps_each_layers_top() -> None:
    s = torch.tensor([[5.0, 4, 0, 0], [1, 1, 1, 1.5]])
    keep = select_nonuniform(s, [3, 7], 5, routed=2)
    assert keep.layers[3] == (0, 1)
    assert len(keep.layers[7]) == 3 and 3 in keep.layers[7]
    assert not keep.is_uniform
