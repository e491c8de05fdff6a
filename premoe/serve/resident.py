"""The server's view of the resident model: K expert slots per MoE layer, swapped in place.

`open_resident` wraps `premoe.load.ResidentModel`: `.model` is an ordinary transformers model of
the pruned config, `.keep` the `KeepSets` resident now, `.resident_bytes`, and `.swap_to(keep) ->
SwapStats` writes experts and router rows into the existing tensors (invariant 5 of DESIGN.md:
same storage, so compiled and captured CUDA graphs stay valid). With a host cache, every
pattern's experts are read once at start-up into (pinned) host memory, so that a swap is only
host-to-device copies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch

from premoe.load import HostExpertCache, ResidentModel
from premoe.prune import KeepSets
from premoe.source import ModelSource

if TYPE_CHECKING:
    from premoe.load import RouterTensors, SwapStats

log = logging.getLogger(__name__)


class Resident(Protocol):
    model: Any

    @property
    def keep(self) -> KeepSets: ...

    @property
    def resident_bytes(self) -> int: ...

    @property
    def routers(self) -> RouterTensors | None: ...

    def swap_to(self, keep: KeepSets, *, routers: RouterTensors | None = None) -> SwapStats: ...


def open_resident(
    source: ModelSource,
    keep: KeepSets,
    *,
    device: str | torch.device,
    dtype: str | torch.dtype | None,
    host_cache: str | int | None = None,
    prefetch: Mapping[str, KeepSets] | None = None,
    routers: RouterTensors | None = None,
    **from_config_kwargs: Any,
) -> Resident:
    """The resident model holding `keep`, swappable to any keep sets of the same count.

    `host_cache`: a byte budget (e.g. "32GiB") for a host-memory expert cache; the experts of
    every pattern in `prefetch` are read into it now (in order, as long as they fit).
    `routers`: the pattern's own router tensors (calibrated), written over the source's.
    """

    cache = HostExpertCache(host_cache) if host_cache is not None else None
    resident = ResidentModel(
        source,
        keep,
        device=device,
        dtype=dtype,
        host_cache=cache,
        routers=routers,
        **from_config_kwargs,
    )
    if cache is not None and prefetch:
        t0 = time.perf_counter()
        nbytes = 0
        for name, ks in prefetch.items():
            nbytes += resident.prefetch(ks)
            log.debug("prefetched pattern %s", name)
        log.info(
            "host expert cache: %d experts, %.2f GiB read in %.1f s",
            len(cache),
            nbytes / 2**30,
            time.perf_counter() - t0,
        )
    return resident
