"""Mixed patterns in one batch: per-row router masks over a resident union of experts.

When the experts of several patterns fit the device together, the resident model holds their
union (U slots per MoE layer, sorted by original id, padded with unused experts to a uniform U).
Each row of a batch then routes only among its own pattern's experts: during the forward every
MoE router's logits `[T, U]` get a per-token additive mask (0 for the row's pattern, -inf for
every other slot), T = B x S tokens in row-major order. This is `premoe.prune.mask`'s
masked-routing reference applied per row, so a row computes exactly what its pattern's own pruned
model computes (DESIGN.md invariant 1): softmax over -inf gives 0, top-k never picks a masked
slot, and the pattern's experts keep their relative order.

The logits are caught where every family's router makes them, `torch.nn.functional.linear` on the
router weight (recognised by its storage), for the duration of one forward (`applied`). Families
with a selection-only correction bias (sigmoid routers: DeepSeek-V3, GLM-4.5, ...) would need the
bias masked per row too, and group-limited routers a consistent group structure: for those
`unsupported` says why, and the engine swaps patterns instead. `verify` runs one token to check
that every router was seen (a router that copies its weight first, e.g. `.float()` of a bf16
weight, would not be).

Shape legend: B rows, S tokens per row, L MoE layers (in `layers` order), U resident slots.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from premoe.arch.spec import ArchSpec
from premoe.load.loader import moe_layer, tensor_of
from premoe.prune import KeepSets


def unsupported(arch: ArchSpec, config: Any) -> str | None:
    """None when per-row masks are exact for this family, else why not."""
    if arch.correction_bias is not None:
        return "the router has a selection-only correction bias"
    if arch.groups(config) != (1, 1):
        return "the router is group-limited"
    return None


def union_keep(patterns: Mapping[str, KeepSets], num_experts: int) -> KeepSets:
    """The union of `patterns` per layer, padded with the lowest unused ids to one count."""
    layers = next(iter(patterns.values())).layers
    union = {
        layer: set().union(*(set(k.layers[layer]) for k in patterns.values())) for layer in layers
    }
    width = max(len(u) for u in union.values())
    out = {}
    for layer, ids in union.items():
        spare = (e for e in range(num_experts) if e not in ids)
        while len(ids) < width:
            ids.add(next(spare))
        out[layer] = sorted(ids)
    return KeepSets.from_mapping(out)


class RowRouting:
    """Per-pattern masks over the resident `union` and the F.linear hook that applies them."""

    def __init__(
        self, model: Any, arch: ArchSpec, union: KeepSets, patterns: Mapping[str, KeepSets]
    ) -> None:
        self.layers = sorted(union.layers)
        self.union = union
        device = next(model.parameters()).device
        self._index: dict[int, int] = {}  # router weight data_ptr -> position in `layers`
        for i, layer in enumerate(self.layers):
            weight = tensor_of(moe_layer(model, arch, layer), arch.router_weight.memory)
            self._index[weight.data_ptr()] = i
        width = union.count
        self.names = list(patterns)
        masks = torch.full((len(self.names), len(self.layers), width), float("-inf"))
        for p, name in enumerate(self.names):
            for i, layer in enumerate(self.layers):
                slot = {e: s for s, e in enumerate(union.layers[layer])}
                kept = [slot[e] for e in patterns[name].layers[layer]]
                masks[p, i, kept] = 0.0
        self.masks = masks.to(device)  # [P, L, U]
        self.hits = 0

    def rows(self, names: Sequence[str | None]) -> torch.Tensor:
        """[B, L, U] masks of rows whose patterns are `names` (None: an idle row, no mask)."""
        idx = [self.names.index(n) if n is not None else -1 for n in names]
        out = self.masks[[max(i, 0) for i in idx]]  # [B, L, U]
        idle = [b for b, i in enumerate(idx) if i < 0]
        if idle:
            out[idle] = 0.0
        return out

    @contextmanager
    def applied(self, rows: torch.Tensor, tokens_per_row: int) -> Iterator[None]:
        """During the block, router logits of token (b, s) get `rows[b, layer]` added."""
        per_layer = rows.repeat_interleave(tokens_per_row, 0).transpose(0, 1)  # [L, B*S, U]
        index, original = self._index, F.linear

        def linear(
            x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
        ) -> torch.Tensor:
            out = original(x, weight, bias)
            i = index.get(weight.data_ptr())
            if i is None:
                return out
            self.hits += 1
            m = per_layer[i].to(out.dtype)  # [B*S, U]
            return out + (m if out.dim() == 2 else m.view(*out.shape[:-1], -1))

        torch.nn.functional.linear = linear
        try:
            yield
        finally:
            torch.nn.functional.linear = original

    def verify(self, model: Any) -> str | None:
        """Run one token through `model`; None when every router took its mask."""
        self.hits = 0
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.masks.device)
        with torch.no_grad(), self.applied(self.rows([self.names[0]]), 1):
            model(input_ids=ids, use_cache=False)
        if self.hits != len(self.layers):
            return f"{self.hits} of {len(self.layers)} routers were seen by the row-mask hook"
        return None
