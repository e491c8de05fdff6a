"""Sibling projections of one input as one matmul (the decode step's q/k/v).

Shape legend: T tokens, H the projections' input width, N_i the output width of projection i,
N = sum N_i.

At batch 1 a decode step is a chain of small GEMVs, and each costs a launch and a latency floor
well above its bytes: on an H200 the 2 MB k and v projections of the bench model take 6-7 µs each,
about what the 17 MB q projection takes. `fuse_projections` finds the plain `nn.Linear` modules
that one parent module calls on the same input tensor (attention's q, k and v; a gated MLP's gate
and up), by watching one forward, and turns each group into one `[N, H]` weight: every member's
`weight` (and `bias`) becomes a view of its rows, so no memory is added and the state of the model
is the same values. The first member called computes `x @ W^T` for the whole group and hands each
later member its slice, provided the later member is called with that same tensor (anything else
computes its own projection, as before).

Only what the forward shows is fused: the grouping comes from the tensors actually passed, not
from module names, so it holds for every family. Quantized linear layers (subclasses of
`nn.Linear`) and modules with hooks (accelerate's offloading) are left alone. The result is each
projection's output computed by one larger matmul: the same products and sums, though a
different kernel may add them in a different order (bf16 results can differ in the last bit).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class _Group:
    """What the members of one fused group share during a forward."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.x: torch.Tensor | None = None  # the input the parts were computed from
        self.parts: tuple[torch.Tensor, ...] | None = None  # [T, N_i] per member
        self.left = 0  # members still to take their part


class FusedLinear(nn.Module):
    """One member of a fused group: the first computes the group's matmul."""

    def __init__(
        self,
        group: _Group,
        index: int,
        weight: torch.Tensor,  # [N_i, H] a view of the fused weight
        bias: torch.Tensor | None,  # [N_i] a view of the fused bias
        fused: tuple[torch.Tensor, torch.Tensor | None] | None,  # ([N, H], [N]): first member
    ) -> None:
        super().__init__()
        self.group = group
        self.index = index
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        if fused is not None:
            self.register_buffer("fused_weight", fused[0], persistent=False)
            self.register_buffer("fused_bias", fused[1], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        if self.index == 0:
            out = F.linear(x, self.fused_weight, self.fused_bias)  # [..., N]
            g.x, g.parts, g.left = x, out.split(g.sizes, dim=-1), len(g.sizes) - 1
            return g.parts[0]
        if g.parts is not None and g.x is x:
            part = g.parts[self.index]
            g.left -= 1
            if g.left == 0:  # the last member: hold nothing past the forward
                g.x, g.parts = None, None
            return part
        return F.linear(x, self.weight, self.bias)


def _plain(mod: nn.Module) -> bool:
    return (
        type(mod) is nn.Linear
        and not mod._forward_hooks
        and not mod._forward_pre_hooks
        and not hasattr(mod, "_hf_hook")
        and mod.weight.device.type != "meta"
    )


def _calls(model: Any, run: Any) -> list[tuple[str, torch.Tensor]]:
    """(name, input) of every plain linear module, in call order, during `run()`."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, mod in model.named_modules():
        if _plain(mod):

            def pre(m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    seen.append((name, args[0]))

            handles.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


def find_groups(model: Any, run: Any) -> list[list[str]]:
    """Names of sibling plain linears called on one input tensor during `run()`, per group
    (in call order; each group >= 2 modules with one dtype, device and in-width, all with a
    bias or none)."""
    groups: list[list[str]] = []
    current: list[str] = []
    current_x: torch.Tensor | None = None
    modules = dict(model.named_modules())

    def compatible(a: nn.Linear, b: nn.Linear) -> bool:
        return (
            a.weight.dtype == b.weight.dtype
            and a.weight.device == b.weight.device
            and a.in_features == b.in_features
            and (a.bias is None) == (b.bias is None)
        )

    def close() -> None:
        if len(current) > 1:
            groups.append(list(current))

    done: set[str] = set()
    for name, x in _calls(model, run):
        parent = name.rpartition(".")[0]
        same = (
            current
            and x is current_x
            and current[0].rpartition(".")[0] == parent
            and name not in current
            and compatible(modules[current[0]], modules[name])
        )
        if same:
            current.append(name)
            continue
        close()
        current, current_x = ([], None) if name in done else ([name], x)
        done.add(name)
    close()
    return groups


def fuse_projections(model: Any, run: Any) -> int:
    """Fuse every group `find_groups(model, run)` finds (see the module docstring); the number
    of modules that now share a group's matmul."""
    groups = find_groups(model, run)
    fused = 0
    for names in groups:
        mods = [model.get_submodule(n) for n in names]
        with torch.no_grad():
            weight = torch.cat([m.weight for m in mods])  # [N, H]
            bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods])  # [N]
        sizes = [m.out_features for m in mods]
        group = _Group(sizes)
        start = 0
        for i, (name, size) in enumerate(zip(names, sizes, strict=True)):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            member = FusedLinear(
                group,
                i,
                weight[start : start + size],
                None if bias is None else bias[start : start + size],
                (weight, bias) if i == 0 else None,
            )
            setattr(parent, attr, member)
            start += size
        fused += len(names)
    if groups:
        log.info("fused %d projections into %d matmuls", fused, len(groups))
    return fused


__all__ = ["FusedLinear", "find_groups", "fuse_projections"]
