"""A gated experts layer at decode in one kernel: up projection, activation, routing weight and
down projection of every routed pair, over plain weights.

Shape legend: T tokens, k experts routed per token, S = T*k routed pairs, H hidden, I the
intermediate size, J = ceil(I / BLOCK_J) slices of the intermediate rows, G pairs a program takes
(GROUP, a power of two dividing k).

`moe_mlp(x, experts, route_w, w_up, w_down, out_dtype=, glu=)` returns ``[T, H]``:

    y[t] = sum_j route_w[t, j] * W_down[e_tj] @ act(W_up[e_tj] @ x[t])

with ``act = silu(gate) * up`` of the concatenated ``[gate; up]`` rows, computed and rounded as
`premoe.quant.kernels.moe_gemv`'s `glu` computes it (the path it replaces: the up projection's
GEMV, then the down projection's GEMV reading the activation as it loads its row). One program
per (slice j of BLOCK_J intermediate rows, group g of G pairs of one token) reads the slice's
gate and up rows of each pair, forms their activations, and multiplies them into the slice's
columns of the down projections:
``parts[g, j] = sum_{s in g} route_w[s] * W_down[e_s][:, slice j] @ act_s[slice j]``
(``[S / G, J, H]`` fp32). The sum of the parts over (k / G, J) and the rounding to `out_dtype`
are torch ops after the kernel, which torch.compile fuses with what follows (the residual add).
A decode step so runs a MoE layer's experts in one launch instead of two, and no activation
leaves the program.

Plain ``[E, 2I, H]`` / ``[E, H, I]`` weights only (not transposed): quantized slots keep the
two-kernel path of `premoe.quant.kernels`. The routing weight is applied in fp32 before the one
rounding (the two-kernel path rounds each pair's output first): about one rounding of difference.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from premoe.quant import kernels, pdl

# (BLOCK_J, GROUP, BLOCK_K, BLOCK_H, num_warps) by routed pairs S (the first entry whose bound
# >= S; GROUP is cut to the largest power of two dividing k). At S = 8 (batch 1, top-8) and
# I = 768, BLOCK_J = 8 and GROUP = 1 give 96 x 8 = 768 programs of 96 KB of weights each (the
# two-kernel path's up GEMV reads 64 KB a program). Guesses until tuned (bench/tune_gemv.py
# --projections mlp); ptxas (sm_90) puts them at 32 registers a thread.
MLP_SHAPES: tuple[tuple[int, tuple[int, int, int, int, int]], ...] = (
    (8, (8, 1, 256, 512, 8)),
    (kernels.ANY, (16, 1, 256, 128, 8)),
)

_OP: Any = None  # the custom op on CUDA (False: torch has none)


def launch_shape(pairs: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_J, GROUP, BLOCK_K, BLOCK_H, num_warps) for `pairs` routed pairs, `k` a token
    (`MLP_SHAPES`; GROUP cut to divide k)."""
    bj, group, bk, bh, warps = next(shape for bound, shape in MLP_SHAPES if pairs <= bound)
    return bj, math.gcd(group, k), bk, bh, warps


