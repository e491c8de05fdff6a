"""Calibrated routers: the router tensors of a pruned model, read, written, stored and exported.

A recalibrated pattern is a keep set plus, for every MoE layer, replacement values of the
router tensors the family declares (`ArchSpec.router_tensors`: the weight rows, and a logit
bias or a correction bias where the family has one) in the pruned model's slot order (slot s is
original expert ``keep.layers[l][s]``). Nothing else differs from the plain pruned model, so a
recalibrated model is exactly the pruned model with these router tensors copied in.

- `router_state(model, arch)`: the current router tensors of a (pruned) model;
- `apply_routers(model, arch, routers)`: copy stored tensors into a loaded pruned model in place
  (same storage, so compiled graphs and a `ResidentModel`'s swaps stay valid);
- `router_overrides(source, routers)`: checkpoint key -> tensor, for `export_pruned`;
- `CalibratedRouters.to_tensors` / `from_tensors`: the flat form the pattern store keeps.

Shape legend: L MoE layers, E' kept experts per layer, H hidden size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from premoe.arch.spec import ArchSpec
from premoe.errors import KeepSetError, StoreError
from premoe.prune.keepsets import KeepSets


def _layer_module(model: Any, arch: ArchSpec, layer: int) -> torch.nn.Module:
    return model.get_submodule(f"{arch.layers_prefix}.{layer}")


def _tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    owner, attr = name.rsplit(".", 1)
    return getattr(module.get_submodule(owner), attr)


def router_tensor(model: Any, arch: ArchSpec, layer: int, role: str) -> torch.Tensor:
    """The live router tensor of `layer` with `role` (weight [E', H], biases [E'] or [1, E'])."""
    spec = next((t for t in arch.router_tensors if t.role == role), None)
    if spec is None:
        raise KeyError(role)
    return _tensor(_layer_module(model, arch, layer), spec.memory)


def router_roles(arch: ArchSpec) -> tuple[str, ...]:
    """The roles of the family's router tensors (``weight`` first)."""
    return tuple(t.role for t in arch.router_tensors)


def router_state(model: Any, arch: ArchSpec, layers: Any) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {role: tensor}}: detached CPU float32 copies of every router tensor."""
    return {
        int(layer): {
            role: router_tensor(model, arch, int(layer), role).detach().float().cpu().clone()
            for role in router_roles(arch)
        }
        for layer in layers
    }


def keep_digest(keep: KeepSets, top_k: int | None = None) -> str:
    """A short stable hash of a keep set (and routed count): the identity of a pattern's
    routers."""
    text = json.dumps({"keep": keep.to_json(), "top_k": top_k}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class CalibratedRouters:
    """Replacement router tensors for one keep set (slot order, float32, on the CPU)."""

    keep: KeepSets
    tensors: dict[int, dict[str, torch.Tensor]]  # layer -> role -> [E', H] / [E'] / [1, E']
    top_k: int | None = None  # routed count of the pruned model (None: the model's own)
    info: dict[str, Any] = field(default_factory=dict)  # how they were trained

    @property
    def digest(self) -> str:
        return keep_digest(self.keep, self.top_k)

    def check(self, arch: ArchSpec, hidden: int | None = None) -> None:
        """Every MoE layer of the keep set has every router role, with E' rows."""
        roles = set(router_roles(arch))
        if set(self.tensors) != set(self.keep.layers):
            raise StoreError(
                f"calibrated routers cover layers {sorted(self.tensors)}, the keep set "
                f"{sorted(self.keep.layers)}"
            )
        for layer, by_role in self.tensors.items():
            if set(by_role) != roles:
                raise StoreError(
                    f"calibrated routers of layer {layer} have {sorted(by_role)}, the family "
                    f"{arch.name} has {sorted(roles)}"
                )
            n = len(self.keep.layers[layer])
            for role, t in by_role.items():
                spec = next(s for s in arch.router_tensors if s.role == role)
                if t.shape[spec.dim % t.dim()] != n:
                    raise StoreError(
                        f"calibrated {role} of layer {layer} has shape {tuple(t.shape)}, "
                        f"expected {n} kept experts on dim {spec.dim}"
                    )
                if role == "weight" and hidden is not None and t.shape[-1] != hidden:
                    raise StoreError(
                        f"calibrated router of layer {layer} has hidden size {t.shape[-1]}, "
                        f"the model {hidden}"
                    )

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat ``{prefix}/{layer}/{role}`` (``{layer}/{role}`` without a prefix) -> tensor."""
        head = f"{prefix}/" if prefix else ""
        return {
            f"{head}{layer}/{role}": t.detach().float().cpu().contiguous()
            for layer, by_role in sorted(self.tensors.items())
            for role, t in by_role.items()
        }

    def meta(self) -> dict[str, Any]:
        return {"keep": self.keep.to_json(), "top_k": self.top_k, "info": dict(self.info)}

    @classmethod
    def from_tensors(
        cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], prefix: str
    ) -> CalibratedRouters:
        keep = KeepSets.from_json(meta["keep"])
        out: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            if not name.startswith(prefix + "/"):
                continue
            layer, role = name[len(prefix) + 1 :].split("/", 1)
            out.setdefault(int(layer), {})[role] = t
        top_k = meta.get("top_k")
        return cls(keep, out, None if top_k is None else int(top_k), dict(meta.get("info") or {}))


def source_routers(source: Any) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {role: full router tensor}} read from the source checkpoint (all E experts,
    original numbering; small: E x H per layer)."""
    arch, keymap, reader = source.arch, source.keymap, source.reader
    return {
        layer: {role: reader.get(keymap.router_key(layer, role)) for role in router_roles(arch)}
        for layer in source.moe_layers
    }


def write_routers(
    model: Any,
    arch: ArchSpec,
    keep: KeepSets,
    full: dict[int, dict[str, torch.Tensor]],
    routers: CalibratedRouters | None = None,
) -> None:
    """Make every router tensor of a model holding `keep` right for that pattern: the
    calibrated tensors of `routers` (which must be for `keep`), or else the source rows of the
    kept experts (`full` from `source_routers`). In place.

    Use after every swap of a resident model (`ResidentModel.swap_to` leaves the router rows of
    unchanged layers as they were, so a pattern without calibrated routers that follows one
    with them must get the source rows back).
    """
    if routers is not None:
        if routers.keep != keep:
            raise KeepSetError("the calibrated routers are for another keep set")
        apply_routers(model, arch, routers)
        return
    with torch.no_grad():
        for layer, ids in keep.layers.items():
            idx = torch.tensor(ids, dtype=torch.long)
            for spec in arch.router_tensors:
                src = full[layer][spec.role]
                dst = router_tensor(model, arch, layer, spec.role)
                rows = src.index_select(spec.dim % src.dim(), idx)
                dst.copy_(rows.reshape(dst.shape).to(device=dst.device, dtype=dst.dtype))


def routers_name(task: str, routers: CalibratedRouters) -> str:
    """The store name of a task's calibrated routers: ``{task}@{digest}``."""
    return f"{task}@{routers.digest}"


def save_to_store(store: Any, task: str, routers: CalibratedRouters) -> str:
    """Keep `routers` in a `PatternStore` (in memory; `store.save` writes them). Returns the
    name they are stored under (`routers_name`)."""
    name = routers_name(task, routers)
    store.set_routers(name, {"task": task, **routers.meta()}, routers.to_tensors(""))
    return name


def load_from_store(store: Any, name: str) -> CalibratedRouters:
    """The calibrated routers stored under `name` (`PatternStore.calibrated` lists them)."""
    meta, tensors = store.routers(name)
    return CalibratedRouters.from_tensors(meta, {f"r/{k}": v for k, v in tensors.items()}, "r")


def find_in_store(
    store: Any, task: str, keep: KeepSets, top_k: int | None = None
) -> CalibratedRouters | None:
    """The stored calibrated routers of `task` for exactly this keep set, if any (a stored set
    whose recorded keep set no longer matches its name is a `StoreError`)."""
    name = f"{task}@{keep_digest(keep, top_k)}"
    if name not in store.calibrated:
        return None
    routers = load_from_store(store, name)
    if routers.keep != keep or routers.top_k != top_k:
        raise StoreError(
            f"the calibrated routers {name!r} no longer match their keep set (digest "
            f"{routers.digest}); recalibrate with `premoe export --recalibrate`"
        )
    return routers


def _check_keep(model: Any, arch: ArchSpec, routers: CalibratedRouters) -> None:
    for layer, ids in routers.keep.layers.items():
        w = router_tensor(model, arch, layer, "weight")
        if w.shape[0] != len(ids):
            raise KeepSetError(
                f"layer {layer}: the model holds {w.shape[0]} experts, the calibrated routers "
                f"are for {len(ids)}"
            )


def apply_routers(model: Any, arch: ArchSpec, routers: CalibratedRouters) -> None:
    """Copy calibrated router tensors into a loaded pruned model of the same keep set, in place.

    Call it after `load_pruned(source, routers.keep)` or after `ResidentModel.swap_to(keep)`
    (the swap restores the source's router rows; this writes the calibrated ones over them).
    The caller must make sure the model holds `routers.keep` (slot s = keep[l][s]).
    """
    _check_keep(model, arch, routers)
    with torch.no_grad():
        for layer, by_role in routers.tensors.items():
            for role, t in by_role.items():
                dst = router_tensor(model, arch, layer, role)
                dst.copy_(t.reshape(dst.shape).to(device=dst.device, dtype=dst.dtype))


def router_overrides(source: Any, routers: CalibratedRouters) -> dict[str, torch.Tensor]:
    """{checkpoint key: tensor} of the calibrated router tensors, for `export_pruned`.

    `source`: the `ModelSource` being pruned. Router tensors keep their names in the pruned
    checkpoint; each override gets the source tensor's dtype and layout (its expert dimension
    cut to E').
    """
    arch, keymap, reader = source.arch, source.keymap, source.reader
    out: dict[str, torch.Tensor] = {}
    for layer, by_role in routers.tensors.items():
        n = len(routers.keep.layers[layer])
        for role, t in by_role.items():
            spec = next(s for s in arch.router_tensors if s.role == role)
            key = keymap.router_key(layer, role)
            shape = list(reader.shape(key))
            shape[spec.dim % len(shape)] = n
            out[key] = t.detach().cpu().reshape(shape).to(reader.dtype(key)).contiguous()
    return out


__all__ = [
    "CalibratedRouters",
    "apply_routers",
    "find_in_store",
    "load_from_store",
    "routers_name",
    "save_to_store",
    "source_routers",
    "write_routers",
    "keep_digest",
    "router_overrides",
    "router_roles",
    "router_state",
    "router_tensor",
]
