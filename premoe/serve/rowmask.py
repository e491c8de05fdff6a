"""Mixed patterns in one batch: per-row router masks over a resident union of experts.

When the experts of several patterns fit the device together, the resident model holds their
union (U slots per MoE layer, sorted by original id, padded with unused experts to a uniform U).
Each row of a batch then routes only among its own pattern's experts: during the forward every
MoE router's logits `[T, U]` get a per-token additive mask (0 for the row's pattern, -inf for
every other slot), T = B x S tokens in row-major order. This is `premoe.prune.mask`'s
masked-routing reference applied per row, so a row computes exactly what its pattern's own pruned
model computes (DESIGN.md invariant 1): softmax over -inf gives 0, top-k never picks a masked
slot, and the pattern's experts keep their relative order.

The logits are caught where every family's router makes them: the first
`torch.nn.functional.linear` call (of the union's width) inside a router module's forward (a
forward pre-hook on each router says which layer runs), while `F.linear` is patched (`hooked`)
and rows are set (`use`); `applied` does both for one forward. Nothing in the hook depends on a
tensor's storage or creates a closure per forward, so a `torch.compile`d step traces it without a
graph break (the decode graphs patch `F.linear` around the traced step and set the rows inside
it). Families
with a selection-only correction bias (sigmoid routers: DeepSeek-V3, GLM-4.5, ...) would need the
bias masked per row too, and group-limited routers a consistent group structure: for those
`unsupported` says why, and the engine swaps patterns instead. `verify` runs one token to check
that every router was seen.

Patterns with their own router weights (calibrated routers, `premoe.calibrate.served`): each
layer then also holds a stacked `[P, U, H]` router weight, pattern p's rows over the union (its
own rows in its slots, the source's elsewhere, masked anyway), and the hook computes every
token's logits with its row's pattern's weight (`F.linear` once per pattern, then a gather by
the token's pattern), so a row still computes what its pattern's own model computes. Only for
weight-only routers (`unsupported_routers`); a router with a logit bias is swapped instead.

Shape legend: B rows, S tokens per row, L MoE layers (in `layers` order), U resident slots.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from premoe.arch.model import router_module
from premoe.arch.spec import ArchSpec
from premoe.errors import KeepSetError
from premoe.load.loader import moe_layer, tensor_of
from premoe.load.routers import RouterTensors
from premoe.prune import KeepSets
from premoe.runtime import upload
from premoe.serve import gemv_linear


def unsupported(arch: ArchSpec, config: Any) -> str | None:
    """None when per-row masks are exact for this family, else why not."""
    if arch.correction_bias is not None:
        return "the router has a selection-only correction bias"
    if arch.groups(config) != (1, 1):
        return "the router is group-limited"
    return None


def unsupported_routers(arch: ArchSpec) -> str | None:
    """None when per-row router weights (patterns' own routers) are exact for this family."""
    extra = sorted({t.role for t in arch.router_tensors} - {"weight"})
    if extra:
        return f"per-row calibrated routers need a weight-only router (this one has {extra})"
    return None


class Rows(NamedTuple):
    """What one forward's rows route with: masks and the pattern index of every row."""

    masks: torch.Tensor  # [B, L, U] additive
    index: torch.Tensor  # [B] long: position in `RowRouting.names` (idle rows: 0)


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
        self,
        model: Any,
        arch: ArchSpec,
        union: KeepSets,
        patterns: Mapping[str, KeepSets],
        routers: Mapping[str, RouterTensors | None] | None = None,
    ) -> None:
        self.layers = sorted(union.layers)
        self.union = union
        device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype  # of the activations, so of the logits
        self._layer: int | None = None  # the router running (set by its pre-hook)
        self._per_layer: torch.Tensor | None = None  # [L, T, U] masks of the forward running
        self._token_pattern: torch.Tensor | None = None  # [T] pattern index of every token
        self._linear = torch.nn.functional.linear
        for i, layer in enumerate(self.layers):
            router = router_module(model, arch, layer)
            router.register_forward_pre_hook(functools.partial(self._router_starts, i))
        self._hook = self._make_hook()  # one function: compiled steps guard on its identity
        width = union.count
        self.names = list(patterns)
        masks = torch.full((len(self.names), len(self.layers), width), float("-inf"))
        for p, name in enumerate(self.names):
            for i, layer in enumerate(self.layers):
                slot = {e: s for s, e in enumerate(union.layers[layer])}
                kept = [slot[e] for e in patterns[name].layers[layer]]
                masks[p, i, kept] = 0.0
        self.masks = masks.to(device)  # [P, L, U]
        self._last: tuple[tuple[str | None, ...], Rows] | None = None  # `rows`' last answer
        self.hits = 0
        own = {n: r for n, r in (routers or {}).items() if r is not None and n in patterns}
        self.weights: torch.Tensor | None = None  # [L, P, U, H]; None: shared
        if own:
            why = unsupported_routers(arch)
            if why is not None:
                raise KeepSetError(why)
            self.weights = self._stack(model, arch, union, patterns, own)

    def _stack(
        self,
        model: Any,
        arch: ArchSpec,
        union: KeepSets,
        patterns: Mapping[str, KeepSets],
        own: Mapping[str, RouterTensors],
    ) -> torch.Tensor:
        """[L, P, U, H]: every pattern's router rows over the union's slots, per layer (one
        tensor: a compiled layer indexes it with its symbolic layer index, graphs.Regions)."""
        out = []
        for layer in self.layers:
            weight = tensor_of(moe_layer(model, arch, layer), arch.router_weight.memory)  # [U, H]
            stacked = weight.detach().unsqueeze(0).repeat(len(self.names), 1, 1)  # [P, U, H]
            slot = {e: s for s, e in enumerate(union.layers[layer])}
            for p, name in enumerate(self.names):
                if name not in own:
                    continue
                rows = own[name][layer]["weight"]  # [K, H] in the pattern's slot order
                kept = torch.tensor([slot[e] for e in patterns[name].layers[layer]])
                stacked[p, kept.to(stacked.device)] = rows.to(stacked.device, stacked.dtype)
            out.append(stacked)
        return torch.stack(out)

    def rows(self, names: Sequence[str | None]) -> Rows:
        """Masks [B, L, U] and pattern indices [B] of rows whose patterns are `names` (None:
        an idle row, no mask). The same names as the last call return the same `Rows` (no
        device work; `DecodeGraphs.run` then copies nothing): decode steps repeat them."""
        key = tuple(names)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        idx = torch.tensor([self.names.index(n) if n is not None else -1 for n in names])
        # one pinned, non-blocking upload: a step may be in flight (continuous.py)
        dev = upload(torch.stack((idx.clamp(min=0), (idx >= 0).long())), self.masks.device)
        out = torch.where(dev[1, :, None, None] > 0, self.masks[dev[0]], 0.0)  # [B, L, U]
        self._last = (key, Rows(out, dev[0]))
        return self._last[1]

    def _router_starts(self, i: int, module: Any, args: Any) -> None:
        self._layer = i

    def _make_hook(self) -> Any:
        # the logits through the decode step's one-row GEMV while that is patched in
        original, width = gemv_linear.over(self._linear), self.union.count

        def linear(
            x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
        ) -> torch.Tensor:
            i, per_layer = self._layer, self._per_layer
            if i is None or per_layer is None or weight.shape[0] != width:
                return original(x, weight, bias)
            self._layer = None  # the router's logits: later linears of the layer pass
            if not torch.compiler.is_compiling():  # a traced count would be guarded per layer
                self.hits += 1
            if bias is None and self.weights is None and x.numel() == x.shape[-1]:
                # one token: its mask is the matmul's bias (0 or -inf: adding it before or
                # after the rounding is the same), one kernel where the GEMV is patched in
                return original(x, weight, per_layer[i].to(x.dtype).view(-1))
            out = original(x, weight, bias)
            if self.weights is not None:  # every pattern's logits, then each token's own
                assert self._token_pattern is not None
                per = torch.stack([original(x, w, bias) for w in self.weights[i]])  # [P, ..., U]
                flat = per.reshape(per.shape[0], -1, per.shape[-1])  # [P, T, U]
                pick = self._token_pattern.view(1, -1, 1).expand(1, *flat.shape[1:])
                out = flat.gather(0, pick)[0].view(out.shape)
            m = per_layer[i].to(out.dtype)  # [T, U]
            return out + (m if out.dim() == 2 else m.view(*out.shape[:-1], -1))

        return linear

    def use(self, rows: Rows | None, tokens_per_row: int = 1) -> None:
        """Route the next forwards' tokens (B x `tokens_per_row`, row-major) by `rows`; None:
        stop. Takes effect while `hooked`."""
        self._layer = None
        if rows is None:
            self._per_layer = self._token_pattern = None
            return
        masks, index = rows
        if tokens_per_row > 1:
            masks = masks.repeat_interleave(tokens_per_row, 0)
            index = index.repeat_interleave(tokens_per_row)
        # in the logits' dtype once a forward, not a cast in every layer (0 and -inf are exact)
        self._per_layer = masks.transpose(0, 1).to(self.dtype)  # [L, T, U]
        self._token_pattern = index  # [T]

    @contextmanager
    def hooked(self) -> Iterator[None]:
        """During the block, router logits get the rows' masks (see `use`)."""
        if torch.nn.functional.linear is self._hook:
            yield
            return
        torch.nn.functional.linear = self._hook
        try:
            yield
        finally:
            torch.nn.functional.linear = self._linear
            self._layer = None

    @contextmanager
    def applied(self, rows: Rows, tokens_per_row: int) -> Iterator[None]:
        """During the block, router logits of token (b, s) get `rows.masks[b, layer]` added
        (and come from the row's pattern's own router weight, where patterns have their own)."""
        with self.hooked():
            self.use(rows, tokens_per_row)
            try:
                yield
            finally:
                self.use(None)

    def verify(self, model: Any) -> str | None:
        """Run one token through `model`; None when every router took its mask."""
        self.hits = 0
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.masks.device)
        with torch.no_grad(), self.applied(self.rows([self.names[0]]), 1):
            model(input_ids=ids, use_cache=False)
        if self.hits != len(self.layers):
            return f"{self.hits} of {len(self.layers)} routers were seen by the row-mask hook"
        return None
