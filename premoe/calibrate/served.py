"""Which routers a loaded or served pattern runs with: the store's calibrated ones, or the source's.

A store keeps calibrated routers per task and keep set, under ``{task}@{digest}``
(`premoe.calibrate.routers.save_to_store`; ``premoe export --recalibrate`` does it). Load and
serve pick K experts per pattern from the store's scores. With calibrated routers on (the
default when the store has some), a task whose store entry holds calibrated routers for K kept
experts in every MoE layer, at the model's routed count, is served with that entry's keep set
and router tensors, so the served pattern computes what the recalibrated export of that task
computes. Every other pattern (``__global__``, tasks never recalibrated, other counts) runs with
the source's router rows of its keep set.

- `verified(store, name, arch)`: a stored router set, checked against its name's digest and the
  family's router shapes (`StoreError`, one line, otherwise);
- `pattern_routers(store, patterns, source)`: the keep set and routers of every pattern.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from premoe.arch.spec import ArchSpec
from premoe.calibrate.routers import CalibratedRouters, load_from_store
from premoe.errors import StoreError
from premoe.prune.keepsets import KeepSets

log = logging.getLogger(__name__)

SOURCE = "source"
"""The label of a pattern that runs with the source's router rows."""


@dataclass
class PatternRouters:
    """Per served pattern: its calibrated routers and their store name (absent: the source's)."""

    routers: dict[str, CalibratedRouters] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    enabled: bool = False

    def tensors(self, pattern: str) -> Any:
        """The pattern's `RouterTensors` ({layer: {role: tensor}}), None for the source's."""
        r = self.routers.get(pattern)
        return None if r is None else r.tensors

    def label(self, pattern: str) -> str:
        """The stored name of the pattern's calibrated routers, or ``"source"``."""
        return self.names.get(pattern, SOURCE)

    def to_json(self, patterns: Mapping[str, Any]) -> dict[str, str]:
        return {name: self.label(name) for name in patterns}


def verified(store: Any, name: str, arch: ArchSpec, hidden: int | None = None) -> CalibratedRouters:
    """The calibrated routers stored under `name`, checked: the digest in the name is the
    digest of the keep set they record, and every layer has every router tensor, sized to it."""
    routers = load_from_store(store, name)
    recorded = name.rsplit("@", 1)[-1]
    if routers.digest != recorded:
        raise StoreError(
            f"the calibrated routers {name!r} no longer match their keep set (digest "
            f"{routers.digest}, stored as {recorded}); recalibrate with `premoe export "
            "--recalibrate`, or serve without them (--no-calibrated-routers)"
        )
    try:
        routers.check(arch, hidden)
    except StoreError as err:
        raise StoreError(f"the calibrated routers {name!r} do not fit: {err}") from None
    return routers


def _candidates(store: Any, task: str) -> list[str]:
    return [n for n, meta in store.calibrated.items() if meta.get("task") == task]


def pattern_routers(
    store: Any,
    patterns: Mapping[str, KeepSets],
    source: Any,
    *,
    enabled: bool | None = None,
) -> tuple[dict[str, KeepSets], PatternRouters]:
    """(pattern -> keep sets, their routers) for serving `patterns` of `store` on `source`.

    `enabled`: None (default) uses calibrated routers when the store has any; False never.
    A task with stored routers for the pattern's exact keep set uses those; else the latest
    stored for the same count in every layer (its keep set replaces the pattern's).
    """
    out = dict(patterns)
    if enabled is False or not store.calibrated:
        return out, PatternRouters()
    hidden = getattr(source.config, "hidden_size", None)
    chosen = PatternRouters(enabled=True)
    for pattern, keep in patterns.items():
        fits: list[tuple[str, CalibratedRouters]] = []
        for name in _candidates(store, pattern):
            routers = verified(store, name, source.arch, hidden)
            counts = {len(v) for v in routers.keep.layers.values()}
            same_k = routers.top_k is None or routers.top_k == source.top_k
            if counts == {keep.count} and keep.is_uniform and same_k:
                fits.append((name, routers))
            else:
                log.debug("calibrated routers %s are for another count or top-k", name)
        if not fits:
            continue
        exact = [f for f in fits if f[1].keep == keep]
        name, routers = (exact or fits)[-1]
        out[pattern] = routers.keep
        chosen.routers[pattern], chosen.names[pattern] = routers, name
        log.info(
            "pattern %s: calibrated routers %s (%s keep set)",
            pattern,
            name,
            "the same" if exact else "their own",
        )
    return out, chosen


__all__ = ["SOURCE", "PatternRouters", "pattern_routers", "verified"]
