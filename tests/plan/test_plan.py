"""`plan`: sizes per keep count from headers, equal to what export writes."""

from __future__ import annotations

import json

import pytest

from premoe.errors import UsageError
from premoe.export import export_pruned
from premoe.plan import SizeModel, keep_ladder, plan
from premoe.prune import KeepSets
from premoe.source import resolve_model


def test_ladder() -> None:
    assert keep_ladder(8, 128) == [8, 16, 32, 64, 128]
    assert keep_ladder(2, 8) == [2, 4, 8]
    assert keep_ladder(6, 64, [20]) == [6, 8, 16, 20, 32, 64]
    assert keep_ladder(2, 6) == [2, 4, 6]


def test_plan_rows_are_linear_and_reads_no_tensor(tiny_checkpoint) -> None:
    src = resolve_model(tiny_checkpoint("deepseek_v3"))
    p = plan(src)
    assert src.reader.bytes_read == 0  # headers only
    assert [r.keep for r in p.rows] == [2, 4, 8]
    full = p.row(8)
    assert full.resident_bytes == p.full_bytes and full.fraction == 1.0
    for r in p.rows:
        assert r.resident_bytes == r.expert_bytes + r.non_expert_bytes
        assert r.expert_bytes == r.keep * p.expert_per_k
        assert r.non_expert_bytes == p.fixed_bytes + r.keep * p.router_per_k
    assert p.row(4).group_exact and not p.row(2).group_exact  # n_group=2: 1 per group
    data = p.to_json()
    json.dumps(data)
    assert data["family"] == "deepseek_v3" and data["premoe_version"]


def test_budget_answers_largest_k(tiny_checkpoint) -> None:
    src = resolve_model(tiny_checkpoint("qwen3_moe"))
    sizes = SizeModel.from_source(src)
    budget = sizes.resident(5) + 10
    p = plan(src, budget=budget)
    assert p.fits == 5 and 5 in [r.keep for r in p.rows]
    assert plan(src, budget=sizes.resident(8)).fits == 8
    with pytest.raises(UsageError, match="smaller than the model without any routed expert"):
        plan(src, budget=sizes.fixed_bytes - 1)
    with pytest.raises(UsageError, match="fits fewer than the 2 experts"):
        plan(src, budget=sizes.resident(1))
    assert plan(src, budget=sizes.resident(1), top_k=1).fits == 1


@pytest.mark.parametrize(
    ("family", "layout", "k"),
    [("qwen3_moe", "original", 2), ("gpt_oss", "original", 3), ("mixtral", "fused", 5)],
)
def test_prediction_equals_export_size(family, layout, k, tiny_checkpoint, tmp_path) -> None:
    src = resolve_model(tiny_checkpoint(family, layout))
    p = plan(src, keeps=[k])
    row = p.row(k)
    result = export_pruned(src, KeepSets.uniform(src.moe_layers, range(k)), tmp_path / "out")
    files = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert result.tensor_bytes == row.resident_bytes
    assert files == pytest.approx(row.file_bytes, rel=0.01)
    assert abs(files - row.file_bytes) <= 0.001 * files  # in practice much closer than 1%


def test_one_budget_gives_one_keep_count_everywhere(tiny_checkpoint) -> None:
    """`plan --dtype D --budget B` and the loader/serve budget path (`keep_for_budget`) use the
    one size model, so they give the same K for every dtype (issue: architecture)."""
    import torch

    from premoe.load import keep_for_budget, load_pruned_with_info
    from premoe.plan import SizeModel, plan
    from premoe.prune import KeepSets
    from premoe.source import resolve_model

    src = resolve_model(tiny_checkpoint("qwen3_moe"))
    sizes = SizeModel.from_source(src)
    for dtype in (torch.float32, torch.bfloat16):
        dense = sizes.at_dtype(dtype)
        budget = dense.resident(5) + 1
        p = plan(src, budget=budget, dtype=dtype)
        assert p.fits == keep_for_budget(src, budget, dtype) == 5
        assert p.row(5).resident_bytes == dense.resident(5)
        keep = KeepSets.uniform(src.moe_layers, range(5))
        _, info = load_pruned_with_info(src, keep, dtype=dtype)
        assert info.param_bytes == dense.resident(5)  # what the loader really holds
    assert plan(src, budget=sizes.resident(5) + 1).fits == 5  # the checkpoint's own bytes
    src.close()
