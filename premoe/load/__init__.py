"""Pruned loading and expert residency.

- `load_pruned(model, keep, device=, dtype=)`: an ordinary transformers model holding only the
  kept experts, read from the original checkpoint without materialising the full model.
- `ResidentModel(model, keep, ...)`: such a model with K slots per MoE layer; `swap_to(keep)`
  switches patterns in place and reports `SwapStats`; `swap_to(keep, routers=)` also writes
  the pattern's own (e.g. calibrated) router tensors (`premoe.load.routers.RouterTensors`).
- `HostExpertCache(budget)`: pinned host cache of experts that swaps read from first.
- `load_prefix(model)`: the model up to the first MoE router, experts on meta (routing keys).
- `premoe.generate.generate(model, store, prompt)`: route, load, generate (with a miss
  policy: ``mask``, ``reroute`` or ``fetch``).

Miss-aware modules (imported on their own):

- `premoe.load.miss`: the dropped mass (`MissMeter` hooks, `MassAccumulator` per batch row,
  `DroppedMass` per request);
- `premoe.load.fetch`: `FetchingModel`, exact outputs with K slots per layer (full routers,
  missing experts fetched into slots, LRU with the pattern evicted last);
- `premoe.load.decode`: the batch-1 decode loop that applies the ``reroute`` policy.
"""

from __future__ import annotations

from premoe.load.host_cache import HostExpertCache
from premoe.load.loader import (
    ExpertIO,
    LoadInfo,
    load_prefix,
    load_pruned,
    load_pruned_with_info,
)
from premoe.load.resident import ResidentModel, SourceCount, SwapStats
from premoe.load.routers import RouterTensors
from premoe.policy import parse_bytes
from premoe.sizes import ResidentSizes as SizeModel  # the one size model (premoe.sizes)
from premoe.sizes import keep_for_budget
from premoe.sizes import resident_sizes as size_model

__all__ = [
    "ExpertIO",
    "HostExpertCache",
    "LoadInfo",
    "ResidentModel",
    "RouterTensors",
    "SizeModel",
    "SourceCount",
    "SwapStats",
    "keep_for_budget",
    "load_prefix",
    "load_pruned",
    "load_pruned_with_info",
    "parse_bytes",
    "size_model",
]
