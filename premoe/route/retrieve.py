"""Route a query to the stored pattern that fits it (TAER), with a fallback.

`route(store, keyer, prompt)` computes the query's key (`QueryKeyer`, no expert involved),
searches the store (its FAISS index, or exactly on the model's GPU when the model is on one) and
returns the best task, its similarity and the runners-up. When the best similarity is below
`threshold` (or nothing matched), the configurable fallback pattern is returned instead, with
``fallback=True``; the default fallback is the pooled pattern of all tasks, `GLOBAL`
(``"__global__"``), whose scores are `PatternStore.pooled_scores`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from premoe.errors import StoreError, UsageError
from premoe.patterns.store import GLOBAL, PatternStore
from premoe.route.keys import QueryKeyer

DEFAULT_THRESHOLD = 0.0
"""Default similarity below which a query gets the fallback pattern (see `route`)."""


@dataclass
class Candidate:
    task: str
    similarity: float


@dataclass
class RouteResult:
    """The pattern a query routes to. JSON: `to_json()` (the `premoe route --json` contract)."""

    task: str
    similarity: float
    fallback: bool
    candidates: list[Candidate] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "similarity": float(self.similarity),
            "fallback": bool(self.fallback),
            "candidates": [asdict(c) for c in self.candidates],
        }


def check_fallback(store: PatternStore, fallback: str | None) -> None:
    if fallback is not None and fallback != GLOBAL and fallback not in store.tasks:
        raise StoreError(
            f"fallback pattern {fallback!r} is not in the store; use {GLOBAL!r} or one of: "
            f"{', '.join(store.tasks)}"
        )


def route_key(
    store: PatternStore,
    key: Any,
    *,
    threshold: float | None = None,
    fallback: str | None = GLOBAL,
    top: int = 5,
) -> RouteResult:
    """Route a precomputed key [D] (see `route`)."""
    check_fallback(store, fallback)
    if top < 1:
        raise UsageError(f"--top must be >= 1, got {top}")
    limit = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    found = store.search(key, k=top)
    candidates = [Candidate(t, float(s)) for t, s in found]
    best = candidates[0] if candidates else None
    if best is not None and (best.similarity >= limit or fallback is None):
        return RouteResult(best.task, best.similarity, False, candidates)
    if fallback is None:
        raise StoreError("the store has no task to route to")
    sim = best.similarity if best is not None else 0.0
    return RouteResult(fallback, sim, True, candidates)


def route(
    store: PatternStore,
    keyer: QueryKeyer,
    prompt: str,
    *,
    threshold: float | None = None,
    fallback: str | None = GLOBAL,
    top: int = 5,
) -> RouteResult:
    """The stored pattern for `prompt`: best task by similarity, or `fallback` below `threshold`.

    `fallback` is `GLOBAL` (all tasks pooled), a task name, or None (always the best task).
    `similarity` is the best candidate's similarity even when the fallback is returned.
    """
    if keyer.kind != store.key["kind"]:
        raise UsageError(
            f"the keyer makes {keyer.kind!r} keys, the store holds {store.key['kind']!r} keys"
        )
    key = keyer.key_tensor(prompt)  # [D] on the model's device: searched there (store doc)
    return route_key(store, key, threshold=threshold, fallback=fallback, top=top)
