"""Dropped mass: how much routing probability the full model gives to experts that are not resident.

For every token and MoE layer, the *dropped mass* is the share of the routing weight the FULL
router (all E rows, before any masking) gives to experts the device does not hold:

    dropped[t, l] = Σ_{j ≤ k} w[t, l, j] · 1[i[t, l, j] ∉ S_l] / Σ_{j ≤ k} w[t, l, j]

where (w, i) are the full router's top-k weights and expert ids. 0 means the pruned model routes
that token exactly as the full model would (for renormalising routers); values near 1 mean the
prompt lives where the pattern never looked. On the bundled demo model, at 48 of 64 experts kept,
in-task prompts measure 0.000-0.001 and prompts of other tasks 0.01-0.34; the plain probability
mass outside S (Σ_{e ∉ S} p_e) separates them less well (0.04-0.05 versus 0.06-0.30), because
a softmax router spreads a tail over experts it never routes to.

`MissMeter` hooks the routers of a model and measures it, with two sources of full logits:

- ``"shadow"`` (pruned models, whose routers hold only the K resident rows): the meter keeps the
  full router rows beside the model (`FullRouterRows`, E·H per layer: 0.5 MB for a 2048-wide,
  128-expert layer) and, at decode sizes, stacks every layer's router input and computes all
  layers' logits and top-k in one batched pass after the forward, so a decode step costs a
  handful of kernels, not a handful per layer. The top-k is taken over the scores plus the
  correction bias where the family has one; group-limited choice is not replayed (a measure,
  not a route);
- ``"router"`` (models whose routers already hold all E rows, as `FetchingModel`'s do): the
  weights and ids the router computed anyway (with the family's own rule) are read from its
  output.

Results go into a `MassAccumulator` (per batch row, on the device, no host sync per token);
`MassAccumulator.summary(row)` gives the per-request `DroppedMass` (one host sync).

CUDA graphs (serve's decode step, `premoe.serve.graphs`) replay kernels, not Python hooks, so a
captured step cannot run the measuring hooks. `enable_tap(rows)` gives the shadow meter a
persistent buffer [L, rows, H]; inside `tapping()` (the graph's warm-up and capture runs) the
router hooks only copy their inputs into it (one copy per layer, captured with the step), and
`tapped(b)`, captured right after the step, measures what the buffer then holds with the same
batched pass as an eager decode step (premoe.serve.miss accumulates it inside the graph too).

Shape legend: B batch rows, S tokens per row in this forward, T = B·S, H hidden size, E routed
experts, L MoE layers.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from premoe.arch.model import router_module
from premoe.arch.routing import RoutingRule, decode_router_output
from premoe.arch.spec import ArchSpec
from premoe.errors import UsageError
from premoe.source import ModelSource

log = logging.getLogger(__name__)

BATCH_TOKENS = 64
"""Forwards of at most this many tokens (decode steps) are measured in one batched matmul after
the forward; longer ones (prompts) layer by layer, so no [L, T, H] stack is ever held."""


@dataclass
class DroppedMass:
    """One request's dropped mass over the tokens it measured (see the module doc)."""

    tokens: int
    mean: float  # over tokens and MoE layers
    max: float  # over tokens of the token's mean over layers
    max_layer: float  # over tokens and layers
    per_layer: list[float]  # mean over tokens, one per MoE layer (in layer order)

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "mean": self.mean,
            "max": self.max,
            "max_layer": self.max_layer,
            "per_layer": self.per_layer,
        }

    @classmethod
    def empty(cls, layers: int) -> DroppedMass:
        return cls(0, 0.0, 0.0, 0.0, [0.0] * layers)


