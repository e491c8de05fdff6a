"""Forward hooks on the routers that accumulate expert-usage sums on the device.

`RoutingRecorder` hooks the router module (`arch.router.module`) of every MoE layer and, for the
`reap` metric only, the experts module. Each hook decodes the router output (`metrics.py`), masks
out padding tokens and adds the batch's contributions into a per-layer float64 accumulator that
lives on the router's own device (so `device_map="auto"` models work). Nothing in a hook reads a
value back to the host: no `.item()`, no `.cpu()`, no data-dependent shapes, so the GPU never
waits for Python.

Per-sample routing keys (DESIGN.md (a)) are taken in the same pass, from the first MoE layer:
``router_input``, the mean over the sample's real tokens of the hidden state entering the router,
and ``tcess``, the sample's own first-layer TCESS vector.

Shape legend: B batch, S sequence length, T = B·S tokens, H hidden size, E routed experts,
K experts per token, R accumulator rows, N samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from premoe.arch.model import (  # noqa: F401  (re-exported)
    correction_bias,
    experts_module,
    router_module,
)
from premoe.arch.spec import ArchSpec
from premoe.errors import UnsupportedArchitectureError
from premoe.patterns.store import KEY_KINDS
from premoe.profile.metrics import (
    ROW_COUNTS,
    Routing,
    RoutingRule,
    decode_router_output,
    scatter_rows,
    token_contributions,
)

log = logging.getLogger(__name__)


def mean_router_input(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample ``router_input`` keys [B, H]: the mean over real tokens of the router input.

    `x` is the hidden state entering the router ([B, S, H] or [T, H]); `mask` [B, S] is 1 for
    real tokens. Not normalised (the store normalises).
    """
    b, s = mask.shape
    x = x.reshape(b, s, x.shape[-1]).float()  # [B, S, H]
    m = mask.to(x.device, torch.float32, non_blocking=True).unsqueeze(-1)  # [B, S, 1]
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B, H]


