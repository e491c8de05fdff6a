"""The decode step's one-row linear layers as one Triton GEMV (CUDA, 16-bit weights).

Shape legend: K input width, N output width.

At batch 1 every linear layer of a decode step is a GEMV, and cuBLAS runs it with GEMM tiles
that leave most of an H100/H200 idle where the layer is narrow: a 128-expert router (0.5 MB) is
read by 2 CTAs in ~5 µs, and o_proj's K is split over a second reduction kernel (profiles in
bench/RESULTS.md). `premoe.quant.kernels.gemv_linear` reads the weight with one program per few
output rows, accumulates in fp32 and rounds once, as cuBLAS does (the summation order differs, so
a bf16 result can differ in its last bit).

`patched(device)` makes every ``F.linear(x, W, b)`` of one row (x `[..., K]` with one row, W
`[N, K]` in x's 16-bit dtype, N <= `MAX_OUT`, b None or `[N]` in x's dtype, added in fp32 before
the one rounding) call it for the duration of a block; every other call goes to the function it
replaced. `over(fallback)` is the same wrapper over any other linear
function (the row-mask hook of rowmask.py computes its router logits through it). The decode step
is traced and captured inside the block (`premoe.serve.graphs`), so nothing is patched while the
graphs replay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from premoe.quant import kernels

ENABLED = True
"""Serve's fused decode steps patch the GEMV in; benches turn it off to compare with cuBLAS in
one process."""
MAX_OUT = 32768  # wider layers (the LM head) stay with cuBLAS, which reads them near bandwidth
_DTYPES = (torch.bfloat16, torch.float16)
_active = False
_wrappers: dict[Callable[..., Any], Callable[..., Any]] = {}


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.is_cuda
        and x.dtype in _DTYPES
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.stride(1) == 1
        and weight.shape[0] <= MAX_OUT
        and x.shape[-1] == weight.shape[1]
        and x.numel() == x.shape[-1]
        and (
            bias is None
            or (bias.dtype == x.dtype and bias.shape == weight.shape[:1] and bias.stride(0) == 1)
        )
    )


def over(fallback: Callable[..., Any]) -> Callable[..., Any]:
    """``F.linear``'s signature: one-row calls run the GEMV while `patched`, all else
    `fallback` (one function per fallback: compiled steps guard on its identity)."""
    if fallback in _wrappers:
        return _wrappers[fallback]

    def linear(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if _active and _eligible(x, weight, bias):
            out = kernels.gemv_linear(x.reshape(1, -1), weight, bias)  # [1, N]
            return out.view(*x.shape[:-1], weight.shape[0])
        return fallback(x, weight, bias)

    _wrappers[fallback] = linear
    _wrappers[linear] = linear  # wrapping the wrapper is the wrapper
    return linear


@contextmanager
def patched(device: torch.device) -> Iterator[None]:
    """During the block, one-row linear layers on `device` run the GEMV (module docstring)."""
    global _active
    if not ENABLED or device.type != "cuda" or not kernels.prepare(device) or _active:
        yield
        return
    functional = torch.nn.functional
    current = functional.linear
    functional.linear = over(current)
    _active = True
    try:
        yield
    finally:
        _active = False
        functional.linear = current


__all__ = ["MAX_OUT", "over", "patched"]
