"""`premoe eval` reports the dropped mass of every in-process pruned model (issue 18)."""

from __future__ import annotations

from premoe.eval.runner import evaluate
from tests.eval.conftest import TASKS


def test_eval_reports_dropped_mass_per_task_and_keep(eval_model, eval_store, eval_suite) -> None:
    report = evaluate(
        eval_model,
        eval_store,
        list(TASKS),
        keeps=[2, 8],
        methods="tcess,routed",
        eval_sets={t: eval_suite[t]["eval"] for t in TASKS},
        max_samples=8,
        device="cpu",
        threads=1,
    )
    for t in TASKS:
        for m in ("tcess", "routed"):
            low, all_kept = report.row(t, m, 2), report.row(t, m, 8)
            assert low.dropped_mass is not None and 0.0 < low.dropped_mass <= 1.0
            assert all_kept.dropped_mass == 0.0  # 8 of 8 experts: nothing is dropped
            assert low.to_json()["dropped_mass"] == low.dropped_mass
