"""The config of a pruned model: expert count, routed count and group fields rewritten."""

from __future__ import annotations

import copy
import logging
from typing import Any

from premoe.arch.spec import ArchSpec
from premoe.prune.keepsets import GroupPlan, KeepSets

log = logging.getLogger(__name__)


def pruned_config(
    arch: ArchSpec,
    config: Any,
    keep: KeepSets,
    groups: GroupPlan,
    *,
    top_k: int | None = None,
) -> Any:
    """A copy of `config` for a model that holds `keep`'s experts (validated keep sets)."""
    new = copy.deepcopy(config)
    changes: dict[str, tuple[Any, Any]] = {}

    def put(key: str, value: Any) -> None:
        old = getattr(new, key, None)
        if old != value:
            setattr(new, key, value)
            changes[key] = (old, value)

    put(arch.num_experts_key, keep.count)
    if top_k is not None:
        put(arch.top_k_key, top_k)
    if arch.router.grouped:
        put("n_group", groups.n_group)
        put("topk_group", groups.topk_group)
    for key, (old, value) in changes.items():
        log.info("config %s: %s -> %s", key, old, value)
    return new
