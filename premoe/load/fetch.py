"""Exact mode: a model with K expert slots per layer that fetches whatever the full model routes to.

`FetchingModel(model, keep)` loads `keep`'s experts into K slots per MoE layer (as `load_pruned`
does) but gives every router its FULL rows (all E, and the full correction bias) together with the
router's and the MoE block's own full-model settings (expert count, groups), so the family's own
router code routes every token exactly as the full model does, over all E experts, with original
expert ids. Before each experts call the needed experts are looked up:

- resident ones are mapped to their slots (one device gather);
- missing ones are copied into slots (from the pinned `HostExpertCache`, else the checkpoint),
  evicting the least recently used slot not needed now. Slots holding the *pattern* (`pinned`)
  are evicted only when no other slot can be, so the routed pattern stays as long as possible;
- when one call needs more experts than there are slots (a long prompt), the call runs in
  passes of at most K experts; entries of other passes point at an expert of the pass with
  weight exactly 0 (they add nothing).

Outputs therefore equal the full model's (up to the order of floating-point sums in multi-pass
calls), at the cost of the fetches (`FetchStats`). Finding the needed experts reads K ids per
layer back to the host: one small sync per MoE layer and step.

Every write goes into the existing slot storage (DESIGN.md invariant 5). Architecture knowledge
comes from the `ArchSpec` only: where the router tensors and the experts live.

Shape legend: E experts in the source, K slots per MoE layer, T tokens, k experts per token, H
hidden size.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from premoe.errors import KeepSetError, UnsupportedArchitectureError
from premoe.load.host_cache import HostExpertCache
from premoe.load.loader import (
    Copier,
    ExpertIO,
    Progress,
    as_source,
    build_skeleton,
    load_pruned_with_info,
    moe_layer,
    param_bytes,
    tensor_of,
)
from premoe.load.miss import MissMeter
from premoe.prune.keepsets import KeepSets
from premoe.source import ModelSource

log = logging.getLogger(__name__)

_PRIMITIVE = (bool, int, float, str)
PIN_COVERAGE = 0.9
"""`FetchingModel.adapt`: a prompt whose routed weight falls less than this much on the pinned
pattern's experts (per layer) unpins it there."""
_MODULE_STATE = frozenset(vars(nn.Module()))  # `training` and torch's own bookkeeping


@dataclass
class FetchStats:
    """What the fetches cost. `calls`: experts calls; `miss_calls`: those that fetched."""

    calls: int = 0
    miss_calls: int = 0
    passes: int = 0  # extra passes of calls needing more experts than slots
    experts: int = 0
    bytes: int = 0
    seconds: float = 0.0  # host time issuing fetches (reads included)
    per_source: dict[str, int] = field(default_factory=lambda: {"cache": 0, "disk": 0})

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "miss_calls": self.miss_calls,
            "passes": self.passes,
            "experts": self.experts,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "per_source": dict(self.per_source),
        }


class _Slots:
    """One MoE layer's slots: which expert each holds, an LRU order, the device lookup table."""

    def __init__(
        self, layer: int, experts: Sequence[int], views: list[torch.Tensor], num_experts: int
    ) -> None:
        self.layer = layer
        self.views = views  # one [K, ...] parameter per ArchSpec.experts entry
        self.k = len(experts)
        self.expert = list(experts)  # slot -> original id
        self.slot = {e: s for s, e in enumerate(experts)}  # original id -> slot
        self.lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(self.k))
        device = views[0].device
        table = torch.full((num_experts,), self.k, dtype=torch.long)  # k: the sentinel
        table[list(experts)] = torch.arange(self.k)
        self.table = table.to(device)  # [E] original id -> slot (k when not resident)
        self.pinned: set[int] = set()  # original ids evicted last
        self.usage: torch.Tensor | None = None  # [E] routed weight seen while tracking

    def touch(self, experts: Sequence[int]) -> None:
        for e in experts:
            self.lru.move_to_end(self.slot[e])

    def victim(self, protect: set[int]) -> int:
        """The slot to overwrite: least recently used, unpinned first, never a protected one."""
        fallback = None
        for s in self.lru:
            e = self.expert[s]
            if e in protect:
                continue
            if e not in self.pinned:
                return s
            if fallback is None:
                fallback = s
        if fallback is None:
            raise KeepSetError(f"layer {self.layer}: no slot left to fetch into")
        return fallback


def _owner(path: str) -> tuple[str, str]:
    owner, _, name = path.rpartition(".")
    return owner, name


