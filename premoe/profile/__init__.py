"""Profiling: measure per task how much each expert of each MoE layer is used (TCESS etc.)."""

from __future__ import annotations

from premoe.profile.api import profile
from premoe.profile.corpus import TaskCorpus, load_task, parse_task_specs, read_texts
from premoe.profile.metrics import METRICS, Routing, RoutingRule, route_from_logits
from premoe.profile.profiler import (
    ModelHandle,
    ProgressInfo,
    load_causal_lm,
    load_tokenizer,
    run_profile,
)

__all__ = [
    "METRICS",
    "ModelHandle",
    "ProgressInfo",
    "Routing",
    "RoutingRule",
    "TaskCorpus",
    "load_causal_lm",
    "load_task",
    "load_tokenizer",
    "parse_task_specs",
    "profile",
    "read_texts",
    "route_from_logits",
    "run_profile",
]
