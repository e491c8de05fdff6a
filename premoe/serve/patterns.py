"""From a pattern store to what the server serves: one keep set per pattern, and a router.

Every task of the store becomes a pattern (its top-K experts per layer by the store's metric),
plus `__global__` (all tasks pooled), the fallback for queries that match no task well. K is
uniform over patterns, so that any pattern fits the same resident slots: `--keep K`, or the
largest K whose resident weights fit `--budget`.

`allocation="nonuniform"` (`--allocation nonuniform`) spreads the same total, K experts times
the number of MoE layers, over the layers by each pattern's scores (`premoe.policy.
select_nonuniform`: more experts where a layer's scores are spread, fewer where they are
concentrated). Such ragged patterns are served from the union of the patterns resident (mixed
mode, rowmask.py); swapping needs the same count in every layer of every pattern.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from premoe.errors import UsageError
from premoe.fingerprint import fingerprint_source
from premoe.load import keep_for_budget
from premoe.patterns import GLOBAL
from premoe.plan import open_store, store_scores
from premoe.policy import select_experts, select_nonuniform
from premoe.prune import KeepSets
from premoe.route import QueryKeyer, route
from premoe.serve.requests import RouteInfo
from premoe.source import ModelSource

if TYPE_CHECKING:
    from premoe.patterns import PatternStore
    from premoe.serve.requests import RouteInfo

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "nonuniform")


def check_allocation(allocation: str) -> None:
    if allocation not in ALLOCATIONS:
        raise UsageError(f"--allocation must be uniform or nonuniform, got {allocation!r}")


def keep_count(
    source: ModelSource,
    keep: int | None,
    budget: str | int | None,
    dtype: torch.dtype,
    quantize: Any = None,
) -> int:
    if keep is not None and budget is not None:
        raise UsageError("give --keep or --budget, not both")
    if keep is not None:
        return int(keep)
    if budget is None:
        raise UsageError(
            "give --keep K (experts kept per layer) or --budget SIZE (e.g. --budget 24GiB)"
        )

    return keep_for_budget(source, budget, dtype, quantize=quantize)


def build_patterns(
    store_path: str | Path,
    source: ModelSource,
    *,
    keep: int | None,
    budget: str | int | None,
    dtype: torch.dtype,
    metric: str | None = None,
    quantize: Any = None,
    allocation: str = "uniform",
) -> tuple[PatternStore, dict[str, KeepSets], dict[str, Any]]:
    """(store, pattern name -> keep sets, provenance) for serving `source` from a store.

    `allocation`: uniform (K experts in every layer) or nonuniform (ragged keep sets, the same
    K x layers experts in all, distributed by each pattern's scores)."""

    check_allocation(allocation)
    store = open_store(store_path, fingerprint_source(source))
    metric = metric or store.default_metric
    store_scores(store, [], metric)  # an unknown metric: a usage error
    k = keep_count(source, keep, budget, dtype, quantize)
    common: dict[str, Any] = {
        "num_experts": source.num_experts,
        "routed": source.top_k,
        "keep": k,
        "groups": source.arch.groups(source.config),
    }
    layers = store.moe_layers
    patterns: dict[str, KeepSets] = {}
    for task in store.task_names:
        patterns[task] = select_experts(store.scores(task, metric), layers, **common).keep
    patterns[GLOBAL] = select_experts(
        None, layers, policy="global", pooled=store.pooled_scores(metric), **common
    ).keep
    if allocation == "nonuniform":  # the uniform selection above checked K
        for name in patterns:
            scores = store.pooled_scores(metric) if name == GLOBAL else store.scores(name, metric)
            patterns[name] = select_nonuniform(
                scores,
                layers,
                total=k * len(layers),
                routed=source.top_k,
                cap=source.num_experts,
            )
    info = {
        "path": str(store_path),
        "metric": metric,
        "keep": k,
        "allocation": allocation,
        "budget": budget,
        "key": dict(store.key),
    }
    return store, patterns, info


def make_router(
    store: PatternStore,
    model: Any,
    tokenizer: Any,
    source: ModelSource,
    threshold: float | None = None,
) -> Callable[[str], RouteInfo] | None:
    """prompt -> RouteInfo with the store's keys (TAER), or None when the store's key kind cannot
    be computed on the resident model."""
    if store.key.get("kind") != "router_input":
        # a tcess key needs the first MoE router's scores over all E experts; the resident
        # model's router has only the kept rows
        log.warning(
            "the store's routing key is %r, which needs the full router; the server computes "
            "router_input keys only (re-profile with --key router_input). Requests that do not "
            "name a pattern get the default pattern",
            store.key.get("kind"),
        )
        return None
    # the store was checked against the source checkpoint; the resident model is pruned, so
    # its own fingerprint differs by design
    keyer = QueryKeyer.for_store(store, model, tokenizer, check=False)
    extra = {} if threshold is None else {"threshold": threshold}

    def fn(prompt: str) -> RouteInfo:
        res = route(store, keyer, prompt, **extra)
        return RouteInfo(str(res.task), float(res.similarity), bool(res.fallback), True)

    return fn
