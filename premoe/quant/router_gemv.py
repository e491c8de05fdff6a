"""A router's forward at decode as one kernel: its logits' GEMV selects the experts itself.

Shape legend: T tokens, K hidden, N the router's width (experts, or resident slots), k experts
per token.

After a router's logits (`kernels.gemv_linear`) a decode step ran one more kernel for the top-k
(`premoe.serve.topk.route_topk`): a launch, and a wait on the GEMV, for 128 numbers. Here the
GEMV's programs store the logits as `gemv_linear` does; the last program of each token to
finish (an atomic ticket, `premoe.quant.tickets`) reads them back and selects the k experts and
their weights with the top-k kernel's own code (`_route_triton.route_select`). So the three
outputs are those of the GEMV and then `route_topk`, bit for bit (tests/serve/
test_gemv_linear.py), from one kernel.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

from premoe.quant import kernels, tickets

ENABLED = os.environ.get("PREMOE_ROUTED_GEMV", "0") == "1"
"""Patched-in routers (`premoe.serve.gemv_linear`) select their experts in the GEMV with
`PREMOE_ROUTED_GEMV=1` in the environment. Off by default until it has run on a GPU: so far it
has run only under the Triton interpreter (bit-equal there) and compiled for sm_90; by default
the top-k kernel follows the GEMV, as before."""
MAX_WIDTH = 1024
"""Routers wider than this keep the top-k kernel (one program holds the token's logits)."""
_OP: Any = None  # premoe::gemv_route; False where custom ops cannot be registered
_READY = False  # the op is registered (a plain bool: traced steps read it, not the op)


class Route(NamedTuple):
    """What a router computes from its logits: the k largest after `scoring`
    (`premoe.serve.topk`'s codes: 0 raw, 1 softmax, 2 sigmoid, 3 a softmax over the k largest
    logits), renormalised over the k with `renorm`, times `scaling` (unless raw), as `dtype`."""

    k: int
    scoring: int
    renorm: bool
    scaling: float
    dtype: torch.dtype

    def constexprs(self, width: int) -> dict[str, Any]:
        """The GEMV kernel's constexprs for a router of `width` experts."""
        return {"ROUTE_K": self.k, "SCORING": self.scoring, "RENORM": self.renorm,
                "ROUTE_SCALE": float(self.scaling), "BLOCK_E": _pow2(max(16, width)),
                "BLOCK_RK": _pow2(max(2, self.k))}  # fmt: skip


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _outputs(
    x: torch.Tensor, weight: torch.Tensor, route: Route
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [T, N] in x's dtype, weights [T, k] in the route's dtype, experts [T, k] int64),
    uninitialised."""
    t = x.shape[0]
    return (x.new_empty(t, weight.shape[0]),
            torch.empty(t, route.k, dtype=route.dtype, device=x.device),
            torch.empty(t, route.k, dtype=torch.long, device=x.device))  # fmt: skip


def _launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, route: Route
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counters = tickets.tickets(x.device)
    if counters is None:  # `prepare` makes them before any capture (which cannot zero them)
        raise RuntimeError("the router GEMV's counters do not exist: call prepare() first")
    logits, weights, experts = out = _outputs(x, weight, route)
    consts = route.constexprs(weight.shape[0])
    kernels.launch_linear(x, weight, logits, bias, (weights, experts, counters, consts))
    return out


def _register_op() -> Any:
    from torch.library import custom_op

    @custom_op("premoe::gemv_route", mutates_args=())
    def gemv_route_op(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, scoring: int,
        renorm: bool, scaling: float, dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        return _launch(x, weight, bias, Route(k, scoring, renorm, scaling, dtype))

    @gemv_route_op.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, bias: Any, k: int, scoring: int, renorm: bool,
          scaling: float, dtype: torch.dtype) -> Any:  # fmt: skip
        return _outputs(x, weight, Route(k, scoring, renorm, scaling, dtype))

    return gemv_route_op


def prepare(device: torch.device) -> bool:
    """Build the kernel, its custom op and the device's counters ahead of any trace; True if
    the kernel runs on `device`."""
    global _OP, _READY
    if not kernels.prepare(device):
        return False
    tickets.prepare(device)
    if device.type == "cuda" and _OP is None:
        try:
            _OP = _register_op()
        except Exception:  # older torch without custom ops: eager launches still work
            _OP = False
        _READY = _OP is not False
    return True


def gemv_route(
    x: torch.Tensor,  # [T, K], T <= tickets.SIZE
    weight: torch.Tensor,  # [N, K] 16-bit, N <= MAX_WIDTH
    bias: torch.Tensor | None,  # [N], e.g. a row's routing mask (premoe.serve.rowmask)
    route: Route,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [T, N] as `kernels.gemv_linear` computes them, weights [T, k] in `route.dtype`,
    experts [T, k] int64 as `premoe.serve.topk.route_topk` computes them from those logits),
    from one kernel (module docstring)."""
    x = x.contiguous()
    if _READY and x.is_cuda:  # traced steps get here (`prepare` ran before the trace)
        return _OP(x, weight, bias, *route)
    return _launch(x, weight, bias, route)  # the interpreter's CPU tensors, older torch


__all__ = ["MAX_WIDTH", "Route", "gemv_route", "prepare"]
