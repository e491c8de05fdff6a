"""Expert residency: a loaded pruned model whose K expert slots per layer switch patterns in place.

`ResidentModel` holds a model loaded by `load_pruned` (K slots per MoE layer) and, per layer, the
original expert id in each slot. `swap_to(new_keep)` makes the model equal to
`load_pruned(new_keep)`, moving as little as possible:

1. experts kept by both patterns stay on the device; where their slot changes (slot order is the
   sorted order of the keep set, which group-limited routers and exact tie-breaking need), they
   are permuted on the device (`index_select` + `index_copy_`, counted as device-to-device);
2. experts the new pattern lacks are copied from the host cache (pinned, asynchronous) or the
   checkpoint (page cache -> pinned staging -> device) into the slots freed by dropped experts;
3. router rows and biases (`arch.router_tensors`) are rewritten from a host copy of the full
   router tensors, so slot s routes as original expert keep[s]; or, when the swap is given a
   pattern's own router tensors (`routers=`: e.g. calibrated routers, `premoe.calibrate`), those
   are written into every MoE layer. A layer that holds given routers gets the source's rows
   back at the next swap without them, changed or not.

Non-uniform keep sets work the same: each MoE layer keeps its own slot count
(`layer_slots`), and a swap must keep every layer's count.

Every write goes into the existing storage (`tensor[slot].copy_(...)`): parameters are never
reassigned, so `data_ptr()`s, compiled graphs and captured CUDA graphs stay valid (DESIGN.md
invariant 5). On CUDA the copies run on a side stream that waits for the compute stream; the
compute stream then waits for the copies (an event), and by default the host waits too so that
`SwapStats.seconds` is the real transfer time.

Shape legend: E experts in the source, K slots per MoE layer, H hidden, R rows of one expert's
slice in a fused parameter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from premoe.arch.model import experts_module
from premoe.arch.spec import RouterTensor
from premoe.errors import KeepSetError
from premoe.load.host_cache import HostExpertCache
from premoe.load.loader import (
    Copier,
    ExpertIO,
    ExpertQuantization,
    LoadInfo,
    Progress,
    as_source,
    load_pruned_with_info,
    moe_layer,
    param_bytes,
    tensor_of,
)
from premoe.load.routers import RouterTensors, check_router_tensors
from premoe.prune.keepsets import GroupPlan, KeepSets
from premoe.source import ModelSource

log = logging.getLogger(__name__)

_GROUP_ATTRS = ("n_group", "num_group", "topk_group")


@dataclass
class SourceCount:
    experts: int = 0
    bytes: int = 0


@dataclass
class SwapStats:
    """What one `swap_to` moved. `experts_moved`/`bytes`: experts copied onto the device from
    outside it (host cache + checkpoint), per source in `per_source`; `device_moves`/
    `device_bytes`: resident experts permuted between slots; `router_bytes`: router rows."""

    experts_moved: int = 0
    bytes: int = 0
    seconds: float = 0.0
    per_source: dict[str, SourceCount] = field(
        default_factory=lambda: {"cache": SourceCount(), "disk": SourceCount()}
    )
    device_moves: int = 0
    device_bytes: int = 0
    router_bytes: int = 0
    layers_changed: int = 0
    group_plan_changed: bool = False

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "experts_moved": self.experts_moved,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "bytes_per_second": self.bytes_per_second,
            "per_source": {k: vars(v).copy() for k, v in self.per_source.items()},
            "device_moves": self.device_moves,
            "device_bytes": self.device_bytes,
            "router_bytes": self.router_bytes,
            "layers_changed": self.layers_changed,
            "group_plan_changed": self.group_plan_changed,
        }


@dataclass
class _Layer:
    experts: list[torch.Tensor]  # one [K, ...] view per ArchSpec.experts entry (param storage)
    # spec, resident tensor, host copy of all E rows, host staging of K rows (pinned on CUDA)
    routers: list[tuple[RouterTensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    expert_bytes: int  # one slot, all tensors


class ResidentModel:
    """A pruned model with K expert slots per MoE layer that can switch patterns in place.

    `ResidentModel(model, keep, device=..., dtype=..., host_cache=...)` loads `keep`'s experts
    from `model` (path, hub id or `ModelSource`) with `load_pruned`; `ResidentModel.wrap(...)`
    adopts a model `load_pruned` already returned. `.model` is an ordinary transformers model.
    """

    def __init__(
        self,
        model: str | Path | ModelSource,
        keep: KeepSets,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        top_k: int | None = None,
        host_cache: HostExpertCache | None = None,
        progress: Progress | None = None,
        quantize: ExpertQuantization | None = None,
        routers: RouterTensors | None = None,
        **from_config_kwargs: Any,
    ) -> None:
        src, owned = as_source(model)
        try:
            m, info = load_pruned_with_info(
                src,
                keep,
                device=device,
                dtype=dtype,
                top_k=top_k,
                progress=progress,
                quantize=quantize,
                **from_config_kwargs,
            )
            self._attach(m, src, keep, info.plan, host_cache, owned)
            if routers is not None:
                self.set_routers(routers)
        except BaseException:
            if owned:
                src.close()
            raise
        self.load_info: LoadInfo | None = info

    @classmethod
    def wrap(
        cls,
        model: Any,
        source: ModelSource,
        keep: KeepSets,
        *,
        host_cache: HostExpertCache | None = None,
    ) -> ResidentModel:
        """Adopt `model`, which `load_pruned(source, keep)` returned (not closed with it)."""
        self = cls.__new__(cls)
        plan = keep.validate(
            source.arch, source.config, top_k=source.arch.top_k(model.config), allow_ragged=True
        )
        self._attach(model, source, keep, plan, host_cache, False)
        self.load_info = None
        return self

    def _attach(
        self,
        model: Any,
        source: ModelSource,
        keep: KeepSets,
        plan: GroupPlan,
        host_cache: HostExpertCache | None,
        owns_source: bool,
    ) -> None:
        self.model = model
        self.source = source
        self.arch = source.arch
        self.keep = keep
        self.plan = plan
        self.host_cache = host_cache
        self._owns_source = owns_source
        self._pending: torch.cuda.Event | None = None
        self.routers: RouterTensors | None = None  # the pattern's own routers, if given
        self._own_routers: set[int] = set()  # layers whose router tensors are not the source's
        self.top_k = self.arch.top_k(model.config)
        self.slots = self.arch.num_experts(model.config)  # the largest count (ragged: per layer)
        self.device = next(model.parameters()).device
        self._io = ExpertIO(source)
        if set(keep.layers) != set(source.moe_layers):
            raise KeepSetError(
                f"the model has MoE layers {source.moe_layers}; the keep sets it was loaded "
                "with do not match"
            )
        # slots per MoE layer: the rows of its router weight (ragged keep sets differ by layer)
        rw = self.arch.router_weight
        self.layer_slots: dict[int, int] = {}
        for layer in source.moe_layers:
            w = tensor_of(moe_layer(model, self.arch, layer), rw.memory)  # [E'_l, H]
            self.layer_slots[layer] = int(w.shape[rw.dim % w.dim()])
        wrong = [n for n, v in keep.layers.items() if len(v) != self.layer_slots[n]]
        if wrong:
            raise KeepSetError(
                f"layer {wrong[0]} of the model has {self.layer_slots[wrong[0]]} expert slots; "
                f"the keep sets it was loaded with keep {len(keep.layers[wrong[0]])}"
            )
        pin = self.device.type == "cuda"
        self._layers: dict[int, _Layer] = {}
        km, reader = source.keymap, source.reader
        self._quant: dict[int, Any] = {}  # layer -> QuantizedExperts (quantized slots)
        for layer in source.moe_layers:
            mod = moe_layer(model, self.arch, layer)
            quant = getattr(experts_module(model, self.arch, layer), "_premoe_quant", None)
            if quant is None:
                views = [tensor_of(mod, t.memory) for t in self.arch.experts]  # [K, ...] each
            else:  # one uint8 [K, slot_bytes] storage holds every quantized tensor of a slot
                self._quant[layer] = quant
                views = [quant.storage] + [
                    tensor_of(mod, t.memory)
                    for t in self.arch.experts
                    if t.memory.rsplit(".", 1)[1] not in quant.projs
                ]
            routers = []
            for t in self.arch.router_tensors:
                dst = tensor_of(mod, t.memory)
                # a copy: `reader.get` may share pages with the checkpoint map (see fetch.py)
                full = reader.get(km.router_key(layer, t.role)).to(dst.dtype, copy=True)  # [E, H]
                stage = torch.empty(dst.shape, dtype=dst.dtype, pin_memory=pin)
                routers.append((t, dst, full.pin_memory() if pin else full.contiguous(), stage))
            nbytes = sum(v[0].numel() * v.element_size() for v in views)
            self._layers[layer] = _Layer(views, routers, nbytes)
        self.expert_bytes = max(ly.expert_bytes for ly in self._layers.values())
        if host_cache is not None:
            host_cache.check_fits(self.expert_bytes)

    def close(self) -> None:
        if self._owns_source:
            self.source.close()

    def __enter__(self) -> ResidentModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- inspection ----------------------------------------------------------------------------

    @property
    def resident_bytes(self) -> int:
        """Bytes of every parameter on the device (unique storage)."""
        return param_bytes(self.model)

    def __repr__(self) -> str:
        return (
            f"ResidentModel({self.arch.name}, {self.slots} slots x {len(self._layers)} MoE "
            f"layers, {self.resident_bytes / 2**30:.2f} GiB on {self.device})"
        )

    # ---- host cache ---------------------------------------------------------------------------

    def _read_entry(self, layer: int, expert: int) -> tuple[torch.Tensor, ...]:
        """One expert as host tensors aligned with the layer's slot views (for quantized slots:
        the quantized entry first, then any tensor left dense, e.g. biases)."""
        pin = self.host_cache.pin if self.host_cache is not None else False
        quant = self._quant.get(layer)
        if quant is None:
            like = [v[0] for v in self._layers[layer].experts]
            return self._io.read(layer, expert, like, pin=pin)
        names = [t.memory.rsplit(".", 1)[1] for t in self.arch.experts]
        like = [quant.dense_like(n) if n in quant.projs else None for n in names]
        rest = iter(self._layers[layer].experts[1:])
        like = [x if x is not None else next(rest)[0] for x in like]
        dense = self._io.read(layer, expert, like)
        entry = quant.entry_from_dense({n: t for n, t in zip(names, dense, strict=True)})
        out = (entry, *(t for n, t in zip(names, dense, strict=True) if n not in quant.projs))
        return tuple(t.pin_memory() for t in out) if pin else out

    def prefetch(self, keep: KeepSets | dict[int, list[int]]) -> int:
        """Read the given experts into the host cache (those not there yet); returns bytes read."""
        if self.host_cache is None:
            raise KeepSetError("this resident model has no host cache to prefetch into")
        layers = keep.layers if isinstance(keep, KeepSets) else keep
        nbytes = 0
        for layer, experts in sorted(layers.items()):
            for e in experts:
                if (layer, e) in self.host_cache:
                    continue
                entry = self._read_entry(layer, e)
                if self.host_cache.put(layer, e, entry):
                    nbytes += HostExpertCache.entry_bytes(entry)
        return nbytes

    # ---- swapping ------------------------------------------------------------------------------

    def _check(self, keep: KeepSets) -> GroupPlan:
        layers = sorted(self._layers)
        if set(keep.layers) != set(layers):
            raise KeepSetError(
                f"keep sets must cover exactly the MoE layers {layers} of the resident model"
            )
        wrong = {
            layer: len(v) for layer, v in keep.layers.items() if len(v) != self.layer_slots[layer]
        }
        if wrong:
            layer, n = next(iter(sorted(wrong.items())))
            raise KeepSetError(
                f"layer {layer} keeps {n} experts but the resident model has "
                f"{self.layer_slots[layer]} slots there; load a new model to change the kept count"
            )
        return keep.validate(self.arch, self.source.config, top_k=self.top_k, allow_ragged=True)

    def _set_groups(self, plan: GroupPlan) -> None:
        """Point group-limited routers at the new plan (python attributes; compiled graphs that
        guard on them recompile once)."""
        cfg = self.model.config
        for attr, value in (("n_group", plan.n_group), ("topk_group", plan.topk_group)):
            if hasattr(cfg, attr):
                setattr(cfg, attr, value)
        for layer in self._layers:
            mod = moe_layer(self.model, self.arch, layer)
            for owner in (
                mod.get_submodule(self.arch.router.module),
                mod.get_submodule(self.arch.block),
            ):
                for attr in _GROUP_ATTRS:
                    if hasattr(owner, attr):
                        value = plan.topk_group if attr == "topk_group" else plan.n_group
                        setattr(owner, attr, value)

    def _write_routers(
        self,
        copier: Copier,
        layer: int,
        ly: _Layer,
        kept: tuple[int, ...],
        given: Mapping[str, torch.Tensor] | None,
    ) -> int:
        """Write layer's router tensors: `given` ({role: slot-order tensor}) or the source's
        rows of `kept`. Returns bytes copied."""
        nbytes = 0
        idx = torch.tensor(kept, dtype=torch.long)
        for t, dst, full, stage in ly.routers:
            if given is None:
                torch.index_select(full, t.dim % full.dim(), idx, out=stage)  # [K, H] / [K]
            else:
                stage.copy_(given[t.role].reshape(stage.shape))
            nbytes += copier.copy(dst, stage)
        return nbytes

    def set_routers(self, routers: RouterTensors | None, *, blocking: bool = True) -> int:
        """Write `routers` (the resident pattern's own router tensors, slot order) into every
        MoE layer, or with None the source's rows of the resident keep sets. Returns bytes."""
        if routers is not None:
            check_router_tensors(self.arch, self.keep, routers)
        if self._pending is not None:
            self._pending.synchronize()
            self._pending = None
        copier = Copier(self.device)
        nbytes = 0
        with torch.no_grad():
            for layer, ly in sorted(self._layers.items()):
                given = None if routers is None else routers[layer]
                if given is None and layer not in self._own_routers:
                    continue
                nbytes += self._write_routers(copier, layer, ly, self.keep.layers[layer], given)
            self._pending = copier.finish(blocking=blocking)
        self.routers = routers
        self._own_routers = set(self._layers) if routers is not None else set()
        return nbytes

    def swap_to(
        self,
        keep: KeepSets,
        *,
        routers: RouterTensors | None = None,
        cache_misses: bool = True,
        blocking: bool = True,
    ) -> SwapStats:
        """Make the resident experts those of `keep` (same count per layer as the slots).

        Afterwards the model equals `load_pruned(source, keep)`, with `routers` (the pattern's
        own router tensors in slot order, e.g. calibrated ones) in place of the source's router
        rows when given. Experts missing from the
        device come from the host cache when it has them, else from the checkpoint (and are then
        added to the cache unless `cache_misses=False`). With `blocking=False` the host does
        not wait for the copies (the compute stream still does); `seconds` is then issue time.
        """
        plan = self._check(keep)
        if routers is not None:
            check_router_tensors(self.arch, keep, routers)
        if self._pending is not None:  # the previous swap may still read the router staging
            self._pending.synchronize()
            self._pending = None
        stats = SwapStats()
        t0 = time.perf_counter()
        copier = Copier(self.device)
        device = self.device
        with torch.no_grad():
            for layer, ly in sorted(self._layers.items()):
                old, new = self.keep.layers[layer], keep.layers[layer]
                if old == new:
                    continue
                stats.layers_changed += 1
                old_slot = {e: s for s, e in enumerate(old)}
                moves = [(old_slot[e], j) for j, e in enumerate(new) if e in old_slot]
                moves = [(i, j) for i, j in moves if i != j]
                loads = [(e, j) for j, e in enumerate(new) if e not in old_slot]
                if moves:  # permute resident experts first: their old slots may be overwritten

                    def permute(ly: _Layer = ly, moves: list[tuple[int, int]] = moves) -> None:
                        src = torch.tensor([i for i, _ in moves], device=device)
                        dst = torch.tensor([j for _, j in moves], device=device)
                        for view in ly.experts:
                            view.index_copy_(0, dst, view.index_select(0, src))  # [m, ...]

                    copier.run(permute)
                    stats.device_moves += len(moves)
                    stats.device_bytes += len(moves) * ly.expert_bytes
                for e, j in loads:
                    source = self._load_expert(copier, layer, ly, e, j, cache_misses)
                    count = stats.per_source[source]
                    count.experts += 1
                    count.bytes += ly.expert_bytes
                    stats.experts_moved += 1
                    stats.bytes += ly.expert_bytes
                if routers is None:
                    stats.router_bytes += self._write_routers(copier, layer, ly, new, None)
            for layer, ly in sorted(self._layers.items()):  # unchanged layers, given routers
                changed = self.keep.layers[layer] != keep.layers[layer]
                if routers is not None:
                    given = routers[layer]
                elif changed or layer not in self._own_routers:
                    continue
                else:
                    given = None  # held another pattern's own routers: the source's rows back
                stats.router_bytes += self._write_routers(
                    copier, layer, ly, keep.layers[layer], given
                )
            self._pending = copier.finish(blocking=blocking)
        self.routers = routers
        self._own_routers = set(self._layers) if routers is not None else set()
        if (plan.n_group, plan.topk_group) != (self.plan.n_group, self.plan.topk_group):
            self._set_groups(plan)
            stats.group_plan_changed = True
        self.keep, self.plan = keep, plan
        stats.seconds = time.perf_counter() - t0
        log.info(
            "swap: %d experts loaded (%.1f MB: %d from cache, %d from disk), %d permuted on the "
            "device, %d layers, %.3f s",
            stats.experts_moved,
            stats.bytes / 1e6,
            stats.per_source["cache"].experts,
            stats.per_source["disk"].experts,
            stats.device_moves,
            stats.layers_changed,
            stats.seconds,
        )
        return stats

    def _load_expert(
        self, copier: Copier, layer: int, ly: _Layer, expert: int, slot: int, cache_misses: bool
    ) -> str:
        """Copy original `expert` into `slot` of `layer`; returns its source ("cache"/"disk")."""
        cache = self.host_cache
        entry = cache.get(layer, expert) if cache is not None else None
        if entry is not None:
            for view, t in zip(ly.experts, entry, strict=True):
                copier.copy(view[slot], t)
            return "cache"
        if cache is not None and cache_misses:
            entry = self._read_entry(layer, expert)
            cache.put(layer, expert, entry)
            for view, t in zip(ly.experts, entry, strict=True):
                copier.copy(view[slot], t)
            return "disk"
        if layer in self._quant:
            for view, t in zip(ly.experts, self._read_entry(layer, expert), strict=True):
                copier.copy(view[slot], t)
            return "disk"
        for ti, view in enumerate(ly.experts):
            for _, off, piece in self._io.pieces(layer, ti, [expert]):
                copier.copy(view[slot].narrow(0, off, piece.shape[0]), piece)
        return "disk"
