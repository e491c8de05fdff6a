"""Export and plan from a pattern store: policies on the task scores, provenance, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from premoe.errors import StoreMismatchError, UsageError
from premoe.export import export_from_store
from premoe.patterns.store import PatternStore
from premoe.plan import plan
from premoe.policy import expert_order, kept_share, merge_sum
from tests.export.conftest import task_scores


def test_task_keep_exports_the_top_experts(tiny_checkpoint, make_store, tmp_path) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    store = make_store(folder)
    math = PatternStore.load(store).scores("math")  # [L, E]
    result = export_from_store(folder, store, ["math"], tmp_path / "out", keep=3)
    prov = json.loads((tmp_path / "out" / "premoe.json").read_text())
    for row, layer in enumerate([0, 1]):
        top = sorted(torch.topk(math[row], 3).indices.tolist())
        assert prov["keep"][str(layer)] == top
        assert prov["ranked"][str(layer)] == expert_order(math)[row, :3].tolist()
    assert prov["tasks"] == ["math"] and prov["metric"] == "tcess"
    assert prov["store"]["path"] == str(store)
    assert prov["policy"]["name"] == "task" and prov["policy"]["keep"] == 3
    assert prov["source"]["fingerprint"]["router_hash"]
    assert result.keep_count == 3


def test_coverage_from_store(tiny_checkpoint, make_store, tmp_path) -> None:
    folder = tiny_checkpoint("olmoe")
    store = make_store(folder)
    result = export_from_store(folder, store, ["code"], tmp_path / "out", coverage=0.8)
    code = PatternStore.load(store).scores("code")
    kept = [list(result.provenance["keep"][str(n)]) for n in (0, 1)]
    assert float(kept_share(code, kept).min()) >= 0.8
    assert result.provenance["policy"]["coverage_min"] >= 0.8
    assert result.provenance["policy"]["count_from"] == "coverage of the task scores"


@pytest.mark.parametrize("merge", ["sum", "union"])
def test_two_tasks_merge(tiny_checkpoint, make_store, tmp_path, merge) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    store = make_store(folder)
    result = export_from_store(
        folder, store, ["math", "code"], tmp_path / "out", keep=4, merge=merge
    )
    policy = result.provenance["policy"]
    assert policy["merge"] == merge and merge in policy["merge_rule"]
    loaded = PatternStore.load(store)
    if merge == "sum":
        merged = merge_sum([loaded.scores("math"), loaded.scores("code")])
        expect = sorted(expert_order(merged)[0, :4].tolist())
        assert result.provenance["keep"]["0"] == expect
    else:  # round-robin: each task's best two experts of layer 0 are kept
        for task in ("math", "code"):
            best = expert_order(loaded.scores(task))[0, :2].tolist()
            assert set(best) <= set(result.provenance["keep"]["0"])


def test_global_and_random_baselines(tiny_checkpoint, make_store, tmp_path) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    store = make_store(folder)
    g = export_from_store(folder, store, [], tmp_path / "g", keep=3, policy="global")
    pooled = PatternStore.load(store).pooled_scores("tcess")
    assert g.provenance["keep"]["1"] == sorted(expert_order(pooled)[1, :3].tolist())
    r = export_from_store(
        folder, store, ["math"], tmp_path / "r", coverage=0.9, policy="random", seed=3
    )
    t = export_from_store(folder, store, ["math"], tmp_path / "t", coverage=0.9)
    assert r.keep_count == t.keep_count  # baseline at the task's count
    assert r.provenance["policy"]["seed"] == 3


def test_budget_from_store(tiny_checkpoint, make_store, tmp_path) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    store = make_store(folder)
    p = plan(folder, budget=plan(folder).row(4).resident_bytes)
    result = export_from_store(
        folder, store, ["math"], tmp_path / "out", budget=p.row(4).resident_bytes
    )
    assert p.fits == result.keep_count == 4
    assert result.tensor_bytes <= p.budget


def test_unknown_task_and_metric(tiny_checkpoint, make_store, tmp_path) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    store = make_store(folder)
    with pytest.raises(UsageError, match="task 'poetry' is not in the store; it has math, code"):
        export_from_store(folder, store, ["poetry"], tmp_path / "out", keep=2)
    with pytest.raises(UsageError, match="metric 'reap' is not in the store"):
        export_from_store(folder, store, ["math"], tmp_path / "out", keep=2, metric="reap")
    assert not (tmp_path / "out").exists()


def test_store_of_another_model(tiny_checkpoint, make_store, tmp_path) -> None:
    store = make_store(tiny_checkpoint("qwen3_moe", seed=0))
    other = tiny_checkpoint("qwen3_moe", seed=1)  # same shapes, other router weights
    parent = tmp_path / "exports"
    parent.mkdir()
    with pytest.raises(StoreMismatchError, match="made for another model"):
        export_from_store(other, store, ["math"], parent / "out", keep=2)
    with pytest.raises(StoreMismatchError):
        plan(other, store=store, tasks=["math"])
    assert list(parent.iterdir()) == []


def test_plan_with_store_reports_coverage(tiny_checkpoint, make_store) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    scores = {"math": task_scores(2, 8, 5), "code": task_scores(2, 8, 6)}
    store = make_store(folder, scores)
    p = plan(folder, store=store, tasks=["math"])
    math = scores["math"]
    for row in p.rows:
        kept = [expert_order(math)[n, : row.keep].tolist() for n in range(2)]
        share = kept_share(math, kept)
        assert row.coverage_min == pytest.approx(float(share.min()))
        assert row.coverage_mean == pytest.approx(float(share.mean()))
    assert p.row(8).coverage_min == pytest.approx(1.0)
    pooled = plan(folder, store=store)
    assert pooled.rows[0].coverage_min is not None and pooled.tasks == []


def test_group_limited_router_keeps_groups_exact(tiny_checkpoint, make_store, tmp_path) -> None:
    """deepseek_v3 (n_group=2 of 4 experts): keep 4 = the best 2 of each group, exact; keep 3
    falls back to one group, recorded in premoe.json and config.json."""
    folder = tiny_checkpoint("deepseek_v3")
    store = make_store(folder)
    scores = PatternStore.load(store).scores("math")  # [L, E]
    exact = export_from_store(folder, store, ["math"], tmp_path / "exact", keep=4)
    assert exact.group_plan.exact
    assert exact.provenance["policy"]["group_selection"] == "per group"
    for row, layer in enumerate(exact.provenance["keep"]):
        kept = exact.provenance["keep"][layer]
        for g in (0, 1):
            block = scores[row, 4 * g : 4 * g + 4]
            assert sorted(kept)[2 * g : 2 * g + 2] == sorted(
                (torch.topk(block, 2).indices + 4 * g).tolist()
            )
    config = json.loads((tmp_path / "exact" / "config.json").read_text())
    assert config["n_group"] == 2 and config["n_routed_experts"] == 4
    fallback = export_from_store(folder, store, ["math"], tmp_path / "fb", keep=3)
    assert not fallback.group_plan.exact
    assert fallback.provenance["groups"]["exact"] is False
    assert json.loads((tmp_path / "fb" / "config.json").read_text())["n_group"] == 1