class MassAccumulator:
    """Running dropped-mass sums of `rows` batch rows (requests), kept on the device.

    `add(dropped, mask)` folds one forward's values in without reading anything back;
    `summary(row)` and `window()` are the only host syncs. The window (since the last `window()`
    call) is what miss policies watch: its mean per row over tokens and layers; with `tail`, only
    the last `tail` tokens of each forward count towards it (a prompt's end, not its start).
    """

    def __init__(
        self,
        layers: int,
        rows: int = 1,
        device: torch.device | str = "cpu",
        *,
        tail: int | None = None,
        pool: bool = False,
    ) -> None:
        """`pool`: fold every batch row into row 0 (one figure over all requests of a run)."""
        self.layers, self.rows, self.tail, self.pool = layers, rows, tail, pool
        dev = torch.device(device)
        self.sum = torch.zeros(rows, layers, dtype=torch.float32, device=dev)  # [B, L]
        self.max_layer = torch.zeros(rows, layers, dtype=torch.float32, device=dev)  # [B, L]
        self.max_token = torch.zeros(rows, dtype=torch.float32, device=dev)  # [B]
        self.count = torch.zeros(rows, dtype=torch.float32, device=dev)  # [B]
        self.win_sum = torch.zeros(rows, dtype=torch.float32, device=dev)  # [B]
        self.win_count = torch.zeros(rows, dtype=torch.float32, device=dev)  # [B]

    def add(self, dropped: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Fold in `dropped` [L, B, S] (mask [B, S]: 1 for real tokens) of one forward.
        A decode step without padding costs about ten small kernels, and no sync."""
        d = dropped.float()
        if self.pool:
            d = d.reshape(d.shape[0], 1, -1)  # [L, 1, B·S]
            mask = None if mask is None else mask.reshape(1, -1)
        s = d.shape[-1]
        tail = s if self.tail is None else min(s, self.tail)
        m: torch.Tensor | None = None
        if mask is not None:
            m = mask.to(d.device, torch.float32)  # [B, S]
            d = d * m
        self.sum += d.sum(-1).T  # [B, L]
        torch.maximum(self.max_layer, d.amax(-1).T, out=self.max_layer)
        per_token = d.mean(0)  # [B, S] (padding: 0)
        torch.maximum(self.max_token, per_token.amax(-1), out=self.max_token)
        self.win_sum += per_token[:, -tail:].sum(-1) if tail < s else per_token.sum(-1)
        if m is None:
            self.count += s
            self.win_count += tail
        else:
            self.count += m.sum(-1)
            self.win_count += m[:, -tail:].sum(-1)

    def window(self, rows: Sequence[int] | None = None) -> list[float]:
        """Mean dropped mass per row since the last call (tokens and layers; 0 with no token),
        then a new window starts. One host sync. `rows`: only these rows (in that order) are
        read and restarted (rows of a continuous batch check their windows out of phase)."""
        if rows is None:
            both = torch.stack((self.win_sum, self.win_count)).cpu()  # [2, B]
            self.win_sum.zero_()
            self.win_count.zero_()
        else:
            idx = torch.tensor(list(rows), dtype=torch.long, device=self.win_sum.device)
            both = torch.stack((self.win_sum[idx], self.win_count[idx])).cpu()  # [2, R]
            self.win_sum[idx] = 0
            self.win_count[idx] = 0
        return [float(s / n) if n > 0 else 0.0 for s, n in zip(both[0], both[1], strict=True)]

    def _packed(self, rows: int) -> torch.Tensor:
        return torch.cat(  # [R, 2 L + 2]: sum, max_layer, max_token, count
            (
                self.sum[:rows],
                self.max_layer[:rows],
                self.max_token[:rows, None],
                self.count[:rows, None],
            ),
            dim=1,
        )

    def snapshot(self, rows: int) -> torch.Tensor:
        """Rows 0..rows-1 as they will be once the work queued so far has run, copied to the
        host without waiting for it: read it (`summary(row, snapshot)`) after that work."""
        packed = self._packed(rows)
        if packed.device.type != "cuda":
            return packed
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        return host.copy_(packed, non_blocking=True)

    def summary(self, row: int = 0, snapshot: torch.Tensor | None = None) -> DroppedMass:
        """Row `row`'s figures: from a `snapshot`, else read from the device (one sync)."""
        packed = (self._packed(row + 1) if snapshot is None else snapshot)[row].cpu()  # [2L+2]
        n, layers = float(packed[-1]), self.layers
        if n <= 0:
            return DroppedMass.empty(layers)
        per_layer = (packed[:layers] / n).tolist()
        return DroppedMass(
            tokens=int(n),
            mean=float(sum(per_layer) / max(1, len(per_layer))),
            max=float(packed[2 * layers]),
            max_layer=float(packed[layers : 2 * layers].max()),
            per_layer=[float(x) for x in per_layer],
        )

    def reset(self, row: int | None = None) -> None:
        """Zero one row (a finished request's slot in a batch) or all."""
        rows = slice(None) if row is None else slice(row, row + 1)
        for t in (self.sum, self.max_layer, self.max_token, self.count):
            t[rows] = 0
        self.win_sum[rows] = 0
        self.win_count[rows] = 0


@dataclass
class FullRouterRows:
    """All E router rows of every MoE layer, stacked on one device: weight [L, E, H] and the
    logit bias [L, E] where the family has one."""

    layers: list[int]
    weight: torch.Tensor  # [L, E, H]
    bias: torch.Tensor | None  # [L, E]
    correction: torch.Tensor | None = None  # [L, E] selection-only bias

    @classmethod
    def from_source(
        cls, source: ModelSource, device: torch.device | str, dtype: torch.dtype
    ) -> FullRouterRows:
        km, reader, arch = source.keymap, source.reader, source.arch
        layers = list(source.moe_layers)
        w = [reader.get(km.router_key(n, "weight")) for n in layers]  # [E, H] each
        has_bias = any(t.role == "logit_bias" for t in arch.router_tensors)
        b = [reader.get(km.router_key(n, "logit_bias")) for n in layers] if has_bias else None
        weight = torch.stack([x.to(dtype) for x in w]).to(device)
        bias = torch.stack([x.reshape(-1).float() for x in b]).to(device) if b else None
        corr = None
        if arch.correction_bias is not None:
            c = [reader.get(km.router_key(n, "correction_bias")).reshape(-1) for n in layers]
            corr = torch.stack([x.float() for x in c]).to(device)
        return cls(layers, weight, bias, corr)


def resident_mask(
    layers: Sequence[int], keep: Mapping[int, Sequence[int]], num_experts: int, device: Any
) -> torch.Tensor:
    """[L, E] float: 1.0 where expert e of layer l is NOT resident."""
    m = torch.ones(len(layers), num_experts, dtype=torch.float32)
    for i, layer in enumerate(layers):
        m[i, list(keep[layer])] = 0.0
    return m.to(device)


class MissMeter:
    """Measures the dropped mass of every forward of `model` into `self.target`.

    `MissMeter(model, arch, keep, rows=FullRouterRows)` for a pruned model (``"shadow"``
    logits), or `MissMeter(model, arch, keep)` with `rows=None` for a model whose routers hold
    all E rows (``"router"`` logits). `keep` maps each MoE layer to its resident original
    expert ids; `set_resident` / `set_expert` update it in place (device tensor, no realloc).

    Use as a context manager (hooks attached inside). Set `target` to a `MassAccumulator`
    before a forward (None: nothing measured, almost nothing spent). `paused()` stops measuring
    (forwards that are not requests' tokens, e.g. computing a routing key).
    """

    def __init__(
        self,
        model: Any,
        arch: ArchSpec,
        keep: Mapping[int, Sequence[int]],
        *,
        num_experts: int,
        rows: FullRouterRows | None = None,
    ) -> None:
        self.model = model
        self.arch = arch
        self.layers = list(arch.moe_layer_ids(model.config))
        if set(keep) != set(self.layers):
            raise UsageError(f"the resident sets must cover the MoE layers {self.layers}")
        self.num_experts = num_experts
        self.rows = rows
        self.scoring = arch.router.scoring
        self.rule = replace(RoutingRule.from_arch(arch, model.config), num_experts=num_experts)
        device = next(model.parameters()).device
        if rows is not None:
            device = rows.weight.device
        self.device = device
        self.nonresident = resident_mask(self.layers, keep, num_experts, device)  # [L, E]
        self.target: MassAccumulator | None = None
        self._paused = False
        self._shape: tuple[int, int] | None = None  # (B, S) of the forward running
        self._mask: torch.Tensor | None = None  # [B, S] of the forward running
        self._inputs: list[torch.Tensor] = []  # router inputs [T, H] (batched path)
        self._dropped: list[torch.Tensor] = []  # per-layer dropped [T] (layer-by-layer path)
        self._handles: list[Any] = []
        self._tap: torch.Tensor | None = None  # [L, N, H] router inputs of a captured step
        self._tapping = False

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> MissMeter:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        if self._handles:
            return
        self._handles.append(self.model.register_forward_pre_hook(self._begin, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._end))
        for i, layer in enumerate(self.layers):
            router = router_module(self.model, self.arch, layer)
            if self.rows is None:
                self._handles.append(router.register_forward_hook(self._router_out(i)))
            else:
                self._handles.append(router.register_forward_pre_hook(self._router_in(i)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        old, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = old

    # -- CUDA graphs ---------------------------------------------------------------------------
    def enable_tap(self, rows: int) -> None:
        """Allocate the tap buffer for forwards of up to `rows` rows of one token (shadow only)."""
        if self.rows is None:
            raise UsageError("only a shadow meter (full router rows beside the model) can tap")
        _, _, h = self.rows.weight.shape
        w = self.rows.weight
        self._tap = torch.zeros(len(self.layers), rows, h, dtype=w.dtype, device=w.device)

    @contextmanager
    def tapping(self) -> Iterator[None]:
        """Forwards inside only copy their router inputs into the tap buffer (no measuring)."""
        if self._tap is None:
            raise UsageError("enable_tap() first")
        old, self._tapping = self._tapping, True
        try:
            yield
        finally:
            self._tapping = old

    def tapped(self, b: int) -> torch.Tensor:
        """Dropped mass [L, b] of rows 0..b-1 (one token each) of the forward whose router
        inputs are in the tap buffer: the same batched pass as an eager decode step. Sync-free,
        so it can be captured after the step it measures."""
        if self._tap is None:
            raise UsageError("enable_tap() first")
        return self._batched(self._tap[:, :b])

    # -- residency -------------------------------------------------------------------------------
    def set_resident(self, keep: Mapping[int, Sequence[int]]) -> None:
        new = resident_mask(self.layers, keep, self.num_experts, "cpu")
        self.nonresident.copy_(new)

    def set_expert(self, layer: int, expert: int, resident: bool) -> None:
        self.nonresident[self.layers.index(layer), expert] = 0.0 if resident else 1.0

    # -- measuring -------------------------------------------------------------------------------
    def _active(self) -> bool:
        return self.target is not None and not self._paused and self._shape is not None

    def _begin(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if self._tapping:
            return
        self._inputs.clear()
        self._dropped.clear()
        self._shape = self._mask = None
        if self.target is None or self._paused:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return
        b, s = int(ids.shape[0]), int(ids.shape[1])
        self._shape = (b, s)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == b:
            self._mask = mask[:, -s:]

    def _from_logits(self, logits: torch.Tensor, index: int | None) -> torch.Tensor:
        """Dropped mass [..., T] of full logits [..., T, E] (layer `index`, or all layers when
        the logits are stacked [L, T, E])."""
        assert self.rows is not None
        logits = logits.float()
        if self.rows.bias is not None:
            bias = self.rows.bias if index is None else self.rows.bias[index]  # [L, E] / [E]
            logits = logits + (bias.unsqueeze(1) if index is None else bias)
        if self.scoring == "softmax" and self.rows.correction is None:
            top, idx = logits.topk(self.rule.top_k, dim=-1)  # softmax keeps the order
            return self._share(top.softmax(-1), idx, index)  # renormalised top-k weights
        p = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(-1)
        choice = p
        if self.rows.correction is not None:
            c = self.rows.correction if index is None else self.rows.correction[index]
            choice = p + (c.unsqueeze(1) if index is None else c)
        idx = choice.topk(self.rule.top_k, dim=-1).indices  # [..., T, k]
        return self._share(p.gather(-1, idx), idx, index)

    def _share(self, w: torch.Tensor, idx: torch.Tensor, index: int | None) -> torch.Tensor:
        """Σ_j w·1[idx ∉ S] / Σ_j w for weights and ids [..., T, k]."""
        if index is None:
            nonres = self.nonresident.unsqueeze(1).expand(-1, idx.shape[1], -1)  # [L, T, E]
            miss = nonres.gather(-1, idx)  # [L, T, k]
        else:
            miss = self.nonresident[index][idx]  # [T, k]
        w = w.float()
        return (w * miss).sum(-1) / w.sum(-1).clamp(min=1e-20)

    def _router_in(self, index: int) -> Any:
        # a partial, not a closure: a compiled layer (premoe.serve.graphs.Regions) traces its
        # argument as a symbolic int, so one graph serves every layer
        return functools.partial(self._router_in_hook, index)

    def _router_in_hook(self, index: int, module: torch.nn.Module, args: Any) -> None:
        if self._tapping:
            assert self._tap is not None
            x = args[0].reshape(-1, args[0].shape[-1])  # [B, H]
            rows = torch.arange(x.shape[0], device=x.device)  # [B]
            # tap[index, :B] = x as one index_put: a write through a view would make a
            # compiled step copy the whole buffer
            self._tap.index_put_((torch.full_like(rows, index), rows), x.to(self._tap.dtype))
            return
        if not self._active():
            return
        assert self.rows is not None
        x = args[0].reshape(-1, args[0].shape[-1])  # [T, H]
        if x.shape[0] <= BATCH_TOKENS:
            self._inputs.append(x)
            return
        w = self.rows.weight[index]  # [E, H]
        logits = torch.nn.functional.linear(x.to(w.dtype), w)  # [T, E]
        self._dropped.append(self._from_logits(logits, index))  # [T]

    def _router_out(self, index: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
            if not self._active():
                return
            routing = decode_router_output(out, self.rule)  # the router's own full routing
            self._dropped.append(self._share(routing.weights, routing.indices, index))  # [T]

        return hook

    def _full_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The full routers' logits [L, T, E] of every layer's router inputs x [L, T, H]."""
        assert self.rows is not None
        return torch.bmm(x.to(self.rows.weight.dtype), self.rows.weight.transpose(1, 2))

    def _batched(self, x: torch.Tensor) -> torch.Tensor:
        """Dropped mass [L, T] from every layer's router inputs x [L, T, H] in one pass."""
        return self._from_logits(self._full_logits(x), None)  # [L, T, E] -> [L, T]

    def _end(self, module: Any, args: Any, out: Any) -> None:
        if self._tapping or not self._active():
            return
        assert self._shape is not None and self.target is not None
        b, s = self._shape
        if self._inputs:
            dropped = self._batched(torch.stack(self._inputs))  # [L, T]
        elif self._dropped:
            dropped = torch.stack(self._dropped)  # [L, T]
        else:
            return
        if dropped.numel() != len(self.layers) * b * s:
            log.debug("dropped mass: %d values for a [%d, %d] batch", dropped.numel(), b, s)
            return
        self.target.add(dropped.reshape(len(self.layers), b, s), self._mask)
        self._inputs.clear()
        self._dropped.clear()


def shadow_meter(model: Any, source: ModelSource, keep: Mapping[int, Sequence[int]]) -> MissMeter:
    """A `MissMeter` for a pruned model of `source` (its routers hold the resident rows only):
    the full router rows are read from the checkpoint onto the model's device."""
    router = router_module(model, source.arch, source.moe_layers[0])
    w = router.get_parameter(source.arch.router_weight.memory.rsplit(".", 1)[1])
    rows = FullRouterRows.from_source(source, w.device, w.dtype)
    return MissMeter(model, source.arch, keep, num_experts=source.num_experts, rows=rows)


__all__ = [
    "BATCH_TOKENS",
    "DroppedMass",
    "FullRouterRows",
    "MassAccumulator",
    "MissMeter",
    "resident_mask",
    "shadow_meter",
]
