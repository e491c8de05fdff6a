"""Pruning quality beyond TCESS: router recalibration and calibrated routers.

- `premoe.calibrate.routers`: calibrated router tensors of a keep set; apply them to a loaded
  pruned model, turn them into export overrides, keep them in a pattern store.
- `premoe.calibrate.recalibrate`: train only the routers of a pruned model to match the full
  model's next-token distributions (KL) on a task's corpus.
- `premoe.calibrate.served`: which routers each loaded or served pattern runs with (the store's
  calibrated routers for its task and kept count, else the source's); serve and generate use it.
"""

from __future__ import annotations

from premoe.calibrate.recalibrate import (
    RecalibrateOptions,
    RecalibrateProgress,
    recalibrate,
    store_corpus,
)
from premoe.calibrate.routers import (
    CalibratedRouters,
    apply_routers,
    keep_digest,
    router_overrides,
    router_state,
)

__all__ = [
    "CalibratedRouters",
    "RecalibrateOptions",
    "RecalibrateProgress",
    "apply_routers",
    "keep_digest",
    "recalibrate",
    "router_overrides",
    "router_state",
    "store_corpus",
]
