"""Routers' top-k in one small kernel (decode steps on CUDA).

Shape legend: T tokens, E routed experts (the router's width), k experts per token.

`torch.topk` over a router's `[T, E]` scores launches a radix select and a bitonic sort (two
kernels, ~9 µs per MoE layer on an H200 at batch 1, more than the router's GEMV). `small_topk`
does it in one Triton program per token: k rounds of "take the largest, then exclude it" over the
row held in registers. Values are the input's own (no arithmetic), sorted descending; among equal
values the lower index comes first; NaN counts as the largest, as in `torch.topk`.

`route_topk` is the same kernel with the router's arithmetic around the selection: a softmax or
sigmoid of the logits before it, or a softmax over the k selected logits after it, the
renormalisation of the k weights, the routed scaling factor and the cast, all in fp32 registers
(`premoe.serve.fused_router` puts it in routers' forwards: one kernel after the logits instead of
three or four).

`patched()` routes the routers' calls to it for the duration of a block: every
``torch.topk(x, k, dim=-1)`` on a CUDA tensor `[T, E]` with E <= `MAX_WIDTH` and k <= `MAX_K`,
largest first (what every supported family's router calls); any other call goes to `torch.topk`.
The decode step is traced and captured inside that block (`premoe.serve.graphs`), so the graphs
replay the kernel and nothing is patched while they run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from premoe.quant import kernels, pdl

MAX_WIDTH = 1024
MAX_K = 32
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OP: Any = None  # premoe::small_topk; False where it cannot be registered
_ROUTE_OP: Any = None  # premoe::route_topk
_READY = False  # the ops are registered (a plain bool: compiled steps read it, not the op)
_TORCH_TOPK = torch.topk


# what a row's k largest are taken over, and what is stored for them (`route_topk`)
RAW, SOFTMAX, SIGMOID, TOPK_SOFTMAX = 0, 1, 2, 3


def _kernel() -> Any:
    from premoe.serve._topk_triton import route_topk_kernel  # imports triton

    return route_topk_kernel


def _outputs(x: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [T, k] in `dtype`, indices [T, k] int64), uninitialised."""
    values = torch.empty((x.shape[0], k), dtype=dtype, device=x.device)
    return values, torch.empty((x.shape[0], k), dtype=torch.long, device=x.device)


def _launch(
    x: torch.Tensor,
    k: int,
    values: torch.Tensor,
    indices: torch.Tensor,
    scoring: int = RAW,
    renorm: bool = False,
    scaling: float = 1.0,
) -> None:
    import triton

    e = x.shape[1]
    block = max(16, triton.next_power_of_2(e))
    _kernel()[(x.shape[0],)](x, values, indices, e, x.stride(0), scaling, K=k, BLOCK_E=block,
                             BLOCK_K=max(2, triton.next_power_of_2(k)), SCORING=scoring,
                             RENORM=renorm, num_warps=1, **pdl.launch_args(x.device))  # fmt: skip


def _register_op() -> Any:
    """The kernel as opaque custom ops (launched by `_launch`, with PDL: `premoe.quant.pdl`)."""
    from torch.library import custom_op

    @custom_op("premoe::small_topk", mutates_args=())
    def small_topk_op(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = _outputs(x, k, x.dtype)
        _launch(x, k, values, indices)
        return values, indices

    @small_topk_op.register_fake
    def _(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _outputs(x, k, x.dtype)

    @custom_op("premoe::route_topk", mutates_args=())
    def route_topk_op(
        x: torch.Tensor, k: int, scoring: int, renorm: bool, scaling: float, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = _outputs(x, k, dtype)
        _launch(x, k, values, indices, scoring, renorm, scaling)
        return values, indices

    @route_topk_op.register_fake
    def _(x: torch.Tensor, k: int, scoring: int, renorm: bool, scaling: float,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        return _outputs(x, k, dtype)

    return small_topk_op, route_topk_op


def prepare(device: torch.device) -> bool:
    """Build the kernel and its custom op ahead of any trace; True if it runs on `device`."""
    global _OP, _ROUTE_OP, _READY
    if device.type != "cuda":
        return False
    if _READY:  # traced steps get here: no truth test of a custom op (a graph break)
        return True
    if not kernels.available(device):
        return False
    if _OP is None:
        _kernel()
        try:
            _OP, _ROUTE_OP = _register_op()
        except Exception:  # older torch without custom ops: keep torch.topk
            _OP = False
    _READY = _OP is not False
    return _READY


def small_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [T, k], indices [T, k] int64) of the k largest of each row of `x` [T, E]
    (CUDA), sorted descending."""
    if not prepare(x.device):
        out = _TORCH_TOPK(x, k, dim=-1)
        return out.values, out.indices
    return _OP(x.contiguous(), k)


def route_topk(
    x: torch.Tensor,  # [T, E] router logits
    k: int,
    scoring: int,
    renorm: bool,
    scaling: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in `dtype`, indices [T, k] int64) of a router's logits in one kernel:
    `scoring` SOFTMAX or SIGMOID (then the k largest scores), or TOPK_SOFTMAX (the k largest
    logits, then a softmax over them); with `renorm` the k weights are divided by their sum;
    then multiplied by `scaling`. Computed in fp32; E <= MAX_WIDTH, k <= MAX_K; CUDA (or
    CPU tensors under Triton's interpreter)."""
    if prepare(x.device):
        return _ROUTE_OP(x.contiguous(), k, scoring, renorm, scaling, dtype)
    if not kernels.available(x.device):
        raise RuntimeError("route_topk needs Triton on a CUDA device (or its interpreter)")
    values, indices = _outputs(x, k, dtype)
    _launch(x.contiguous(), k, values, indices, scoring, renorm, scaling)  # interpreter
    return values, indices


def _handles(x: Any, k: Any, dim: int, largest: bool) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and x.is_cuda
        and x.dim() == 2
        and dim in (-1, 1)
        and largest
        and x.dtype in _DTYPES
        and isinstance(k, int)
        and 1 <= k <= min(MAX_K, x.shape[1])
        and x.shape[1] <= MAX_WIDTH
    )


def _topk(
    input: torch.Tensor,
    k: int,
    dim: int = -1,
    largest: bool = True,
    sorted: bool = True,
    **kwargs: Any,
) -> Any:
    """`torch.topk` while patched (one function for the process: compiled steps guard on it)."""
    if not kwargs and _handles(input, k, dim, largest):
        return _OP(input.contiguous(), k)
    return _TORCH_TOPK(input, k, dim, largest, sorted, **kwargs)


@contextmanager
def patched(device: torch.device) -> Iterator[None]:
    """During the block, routers' `torch.topk` calls run `small_topk` (module docstring)."""
    if not prepare(device) or torch.topk is _topk:
        yield
        return
    torch.topk = _topk
    try:
        yield
    finally:
        torch.topk = _TORCH_TOPK


__all__ = [
    "MAX_K", "MAX_WIDTH", "RAW", "SIGMOID", "SOFTMAX", "TOPK_SOFTMAX", "patched", "prepare",
    "route_topk", "small_topk",
]  # fmt: skip
