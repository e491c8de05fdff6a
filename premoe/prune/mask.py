"""The masked-routing reference: the full model, allowed to route only to kept experts.

Invariant 1 of DESIGN.md compares a pruned model with this reference. Inside
`masked_routing(model, arch, keep)` every MoE router of `model` scores dropped experts at -inf:
the router's logits get a 0/-inf mask added (by wrapping `torch.nn.functional.linear`, which every
family's router calls on its weight), and families with a selection-only correction bias get
that bias forced to -inf for dropped experts too (a -inf logit alone leaves sigmoid(-inf) + bias
selectable). Group-limited routers can be switched to one group to mirror a pruned model that fell
back (`n_group=1`). Everything is restored on exit. Exact in fp32: routers that upcast a bf16
weight with `.float()` make a copy that the mask does not recognise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from premoe.arch.model import moe_layer
from premoe.arch.spec import ArchSpec
from premoe.prune.keepsets import KeepSets


def _mask(num_experts: int, kept: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    m = torch.full((num_experts,), float("-inf"), dtype=torch.float32, device=like.device)
    m[list(kept)] = 0.0
    return m  # [E]


@contextmanager
def masked_routing(
    model: Any, arch: ArchSpec, keep: KeepSets, *, single_group: bool = False
) -> Iterator[None]:
    config = model.config
    num_experts = arch.num_experts(config)
    masks: dict[int, torch.Tensor] = {}
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    saved_attrs: list[tuple[Any, str, Any]] = []
    for layer, kept in keep.layers.items():
        mod = moe_layer(model, arch, layer)
        w = mod.get_submodule(arch.router_weight.memory.rsplit(".", 1)[0])
        weight = getattr(w, arch.router_weight.memory.rsplit(".", 1)[1])
        masks[weight.data_ptr()] = _mask(num_experts, kept, weight)
        for t in arch.router_tensors:
            if t.role == "correction_bias":
                owner, name = t.memory.rsplit(".", 1)
                bias = getattr(mod.get_submodule(owner), name)
                saved.append((bias, bias.detach().clone()))
                with torch.no_grad():
                    drop = [e for e in range(num_experts) if e not in kept]
                    bias.index_fill_(
                        t.dim % bias.dim(), torch.tensor(drop, dtype=torch.long), float("-inf")
                    )
        if single_group:
            router = mod.get_submodule(arch.router.module)
            for owner in (router, mod.get_submodule(arch.block)):
                for attr in ("n_group", "num_group", "topk_group"):
                    if hasattr(owner, attr):
                        saved_attrs.append((owner, attr, getattr(owner, attr)))
                        setattr(owner, attr, 1)
    original = F.linear

    def linear(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = original(x, weight, bias)
        m = masks.get(weight.data_ptr())
        if m is not None and out.shape[-1] == m.numel():
            out = out + m.to(out.dtype)  # [T, E]
        return out

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = original
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)
        for owner, attr, value in saved_attrs:
            setattr(owner, attr, value)
