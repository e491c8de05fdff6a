"""Evaluation: what pruning costs in accuracy (or perplexity), per task, method and keep count.

- `premoe.eval.harness`: score one model on one eval set (greedy exact match or perplexity).
- `premoe.eval.runner`: `evaluate(model, store, tasks, keeps=, methods=, ...) -> EvalReport`.
- `premoe.eval.plots`: PNG plots of an `EvalReport` and of a pattern store (matplotlib, loaded
  only when a plot is asked for).
"""

from __future__ import annotations

from premoe.eval.harness import (
    EvalSet,
    Score,
    accuracy,
    demo_eval_set,
    eval_set_from_rows,
    greedy_answers,
    load_eval_set,
    perplexity,
    score,
)
from premoe.eval.runner import (
    METHODS,
    EvalProgress,
    EvalReport,
    EvalRow,
    RoutingReport,
    evaluate,
    method_keep,
    routing_accuracy,
)

__all__ = [
    "METHODS",
    "EvalProgress",
    "EvalReport",
    "EvalRow",
    "EvalSet",
    "RoutingReport",
    "Score",
    "accuracy",
    "demo_eval_set",
    "eval_set_from_rows",
    "evaluate",
    "greedy_answers",
    "load_eval_set",
    "method_keep",
    "perplexity",
    "routing_accuracy",
    "score",
]
