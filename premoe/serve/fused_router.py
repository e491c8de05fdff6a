"""Routers' forwards as their logits' matmul and one kernel (decode steps on CUDA).

Shape legend: T tokens, H hidden, E the router's width (experts, or resident slots), k experts
per token.

A router's forward at decode is a GEMV for the logits and then three or four small kernels: the
softmax (or sigmoid), the top-k, the renormalisation of the k weights and a cast, each a launch
and a gap between kernels in a step that is mostly such gaps at batch 1. `FusedRouters` runs every
router of a model as ``F.linear`` (the logits, so the per-row routing hook of rowmask.py still
sees them) and `premoe.serve.topk.route_topk`, which does the rest in one kernel, in fp32.

What the kernel computes comes from the family's routing rule (`premoe.arch.routing`: scoring,
selection, renormalisation, routed scaling); families it cannot express (a selection-only
correction bias, group-limited choice, sparsemixer) keep their own forward. Whether the fused
forward returns what the router's own forward returns is not assumed but checked, once per router
class, on random hidden states: the same logits, the same experts in the same order (up to ties
between equal logits), weights equal to about one rounding of their dtype, the tuple in the same
order. A router that fails the check keeps its own forward (`FusedRouters.why` says why; a
warning in the log).

`patched()` puts the fused forwards in place for a block; the decode step is traced and captured
inside it (`premoe.serve.graphs`), so the graphs replay the kernel and nothing is patched while
they run. Each router's forward is then `_fused_forward` bound to it (`types.MethodType`): a
compiled decoder layer (`graphs.Regions`, one dynamo cache for all layers) guards on the bound
function, the same for every layer, where a `functools.partial` per router made dynamo recompile
for every layer and hit its recompile limit (H100: 363.5 against 491.2 tokens/s, bench/RESULTS.md);
and the guard still tells a patched forward from the router's own, so layers traced inside the
block are not replayed outside it (a prefill), nor the other way round.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from premoe.arch.model import router_module, tensor_of
from premoe.arch.registry import arch_for_config
from premoe.arch.routing import RoutingRule
from premoe.arch.spec import ArchSpec
from premoe.errors import UnsupportedArchitectureError
from premoe.serve import topk

log = logging.getLogger(__name__)

_SCORING = {
    ("softmax", "scores"): topk.SOFTMAX,
    ("sigmoid", "scores"): topk.SIGMOID,
    ("softmax", "logits_topk"): topk.TOPK_SOFTMAX,
}
_OUTPUTS = ("logits", "weights", "indices")
_ATTR = "_premoe_fused"  # on each fused router: its FusedRouters
ENABLED = True
"""Serve's fused decode steps use the fused forwards (`ContinuousDecoder`'s `fuse`); benches turn
them off to compare with the routers' own forwards in one process."""


def unsupported(arch: ArchSpec, config: Any) -> str | None:
    """None when the kernel can express this family's routing rule, else why not."""
    rule = RoutingRule.from_arch(arch, config)
    if arch.correction_bias is not None:
        return "the router has a selection-only correction bias"
    if rule.n_group > 1:
        return "the router is group-limited"
    if (rule.scoring, rule.selection) not in _SCORING:
        return f"{rule.scoring} scoring with {rule.selection} selection"
    if rule.top_k > topk.MAX_K or rule.num_experts > topk.MAX_WIDTH:
        return f"top-{rule.top_k} of {rule.num_experts} experts is wider than the kernel"
    return None


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if name.startswith(prefix + ".") else name


