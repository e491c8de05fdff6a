"""A pattern's own router tensors (e.g. calibrated ones) for a loaded pruned model.

`RouterTensors` is the plain form premoe.load takes them in, so that loading and swapping need
nothing from `premoe.calibrate` (which builds on premoe.load): `load_pruned(..., routers=)` and
`ResidentModel.swap_to(keep, routers=)` write them over the source's router rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from premoe.arch.model import moe_layer, tensor_of
from premoe.arch.spec import ArchSpec
from premoe.errors import KeepSetError
from premoe.prune.keepsets import KeepSets

RouterTensors = Mapping[int, Mapping[str, torch.Tensor]]
"""{layer: {role: tensor}}: a pattern's own router tensors in slot order (slot s = keep[l][s]),
with the roles of `ArchSpec.router_tensors` (e.g. `premoe.calibrate.CalibratedRouters.tensors`)."""


def check_router_tensors(arch: ArchSpec, keep: KeepSets, routers: RouterTensors) -> None:
    """`routers` cover every MoE layer of `keep` with every router role, sized to its count."""
    if set(routers) != set(keep.layers):
        raise KeepSetError(
            f"router tensors cover layers {sorted(routers)}, the keep sets {sorted(keep.layers)}"
        )
    for layer, by_role in routers.items():
        n = len(keep.layers[layer])
        for t in arch.router_tensors:
            x = by_role.get(t.role)
            if x is None:
                raise KeepSetError(f"router tensors of layer {layer} lack {t.role!r}")
            if x.shape[t.dim % x.dim()] != n:
                raise KeepSetError(
                    f"router {t.role} of layer {layer} has shape {tuple(x.shape)}; the pattern "
                    f"keeps {n} experts there"
                )


def write_router_tensors(
    model: Any, arch: ArchSpec, keep: KeepSets, routers: RouterTensors
) -> None:
    """Copy `routers` into a model `load_pruned(source, keep)` returned, in place."""
    check_router_tensors(arch, keep, routers)
    with torch.no_grad():
        for layer, by_role in routers.items():
            mod = moe_layer(model, arch, layer)
            for t in arch.router_tensors:
                dst = tensor_of(mod, t.memory)
                src = by_role[t.role]
                dst.copy_(src.reshape(dst.shape).to(device=dst.device, dtype=dst.dtype))


__all__ = ["RouterTensors", "check_router_tensors", "write_router_tensors"]