def _parts(x: torch.Tensor, experts: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    s, (h, i) = experts.numel(), w_down.shape[1:]
    bj, group, *_ = launch_shape(s, experts.shape[-1])
    return torch.empty(s // group, -(-i // bj), h, dtype=torch.float32, device=x.device)


def _launch(
    x: torch.Tensor,  # [T, H]
    experts: torch.Tensor,  # [T, k]
    route_w: torch.Tensor,  # [T, k]
    w_up: torch.Tensor,  # [E, 2I, H]
    w_down: torch.Tensor,  # [E, H, I]
    y: torch.Tensor,  # [S / G, J, H] fp32 (out)
    glu: int,
) -> None:
    from premoe.quant import _gemv_triton  # imports triton

    block_j, group, block_k, block_h, warps = launch_shape(experts.numel(), experts.shape[-1])
    grid = (y.shape[1], y.shape[0])  # slices fastest: a group's programs run side by side
    _gemv_triton.moe_mlp_kernel[grid](
        x,
        experts,
        route_w,
        w_up,
        w_down,
        y,
        w_down.shape[2],
        w_down.shape[1],
        x.stride(0),
        w_up.stride(0),
        w_up.stride(1),
        w_down.stride(0),
        w_down.stride(1),
        y.stride(0),
        y.stride(1),
        TOPK=experts.shape[-1],
        GLU=glu,
        BLOCK_J=block_j,
        GROUP=group,
        BLOCK_K=block_k,
        BLOCK_H=block_h,
        num_warps=warps,
        **pdl.launch_args(x.device),
    )


def _register_op() -> Any:
    """`premoe::moe_mlp` as an opaque torch custom op (traceable by torch.compile and CUDA
    graphs; launched by `_launch`, with PDL), or False where torch has no custom ops."""
    try:
        from torch.library import custom_op
    except ImportError:  # pragma: no cover - older torch: eager launches still work
        return False

    @custom_op("premoe::moe_mlp", mutates_args=())
    def moe_mlp_op(
        x: torch.Tensor,
        experts: torch.Tensor,
        route_w: torch.Tensor,
        w_up: torch.Tensor,
        w_down: torch.Tensor,
        glu: int,
    ) -> torch.Tensor:
        y = _parts(x, experts, w_down)
        _launch(x, experts, route_w, w_up, w_down, y, glu)
        return y

    @moe_mlp_op.register_fake
    def _(x: torch.Tensor, experts: torch.Tensor, rw: Any, wu: Any, w_down: torch.Tensor,
          glu: int) -> torch.Tensor:  # fmt: skip
        return _parts(x, experts, w_down)

    return moe_mlp_op


def prepare(device: torch.device) -> bool:
    """Build the kernels (`kernels.prepare`) and, on CUDA, this op ahead of any trace; True if
    usable."""
    global _OP
    if not kernels.prepare(device):
        return False
    if device.type == "cuda" and _OP is None:
        _OP = _register_op()
    return True


def moe_mlp(
    x: torch.Tensor,  # [T, H]
    experts: torch.Tensor,  # [T, k]
    route_w: torch.Tensor,  # [T, k]
    w_up: torch.Tensor,  # [E, 2I, H]: gate rows, then up rows
    w_down: torch.Tensor,  # [E, H, I]
    *,
    out_dtype: torch.dtype,
    glu: torch.dtype,
) -> torch.Tensor:
    """`[T, H]` in `out_dtype`: the experts' weighted sum for every token (module docstring);
    `glu` (bf16 or fp32, `kernels.GLU_DTYPES`): the activations' dtype, whose rounding of
    ``silu(gate) * up`` the kernel reproduces. The weights' last dims must be contiguous."""
    if experts.ndim != 2 or route_w.shape != experts.shape:
        raise ValueError(f"experts and route_w must be [T, k], got {tuple(experts.shape)}, "
                         f"{tuple(route_w.shape)}")  # fmt: skip
    e, n_up, h = w_up.shape
    if w_down.shape != (e, h, n_up // 2) or n_up % 2 or x.shape[-1] != h:
        raise ValueError(f"w_up [E, 2I, H] {tuple(w_up.shape)}, w_down [E, H, I] "
                         f"{tuple(w_down.shape)} and x [T, H] {tuple(x.shape)} "
                         "disagree")  # fmt: skip
    x, experts, route_w = x.contiguous(), experts.contiguous(), route_w.contiguous()
    act = kernels.GLU_DTYPES[glu]
    if x.device.type == "cuda" and _OP is None:
        prepare(x.device)
    if x.device.type == "cuda" and _OP:
        parts = _OP(x, experts, route_w, w_up, w_down, act)
    else:
        parts = _parts(x, experts, w_down)
        _launch(x, experts, route_w, w_up, w_down, parts, act)
    return parts.view(experts.shape[0], -1, h).sum(dim=1).to(out_dtype)  # [T, H]: k / G and J


__all__ = ["MLP_SHAPES", "launch_shape", "moe_mlp", "prepare"]