class FusedRouters:
    """The model's routers with fused forwards, where the check passed (module docstring)."""

    def __init__(self, model: Any, arch: ArchSpec) -> None:
        self.routers: list[nn.Module] = []
        self.why: str | None = unsupported(arch, model.config)
        if self.why is not None:
            return
        rule = RoutingRule.from_arch(arch, model.config)
        self.k = rule.top_k
        self.scoring = _SCORING[(rule.scoring, rule.selection)]
        self.renorm = bool(rule.renormalize)
        self.scaling = float(rule.scaling)
        prefix = arch.router.module
        self.weight = _relative(arch.router_weight.memory, prefix)
        bias = [t for t in arch.router_tensors if t.role == "logit_bias"]
        self.bias = _relative(bias[0].memory, prefix) if bias else None
        self.order: tuple[str, ...] = _OUTPUTS
        self.dtype: torch.dtype | None = None  # the weights' dtype, as the router returns them
        routers = [router_module(model, arch, i) for i in arch.moe_layer_ids(model.config)]
        checked: set[type] = set()
        for router in routers:
            if type(router) not in checked:
                self.why = self._check(router)
                if self.why is not None:
                    log.warning("routers keep their own forward: %s", self.why)
                    return
                checked.add(type(router))
        self.routers = routers
        for router in routers:
            setattr(router, _ATTR, self)

    def _route(self, router: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
        weight = tensor_of(router, self.weight)  # [E, H]
        bias = None if self.bias is None else tensor_of(router, self.bias)
        logits = torch.nn.functional.linear(x, weight, bias)  # [T, E] (rowmask may patch it)
        dtype = logits.dtype if self.dtype is None else self.dtype
        w, idx = topk.route_topk(logits, self.k, self.scoring, self.renorm, self.scaling, dtype)
        parts = {"logits": logits, "weights": w, "indices": idx}  # [T, E], [T, k], [T, k]
        return tuple(parts[name] for name in self.order)

    def _check(self, router: nn.Module) -> str | None:
        """None when `_route` returns what the router's own forward does (module docstring)."""
        weight = tensor_of(router, self.weight)
        g = torch.Generator(device=weight.device).manual_seed(0)
        x = torch.randn(7, weight.shape[1], generator=g, device=weight.device).to(weight.dtype)
        with torch.no_grad():
            own = router.forward(x)  # not through hooks: nothing else sees the check
            self.order, self.dtype = _OUTPUTS, torch.float32  # cast below to the router's dtype
            logits, w, idx = self._route(router, x)
        if not isinstance(own, tuple) or len(own) != 3:
            return f"{type(router).__name__} does not return (logits, weights, indices)"
        order: list[str] = []
        for t in own:
            if not isinstance(t, torch.Tensor):
                return f"{type(router).__name__} returns a {type(t).__name__}"
            if t.shape == logits.shape and t.dtype == logits.dtype and torch.equal(t, logits):
                order.append("logits")
            elif not t.is_floating_point():
                if t.shape == idx.shape and _same_choice(t, idx, logits):
                    order.append("indices")
            elif t.shape == w.shape:
                tol = max(4 * torch.finfo(t.dtype).eps, 1e-5)  # ~ one rounding of the dtype
                if not torch.allclose(w.to(t.dtype).float(), t.float(), rtol=tol, atol=tol):
                    return f"{type(router).__name__}'s weights differ from the kernel's"
                self.dtype = t.dtype
                order.append("weights")
        if sorted(order) != sorted(_OUTPUTS):
            return f"{type(router).__name__}'s output is not the kernel's {list(_OUTPUTS)}"
        self.order = tuple(order)
        return None

    @contextmanager
    def patched(self) -> Iterator[None]:
        """During the block, the checked routers run the fused forward."""
        own = [router.__dict__.get("forward") for router in self.routers]
        for router in self.routers:
            router.forward = types.MethodType(_fused_forward, router)
        try:
            yield
        finally:
            for router, fn in zip(self.routers, own, strict=True):
                if fn is None:
                    del router.forward
                else:
                    router.forward = fn


def _same_choice(own: torch.Tensor, idx: torch.Tensor, logits: torch.Tensor) -> bool:
    """The same experts in the same order (idx, own [T, k]), up to ties: experts of equal logits
    (logits [T, E]), whose order torch.topk leaves unspecified and the kernel gives by index.
    Scoring is monotone in the logits (no correction bias here), so equal logits are equal
    scores and weights. bf16 logits tie often: 2 of 7 random tokens over 76 experts."""
    if torch.equal(own, idx):
        return True
    if own.min() < 0 or own.max() >= logits.shape[-1]:
        return False
    return torch.equal(logits.gather(-1, own), logits.gather(-1, idx))


def _fused_forward(router: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every fused router's forward while patched, bound to it (compiled layers guard on the
    function, one for all layers)."""
    fused: FusedRouters = getattr(router, _ATTR)
    return fused._route(router, hidden)


def for_model(model: Any) -> FusedRouters | None:
    """The model's fused routers, where the kernel runs on its device and some router passed
    the check; else None."""
    device = next(model.parameters()).device
    if not ENABLED or not topk.prepare(device):
        return None
    try:
        routers = FusedRouters(model, arch_for_config(model.config))
    except UnsupportedArchitectureError:
        return None
    return routers if routers.routers else None


__all__ = ["FusedRouters", "for_model", "unsupported"]