def sample_tcess(
    routing: Routing,
    mask: torch.Tensor,
    rule: RoutingRule,
    threshold: float,
    tcess: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample ``tcess`` keys [B, E]: each sample's own TCESS vector at one layer.

    `mask` [B, S]; `tcess` [T, K] the per-token TCESS contributions if already computed.
    """
    b, s = mask.shape
    e = rule.num_experts
    flat_mask = mask.to(routing.indices.device, torch.float32).reshape(-1)  # [T]
    if tcess is None:
        tcess = token_contributions(routing, flat_mask, rule, ("tcess",), threshold)[0]
    sample = torch.arange(b * s, device=flat_mask.device) // s  # [T]
    flat = routing.indices + (sample * e).unsqueeze(1)  # [T, K]
    out = torch.zeros(b * e, dtype=torch.float32, device=flat_mask.device)
    out.index_add_(0, flat.reshape(-1), tcess.reshape(-1).float())
    n = flat_mask.view(b, s).sum(1, keepdim=True).clamp(min=1.0)  # [B, 1]
    return out.view(b, e) / n  # [B, E]


@dataclass
class Recorded:
    """What one task's pass produced (host tensors)."""

    sums: dict[str, torch.Tensor]  # row -> [L, E] float64 (rows: counts, tcess, ...)
    keys: dict[str, torch.Tensor]  # key kind -> [N, D] float32 (per-sample, not normalised)


class RoutingRecorder:
    """Hooks that accumulate, per MoE layer, the sums of the requested metric rows.

    Use: ``with RoutingRecorder(model, arch, rows, threshold) as rec:`` then, per batch,
    ``rec.start_batch(mask)`` before the forward; ``rec.collect()`` after the last batch of a
    task returns the sums and keys and resets the accumulators.
    """

    def __init__(
        self,
        model: Any,
        arch: ArchSpec,
        rows: tuple[str, ...],
        threshold: float = 0.0,
        *,
        keys: tuple[str, ...] = KEY_KINDS,
    ) -> None:
        self.model = model
        self.arch = arch
        self.rule = RoutingRule.from_arch(arch, model.config)
        self.layers = arch.moe_layer_ids(model.config)
        self.rows = tuple(rows)
        # rows summed by the router hook (frequency is counts / K, derived from counts)
        self.token_rows = tuple(r for r in self.rows if r in ("tcess", "paper-logits"))
        # accumulator rows: counts, the router-hook rows, then REAP (filled by the experts hook)
        self.acc_rows = (ROW_COUNTS, *self.token_rows, *(("reap",) if "reap" in self.rows else ()))
        self.threshold = float(threshold)
        self.key_kinds = tuple(keys)
        self._handles: list[Any] = []
        self._acc: dict[int, torch.Tensor] = {}  # layer -> [R, E] float64 on its device
        self._keys: dict[str, list[torch.Tensor]] = {k: [] for k in self.key_kinds}
        self._mask: torch.Tensor | None = None  # [B, S] float32 on the input device
        self._mask_on: dict[torch.device, torch.Tensor] = {}  # flat [T] copies per device
        self._routing: dict[int, Routing] = {}  # this batch's decoded routing (for REAP)

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> RoutingRecorder:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        first = self.layers[0]
        for layer in self.layers:
            router = router_module(self.model, self.arch, layer)
            self._handles.append(router.register_forward_hook(self._router_hook(layer)))
            if "reap" in self.rows:
                experts = experts_module(self.model, self.arch, layer)
                self._handles.append(
                    experts.register_forward_hook(self._experts_hook(layer), with_kwargs=True)
                )
        if "router_input" in self.key_kinds:
            router = router_module(self.model, self.arch, first)
            self._handles.append(router.register_forward_pre_hook(self._input_hook))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def start_batch(self, mask: torch.Tensor) -> None:
        """Set the attention mask [B, S] (1 = real token) of the batch about to run."""
        self._mask = mask.float()
        self._mask_on = {}
        self._routing = {}

    def collect(self) -> Recorded:
        """Move the task's sums and keys to the host and reset (one sync per task)."""
        e = self.rule.num_experts
        stacked = []
        for layer in self.layers:
            acc = self._acc.get(layer)
            if acc is None:
                acc = torch.zeros(len(self.acc_rows), e, dtype=torch.float64)
            stacked.append(acc.cpu())
        all_rows = torch.stack(stacked, 1)  # [R, L, E]
        sums = {name: all_rows[i].clone() for i, name in enumerate(self.acc_rows)}
        keys = {
            k: (torch.cat([v.cpu() for v in vals]) if vals else torch.zeros(0, 0))
            for k, vals in self._keys.items()
        }
        self._acc = {}
        self._keys = {k: [] for k in self.key_kinds}
        return Recorded(sums=sums, keys=keys)

    # -- helpers ---------------------------------------------------------------------------------
    def _flat_mask(self, device: torch.device) -> torch.Tensor:
        m = self._mask_on.get(device)
        if m is None:
            if self._mask is None:
                raise RuntimeError("RoutingRecorder.start_batch(mask) was not called")
            m = self._mask.to(device, non_blocking=True).reshape(-1)  # [T]
            self._mask_on[device] = m
        return m

    def _accumulator(self, layer: int, device: torch.device) -> torch.Tensor:
        acc = self._acc.get(layer)
        if acc is None:
            rows = len(self.acc_rows)
            acc = torch.zeros(rows, self.rule.num_experts, dtype=torch.float64, device=device)
            self._acc[layer] = acc
        return acc  # [R, E]

    # -- hooks -----------------------------------------------------------------------------------
    def _router_hook(self, layer: int) -> Any:
        first = layer == self.layers[0]
        # rows this hook fills, and their accumulator row numbers (counts is row 0)
        rows = (ROW_COUNTS, *self.token_rows)

        def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
            bias = correction_bias(self.model, self.arch, layer)
            routing = decode_router_output(out, self.rule, bias)
            device = routing.indices.device
            mask = self._flat_mask(device)  # [T]
            if mask.shape[0] != routing.indices.shape[0]:
                raise UnsupportedArchitectureError(
                    f"router of layer {layer} saw {routing.indices.shape[0]} tokens, the batch "
                    f"has {mask.shape[0]}; this model reorders or drops tokens before routing"
                )
            contrib = token_contributions(routing, mask, self.rule, rows, self.threshold)
            acc = self._accumulator(layer, device)
            # (with REAP, its last row is filled by the experts hook)
            scatter_rows(acc[: len(rows)], contrib, routing.indices)
            if "reap" in self.rows:
                self._routing[layer] = routing
            if first and "tcess" in self.key_kinds:
                tc = contrib[rows.index("tcess")] if "tcess" in rows else None
                assert self._mask is not None
                keys = sample_tcess(routing, self._mask, self.rule, self.threshold, tc)
                self._keys["tcess"].append(keys)

        return hook

    def _input_hook(self, module: torch.nn.Module, args: Any) -> None:
        assert self._mask is not None
        self._keys["router_input"].append(mean_router_input(args[0], self._mask))

    def _experts_hook(self, layer: int) -> Any:
        """REAP: Σ over routed (t, k) of w[t, k] · ‖f_e(x_t)‖₂, e = indices[t, k].

        The expert outputs are recomputed in one extra call of the experts module on the
        inputs repeated K times with weight 1 (same work as the layer's own expert pass).
        """
        row = self.acc_rows.index("reap")

        def hook(module: torch.nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            hidden = tensors[0]
            if len(tensors) < 3 or tensors[1].is_floating_point():
                raise UnsupportedArchitectureError(
                    "the reap metric needs per-token expert indices at the experts module; "
                    "this family runs its experts densely: use tcess or frequency"
                )
            routing = self._routing.pop(layer)
            t, k = routing.indices.shape
            x = hidden.reshape(t, -1).repeat_interleave(k, dim=0)  # [T·K, H]
            idx = routing.indices.reshape(-1, 1)  # [T·K, 1]
            ones = torch.ones(idx.shape, dtype=tensors[2].dtype, device=idx.device)
            f = module.forward(x, idx, ones)  # [T·K, H], hooks not re-entered
            norms = f.float().norm(dim=-1).view(t, k)  # [T, K]
            mask = self._flat_mask(norms.device)
            contrib = (routing.weights * norms * mask.unsqueeze(1)).unsqueeze(0)  # [1, T, K]
            acc = self._accumulator(layer, norms.device)
            scatter_rows(acc[row : row + 1], contrib, routing.indices)

        return hook