class FetchingModel:
    """A model with K expert slots per MoE layer and full routers: exact outputs, fetched experts.

    `keep`: the experts resident at first (K per layer, e.g. the routed pattern's). `pinned`:
    experts evicted only when nothing else can be (default: `keep`; pass `{}` for a plain LRU).
    `host_cache`: a pinned host cache fetches read from first (misses from the checkpoint are
    added to it). `.model` is an ordinary transformers model; `.stats` accumulates.
    """

    def __init__(
        self,
        model: str | Path | ModelSource,
        keep: KeepSets,
        *,
        pinned: Mapping[int, Sequence[int]] | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        host_cache: HostExpertCache | None = None,
        progress: Progress | None = None,
        **from_config_kwargs: Any,
    ) -> None:
        src, owned = as_source(model)
        self.source = src
        self._owns_source = owned
        try:
            net, info = load_pruned_with_info(
                src, keep, device=device, dtype=dtype, progress=progress, **from_config_kwargs
            )
            self.model = net
            self.load_info = info
            self.arch = src.arch
            self.num_experts = src.num_experts
            self.host_cache = host_cache
            self.stats = FetchStats()
            self.device = next(net.parameters()).device
            self._io = ExpertIO(src)
            self._meters: list[MissMeter] = []
            self.track_usage = True  # sum the routed weight of multi-token calls (prompts)
            self._full_routers()
            self._slots: dict[int, _Slots] = {}
            owners = {_owner(t.memory)[0] for t in self.arch.experts}
            if len(owners) != 1:
                raise UnsupportedArchitectureError(
                    f"{self.arch.name}: expert tensors live in several modules {sorted(owners)}; "
                    "exact fetching needs one experts module"
                )
            experts_path = owners.pop()
            for layer in src.moe_layers:
                mod = moe_layer(net, self.arch, layer)
                views = [tensor_of(mod, t.memory) for t in self.arch.experts]  # [K, ...] each
                slots = _Slots(layer, keep.layers[layer], views, self.num_experts)
                slots.pinned = set(keep.layers[layer] if pinned is None else pinned.get(layer, ()))
                self._slots[layer] = slots
                self._wrap(mod.get_submodule(experts_path), slots)
            self.expert_bytes = max(
                sum(v[0].numel() * v.element_size() for v in s.views) for s in self._slots.values()
            )
            if host_cache is not None:
                host_cache.check_fits(self.expert_bytes)
        except BaseException:
            if owned:
                src.close()
            raise

    # ---- setup ---------------------------------------------------------------------------------

    def _full_routers(self) -> None:
        """Give every router all E rows, and the router and block modules the full model's own
        settings (the plain attributes the constructors derive from the config)."""
        src, arch = self.source, self.arch
        km, reader = src.keymap, src.reader
        full = build_skeleton(src.config, self.model.dtype)  # parameters on meta: no memory
        with torch.no_grad():
            for layer in src.moe_layers:
                mod = moe_layer(self.model, arch, layer)
                ref = moe_layer(full, arch, layer)
                owners = {arch.router.module, arch.block}
                for t in arch.router_tensors:
                    owner_path, name = _owner(t.memory)
                    owners.add(owner_path)
                    owner = mod.get_submodule(owner_path)
                    old = getattr(owner, name)
                    shape = getattr(ref.get_submodule(owner_path), name).shape
                    rows = reader.get(km.router_key(layer, t.role)).reshape(shape)
                    # a copy: on the CPU `.to` would alias `reader.get`'s pages of the
                    # checkpoint map; a parameter aliasing them read back NaNs in a test
                    new = rows.to(device=old.device, dtype=old.dtype, copy=True)
                    if name in owner._parameters:
                        owner._parameters[name] = nn.Parameter(new, requires_grad=False)
                    else:
                        owner._buffers[name] = new
                for path in owners:
                    here, there = mod.get_submodule(path), ref.get_submodule(path)
                    for attr, value in vars(there).items():
                        if attr in _MODULE_STATE or not isinstance(value, _PRIMITIVE):
                            continue
                        if getattr(here, attr, None) != value:
                            setattr(here, attr, value)

    def _wrap(self, experts: nn.Module, slots: _Slots) -> None:
        """Route the experts module's calls through `_call` (instance attribute: names, hooks
        and parameters are untouched)."""
        original: Callable[..., Any] = experts.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._call(slots, original, args, kwargs)

        experts.forward = forward  # type: ignore[method-assign]

    # ---- inspection ----------------------------------------------------------------------------

    @property
    def resident(self) -> dict[int, list[int]]:
        """Original expert ids held per MoE layer (slot order)."""
        return {layer: list(s.expert) for layer, s in self._slots.items()}

    @property
    def slots(self) -> int:
        return next(iter(self._slots.values())).k

    @property
    def resident_bytes(self) -> int:
        return param_bytes(self.model)

    def meter(self) -> MissMeter:
        """A `MissMeter` reading this model's (full) router outputs; kept up to date with the
        residency as experts are fetched."""
        m = MissMeter(self.model, self.arch, self.resident, num_experts=self.num_experts, rows=None)
        self._meters.append(m)
        return m

    def set_pinned(self, pinned: Mapping[int, Sequence[int]]) -> None:
        for layer, s in self._slots.items():
            s.pinned = set(pinned.get(layer, ()))

    def adapt(self, min_coverage: float = PIN_COVERAGE) -> int:
        """Miss-aware pinning, after a prompt (`decode(..., after_prompt=fm.adapt)`).

        In each layer, the share of the routed weight of the multi-token calls since the last
        `adapt` (the prompt) that went to the pinned pattern's experts says whether the pattern
        fits this request. Where it is below `min_coverage`, the pattern is unpinned and the
        layer's slots become a plain LRU cache: pinning a pattern that does not fit only
        shrinks the cache (a random Qwen3-MoE-shaped model, 32 of 128 slots, prompts of an
        unprofiled task: with the pooled pattern kept pinned, 1.08x the fetches of a plain LRU
        cache; unpinned by `adapt`, 1.00x). Returns the number of layers unpinned."""
        unpinned = 0
        for s in self._slots.values():
            usage, s.usage = s.usage, None
            if usage is None or not s.pinned:
                continue
            total = float(usage.sum())
            covered = float(usage[sorted(s.pinned)].sum())
            if total > 0 and covered < min_coverage * total:
                s.pinned = set()
                unpinned += 1
        return unpinned

    def swap_to(self, keep: KeepSets) -> int:
        """Switch patterns: fetch `keep`'s missing experts now (one batch per layer, not one
        miss at a time while decoding) and make them the pinned set. Returns experts fetched."""
        before = self.stats.experts
        for layer, s in self._slots.items():
            wanted = list(keep.layers[layer])[: s.k]
            missing = [e for e in wanted if e not in s.slot]
            if missing:
                self._fetch(s, missing, set(wanted))
            s.touch(wanted)
        self.set_pinned(keep.layers)
        return self.stats.experts - before

    def prefetch_host(self, experts: Mapping[int, Sequence[int]] | None = None) -> int:
        """Read experts (default: all) into the host cache; returns bytes read."""
        if self.host_cache is None:
            raise KeepSetError("this model has no host cache to prefetch into")
        layers = experts or {n: range(self.num_experts) for n in self._slots}
        nbytes = 0
        for layer, ids in sorted(layers.items()):
            like = [v[0] for v in self._slots[layer].views]
            for e in ids:
                if (layer, e) in self.host_cache:
                    continue
                entry = self._io.read(layer, e, like, pin=self.host_cache.pin)
                if self.host_cache.put(layer, e, entry):
                    nbytes += HostExpertCache.entry_bytes(entry)
        return nbytes

    def close(self) -> None:
        for m in self._meters:
            m.detach()
        if self._owns_source:
            self.source.close()

    def __enter__(self) -> FetchingModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the experts call ----------------------------------------------------------------------

    def _call(
        self,
        slots: _Slots,
        original: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        where = _routing_args(args, kwargs)
        idx, w = _get(args, kwargs, where[0]), _get(args, kwargs, where[1])  # [T, k] each
        self.stats.calls += 1
        if self.track_usage and idx.shape[0] > 1:  # prompts: routed weight per original expert
            add = torch.zeros(self.num_experts, device=idx.device)  # [E]
            add.index_add_(0, idx.reshape(-1), w.reshape(-1).float())
            slots.usage = add if slots.usage is None else slots.usage + add  # out of place:
            # calls may alternate between inference mode and no_grad
        needed = [int(e) for e in torch.unique(idx).tolist()]  # the host sync of this layer
        missing = [e for e in needed if e not in slots.slot]
        if len(needed) <= slots.k:
            if missing:
                self._fetch(slots, missing, set(needed))
            slots.touch(needed)
            a, kw = _put(args, kwargs, where, slots.table[idx], w)  # ids -> slots [T, k]
            return original(*a, **kw)
        # more experts than slots: passes of at most k experts, resident ones first
        resident = [e for e in needed if e in slots.slot]
        order = resident + missing
        out = None
        for start in range(0, len(order), slots.k):
            group = order[start : start + slots.k]
            fetch = [e for e in group if e not in slots.slot]
            if fetch:
                self._fetch(slots, fetch, set(group))
            slots.touch(group)
            chosen = torch.zeros(self.num_experts, dtype=torch.bool)
            chosen[group] = True
            sel = chosen.to(idx.device)[idx]  # [T, k]
            # entries of other passes: an expert of this pass, with weight exactly 0 (a real
            # expert's finite output times 0 adds nothing; sentinel ids are not handled alike
            # by every experts implementation)
            mapped = torch.where(sel, slots.table[idx], slots.slot[group[0]])  # [T, k]
            a, kw = _put(args, kwargs, where, mapped, w * sel.to(w.dtype))
            part = original(*a, **kw)
            out = part if out is None else out + part
            self.stats.passes += 1
        self.stats.passes -= 1
        return out

    def _fetch(self, slots: _Slots, experts: Sequence[int], protect: set[int]) -> None:
        t0 = time.perf_counter()
        copier = Copier(self.device)  # waits for the compute stream: slots may still be read
        cache = self.host_cache
        nbytes = sum(v[0].numel() * v.element_size() for v in slots.views)
        with torch.no_grad():
            for e in experts:
                s = slots.victim(protect)
                old = slots.expert[s]
                entry = cache.get(slots.layer, e) if cache is not None else None
                if entry is None and cache is not None:
                    like = [v[0] for v in slots.views]
                    entry = self._io.read(slots.layer, e, like, pin=cache.pin)
                    cache.put(slots.layer, e, entry)
                    self.stats.per_source["disk"] += 1
                elif entry is not None:
                    self.stats.per_source["cache"] += 1
                else:
                    self.stats.per_source["disk"] += 1
                if entry is not None:
                    for view, t in zip(slots.views, entry, strict=True):
                        copier.copy(view[s], t)
                else:
                    for ti, view in enumerate(slots.views):
                        for _, off, piece in self._io.pieces(slots.layer, ti, [e]):
                            copier.copy(view[s].narrow(0, off, piece.shape[0]), piece)
                del slots.slot[old]
                slots.slot[e] = s
                slots.expert[s] = e
                slots.table[old] = slots.k
                slots.table[e] = s
                slots.lru.move_to_end(s)
                for m in self._meters:
                    m.set_expert(slots.layer, old, False)
                    m.set_expert(slots.layer, e, True)
            copier.finish(blocking=False)
        self.stats.miss_calls += 1
        self.stats.experts += len(experts)
        self.stats.bytes += nbytes * len(experts)
        self.stats.seconds += time.perf_counter() - t0


# ---- the experts module's routing arguments -----------------------------------------------------

_Where = tuple[int | str, int | str]  # positions (or keyword names) of indices and weights


def _routing_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Where:
    """Where the experts call's per-token expert ids [T, k] (integer) and weights [T, k] are."""
    items = [(i, a) for i, a in enumerate(args)] + list(kwargs.items())
    tensors = [(k, v) for k, v in items if isinstance(v, torch.Tensor)]
    ints = [(k, v) for k, v in tensors if not v.is_floating_point() and v.dim() == 2]
    if len(ints) == 1:
        shape = ints[0][1].shape
        floats = [(k, v) for k, v in tensors if v.is_floating_point() and v.shape == shape]
        if len(floats) == 1:
            return ints[0][0], floats[0][0]
    raise UnsupportedArchitectureError(
        "exact fetching needs per-token expert ids and weights at the experts module; this "
        f"family calls it with {[(k, tuple(v.shape)) for k, v in tensors]}"
    )


def _get(args: tuple[Any, ...], kwargs: dict[str, Any], at: int | str) -> torch.Tensor:
    return args[at] if isinstance(at, int) else kwargs[at]


def _put(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    where: _Where,
    idx: torch.Tensor,
    w: torch.Tensor,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    a, kw = list(args), dict(kwargs)
    for at, value in zip(where, (idx, w), strict=True):
        if isinstance(at, int):
            a[at] = value
        else:
            kw[at] = value
    return tuple(a), kw


__all__ = ["FetchStats", "FetchingModel"]
