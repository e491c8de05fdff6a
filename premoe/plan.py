"""`plan`: what a pruned model costs per keep count, and what fits a budget, from the checkpoint
headers alone (sizes from `premoe.sizes`); with a pattern store, the share of the task's scores
each keep count covers; with a budget, the largest K per expert precision and a recommendation.

Shape legend: L MoE layers, E routed experts per layer, K experts kept per layer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import premoe
from premoe.errors import StoreMismatchError, UsageError
from premoe.fingerprint import fingerprint_source
from premoe.io import DEFAULT_MAX_SHARD_BYTES
from premoe.patterns.store import PatternStore
from premoe.policy import (
    budget_count,
    expert_order,
    group_exact_possible,
    human_bytes,
    kept_share,
    merge_sum,
    parse_bytes,
    take,
    union_order,
)
from premoe.prune.engines import engine_constraints
from premoe.sizes import (  # noqa: F401  (re-exported: plan's public names)
    PRECISIONS,
    Entry,
    ResidentSizes,
    SizeModel,
    keep_for_budget,
    read_header,
    resident_sizes,
    shard_metadata,
)
from premoe.source import ModelSource, resolve_model

log = logging.getLogger(__name__)


# ---- the store (contract of premoe.patterns.store) -----------------------------------------------


def open_store(store: Any, fingerprint: dict[str, Any] | None = None) -> Any:
    """A `PatternStore` from a path (or as given), checked against `fingerprint` if given."""
    if isinstance(store, str | Path):
        store = PatternStore.load(store)
    if fingerprint is not None:
        store.check_model(fingerprint)
    return store


def store_scores(
    store: Any, tasks: Sequence[str], metric: str = "tcess"
) -> dict[str, torch.Tensor]:
    """`{task: [L, E] scores}` from a store; unknown tasks and metrics are usage errors."""
    metrics = list(store.metrics)
    if metric not in metrics:
        raise UsageError(
            f"metric {metric!r} is not in the store; it has {', '.join(metrics) or 'none'}"
        )
    names = list(store.task_names)
    unknown = [t for t in tasks if t not in names]
    if unknown:
        raise UsageError(
            f"task {unknown[0]!r} is not in the store; it has {', '.join(names) or 'no tasks'}"
        )
    if len(set(tasks)) != len(tasks):
        raise UsageError(f"task given twice in {list(tasks)}")
    return {t: store.scores(t, metric=metric) for t in tasks}


def check_store_layers(store: Any, src: ModelSource) -> None:
    if list(store.moe_layers) != list(src.moe_layers) or int(store.num_experts) != src.num_experts:
        raise StoreMismatchError(
            f"the store has layers {list(store.moe_layers)} x {store.num_experts} experts, the "
            f"model {src.moe_layers} x {src.num_experts}; profile this model to make a store"
        )


# ---- plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanRow:
    keep: int
    expert_bytes: int
    non_expert_bytes: int
    resident_bytes: int
    file_bytes: int  # predicted exported *.safetensors size
    fraction: float  # resident / full model
    group_exact: bool
    coverage_min: float | None = None
    coverage_mean: float | None = None
    engine_ok: bool = True  # vLLM/SGLang accept this K (`premoe.prune.engines`)


@dataclass(frozen=True)
class PrecisionRow:
    """At one expert precision: the largest keep count within the budget and what it keeps."""

    precision: str  # "source" | "fp8" | "int4"
    expert_per_k: int  # bytes of one kept expert, summed over MoE layers
    keep: int | None  # largest K within the budget; None when not even top-k fits
    resident_bytes: int | None
    coverage_min: float | None = None
    coverage_mean: float | None = None


@dataclass(frozen=True)
class Plan:
    model: str
    family: str
    num_experts: int
    top_k: int  # routed count of the pruned model
    moe_layers: list[int]
    full_bytes: int
    expert_per_k: int
    router_per_k: int
    fixed_bytes: int
    rows: list[PlanRow]
    budget: int | None = None
    fits: int | None = None  # largest K within the budget
    tasks: list[str] | None = None
    metric: str | None = None
    precisions: list[PrecisionRow] | None = None  # with a budget and `precisions`
    recommended: PrecisionRow | None = None
    dtype: str | None = None  # resident bytes in this load dtype (None: the checkpoint's bytes)
    engines: dict[str, Any] | None = None  # engine constraints of `fits` (with a budget)

    def row(self, keep: int) -> PlanRow:
        return next(r for r in self.rows if r.keep == keep)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["premoe_version"] = premoe.__version__
        return data


def keep_ladder(routed: int, num_experts: int, extra: Sequence[int] = ()) -> list[int]:
    """top-k, the powers of two between, E, and any `extra` counts."""
    ks = {routed, num_experts, *extra}
    p = 1
    while p < num_experts:
        if p > routed:
            ks.add(p)
        p *= 2
    return sorted(k for k in ks if routed <= k <= num_experts)


def plan(
    model: str | Path | ModelSource,
    *,
    store: Any = None,
    tasks: Sequence[str] = (),
    metric: str = "tcess",
    merge: str = "sum",
    budget: int | str | None = None,
    top_k: int | None = None,
    keeps: Sequence[int] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    precisions: Sequence[str] = (),
    dtype: torch.dtype | None = None,
) -> Plan:
    """Resident bytes per keep count (a ladder of K plus `keeps`), from checkpoint headers.

    With `store`, each row also gives the kept share of the scores (min and mean over layers)
    of `tasks` (merged by `merge`), or of all tasks pooled when no task is given. With
    `budget`, `Plan.fits` is the largest K that fits (and is added to the rows).

    With `budget` and `precisions` (a subset of `PRECISIONS`), `Plan.precisions` gives, per
    expert precision, the largest K that fits the same budget and the score coverage it keeps
    (K / E without a store), and `Plan.recommended` the choice: the highest precision whose
    mean coverage is within `RECOMMEND_SLACK` of the best (quantization error is invisible to
    coverage, so precision breaks near-ties). A budget that only a quantized precision fits is
    then no error (`fits` is None).

    `dtype`: count resident bytes as premoe's loader holds them in that dtype (`load`,
    `generate`, `serve --budget` use the same numbers, so one budget gives one K everywhere);
    None counts the checkpoint's own bytes (what an export and an engine hold). Every row says
    whether vLLM/SGLang accept its K; `engines` details the constraints of `fits`.
    """
    src = model if isinstance(model, ModelSource) else resolve_model(model)
    try:
        sizes = SizeModel.from_source(src)
        dense = sizes.at_dtype(dtype) if dtype is not None else None
        resident_of = sizes.resident if dense is None else dense.resident

        def resident_at(k: int, precision: str) -> int:
            return resident_of(k) if precision == "source" else sizes.resident_at(k, precision)

        e, routed = src.num_experts, src.top_k
        if top_k is not None and not 1 <= top_k <= routed:
            raise UsageError(f"--top-k must be between 1 and the model's {routed}, got {top_k}")
        k_routed = routed if top_k is None else top_k
        groups = src.arch.groups(src.config)
        bad = [k for k in keeps if not k_routed <= k <= e]
        if bad:
            raise UsageError(f"keep counts {bad} are outside {k_routed}..{e} (top-k..experts)")
        unknown = [p for p in precisions if p not in PRECISIONS]
        if unknown:
            raise UsageError(f"unknown precision {unknown[0]!r}; use {', '.join(PRECISIONS)}")
        fits = None
        budget_bytes = None
        prec_fits: dict[str, int | None] = {}
        if budget is not None:
            budget_bytes = parse_bytes(budget)
            for prec in precisions:
                try:
                    prec_fits[prec] = budget_count(
                        budget_bytes,
                        lambda k, prec=prec: resident_at(k, prec),
                        e,
                        routed=k_routed,
                        groups=groups,
                    )
                except UsageError:
                    prec_fits[prec] = None
            if not any(prec_fits.values()) or "source" not in precisions or dense is not None:
                fits = budget_count(budget_bytes, resident_of, e, routed=k_routed, groups=groups)
            else:
                fits = prec_fits.get("source")
        cover_scores: list[torch.Tensor] = []
        order = None
        if store is not None:
            store = open_store(store, fingerprint_source(src))
            check_store_layers(store, src)
            if tasks:
                by_task = store_scores(store, tasks, metric)
                if merge == "union" and len(by_task) > 1:
                    order = union_order([expert_order(s) for s in by_task.values()])
                    cover_scores = list(by_task.values())
                else:
                    merged = merge_sum(list(by_task.values()))
                    order, cover_scores = expert_order(merged), [merged]
            else:
                store_scores(store, [], metric)  # checks the metric
                pooled = store.pooled_scores(metric)
                order, cover_scores = expert_order(pooled), [pooled]

        def coverage(k: int) -> tuple[float | None, float | None]:
            if order is None:
                return None, None
            kept = take(order, k, groups=groups, routed=k_routed)
            share = torch.stack([kept_share(s, kept) for s in cover_scores]).min(dim=0)
            return float(share.values.min()), float(share.values.mean())

        rows = []
        for k in keep_ladder(k_routed, e, [*keeps, *([fits] if fits else [])]):
            cov_min, cov_mean = coverage(k)
            resident = resident_of(k)
            experts = (
                sizes.expert_bytes(k)
                if dense is None
                else k * dense.expert_bytes * dense.moe_layers
            )
            rows.append(
                PlanRow(
                    keep=k,
                    expert_bytes=experts,
                    non_expert_bytes=resident - experts,
                    resident_bytes=resident,
                    file_bytes=sizes.file_bytes(k, max_shard_bytes=max_shard_bytes),
                    fraction=resident / resident_of(e),
                    group_exact=group_exact_possible(k, e, groups, k_routed),
                    coverage_min=cov_min,
                    coverage_mean=cov_mean,
                    engine_ok=engine_constraints(src.arch, src.config, k, k_routed)["ok"],
                )
            )
        if fits is not None:
            log.info("largest keep count within %s: %d", human_bytes(budget_bytes or 0), fits)
        prec_rows: list[PrecisionRow] | None = None
        recommended = None
        if prec_fits:
            prec_rows = []
            for prec, k in prec_fits.items():
                cov_min, cov_mean = coverage(k) if k else (None, None)
                prec_rows.append(
                    PrecisionRow(
                        precision=prec,
                        expert_per_k=dense.expert_bytes * dense.moe_layers
                        if dense is not None and prec == "source"
                        else sizes.expert_per_k_at(prec),
                        keep=k,
                        resident_bytes=resident_at(k, prec) if k else None,
                        coverage_min=cov_min,
                        coverage_mean=cov_mean,
                    )
                )
            recommended = recommend(prec_rows, e)
        return Plan(
            model=str(src.path),
            family=src.arch.name,
            num_experts=e,
            top_k=k_routed,
            moe_layers=list(src.moe_layers),
            full_bytes=resident_of(e),
            expert_per_k=sizes.expert_per_k,
            router_per_k=sizes.router_per_k,
            fixed_bytes=sizes.fixed_bytes,
            rows=rows,
            budget=budget_bytes,
            fits=fits,
            tasks=list(tasks) if store is not None else None,
            metric=metric if store is not None else None,
            precisions=prec_rows,
            recommended=recommended,
            dtype=None if dtype is None else str(dtype).removeprefix("torch."),
            engines=None if not fits else engine_constraints(src.arch, src.config, fits, k_routed),
        )
    finally:
        if not isinstance(model, ModelSource):
            src.close()


RECOMMEND_SLACK = 0.01  # mean coverage a higher precision may give up and still be recommended


def recommend(rows: Sequence[PrecisionRow], num_experts: int) -> PrecisionRow | None:
    """The highest-precision row whose mean coverage (K / E without a store) is within
    `RECOMMEND_SLACK` of the best row's; rows are given from highest to lowest precision."""
    fitting = [r for r in rows if r.keep]
    if not fitting:
        return None

    def score(r: PrecisionRow) -> float:
        return r.coverage_mean if r.coverage_mean is not None else (r.keep or 0) / num_experts

    best = max(score(r) for r in fitting)
    return next(r for r in fitting if score(r) >= best - RECOMMEND_SLACK)


__all__ = [
    "PRECISIONS",
    "RECOMMEND_SLACK",
    "Entry",
    "Plan",
    "PlanRow",
    "PrecisionRow",
    "SizeModel",
    "check_store_layers",
    "keep_ladder",
    "open_store",
    "plan",
    "read_header",
    "recommend",
    "shard_metadata",
    "store_scores",
]
