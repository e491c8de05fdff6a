"""Routers' top-k in one small kernel (decode steps on CUDA).

Shape legend: T tokens, E routed experts (the router's width), k experts per token.

`torch.topk` over a router's `[T, E]` scores launches a radix select and a bitonic sort (two
kernels, ~9 µs per MoE layer on an H200 at batch 1, more than the router's GEMV). `small_topk`
does it in one Triton program per token: k rounds of "take the largest, then exclude it" over the
row held in registers. Values are the input's own (no arithmetic), sorted descending; among equal
values the lower index comes first; NaN counts as the largest, as in `torch.topk`.

`patched()` routes the routers' calls to it for the duration of a block: every
``torch.topk(x, k, dim=-1)`` on a CUDA tensor `[T, E]` with E <= `MAX_WIDTH` and k <= `MAX_K`,
largest first (what every supported family's router calls); any other call goes to `torch.topk`.
The decode step is traced and captured inside that block (`premoe.serve.graphs`), so the graphs
replay the kernel and nothing is patched while they run.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from premoe.quant import kernels

MAX_WIDTH = 1024
MAX_K = 32
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OP: Any = None
_TORCH_TOPK = torch.topk


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def small_topk_kernel(
        x_ptr,
        values_ptr,
        indices_ptr,
        E,
        stride_x,
        K: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK_E)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < E, other=float("-inf"))
        # order-preserving int keys: larger float -> larger int; NaN above +inf
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = tl.where(x != x, 0x7FFFFFFF, key)
        taken = -2147483647 - 1  # below every real key (also -inf's)
        key = tl.where(offs < E, key, taken)
        for i in tl.static_range(K):
            best = tl.max(key, axis=0)
            idx = tl.min(tl.where(key == best, offs, BLOCK_E), axis=0)  # lowest index
            val = tl.load(x_ptr + row * stride_x + idx)
            tl.store(values_ptr + row * K + i, val)
            tl.store(indices_ptr + row * K + i, idx.to(tl.int64))
            key = tl.where(offs == idx, taken, key)

    return small_topk_kernel


def _launch(
    x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor, wrap: Any
) -> None:
    import triton

    kern = _kernel() if wrap is None else wrap(_kernel())
    e = x.shape[1]
    block = max(16, triton.next_power_of_2(e))
    kern[(x.shape[0],)](x, values, indices, e, x.stride(0), K=k, BLOCK_E=block, num_warps=1)


def _register_op() -> Any:
    from torch.library import triton_op, wrap_triton

    @triton_op("premoe::small_topk", mutates_args=())
    def small_topk_op(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.empty((x.shape[0], k), dtype=x.dtype, device=x.device)
        indices = torch.empty((x.shape[0], k), dtype=torch.long, device=x.device)
        _launch(x, k, values, indices, wrap_triton)
        return values, indices

    return small_topk_op


def prepare(device: torch.device) -> bool:
    """Build the kernel and its custom op ahead of any trace; True if it runs on `device`."""
    global _OP
    if device.type != "cuda" or not kernels.available(device):
        return False
    if _OP is None:
        _kernel()
        try:
            _OP = _register_op()
        except Exception:  # older torch without triton_op: keep torch.topk
            _OP = False
    return bool(_OP)


def small_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [T, k], indices [T, k] int64) of the k largest of each row of `x` [T, E]
    (CUDA), sorted descending."""
    if not prepare(x.device):
        out = _TORCH_TOPK(x, k, dim=-1)
        return out.values, out.indices
    return _OP(x.contiguous(), k)


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


__all__ = ["MAX_K", "MAX_WIDTH", "patched", "prepare", "small_topk"]
