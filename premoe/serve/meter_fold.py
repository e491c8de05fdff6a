"""The captured dropped-mass meter's pass in two small kernels (decode steps on CUDA).

Shape legend: L MoE layers, B rows of the step, E routed experts (full router width), P patterns,
N KV slots, k experts per token.

A captured decode step measures its rows right after the step (`premoe.serve.miss.SlotMiss`):
the full routers' logits of every layer in one batched matmul `[L, B, E]`, then each row's top-k,
the share of its weight on experts outside the row's pattern, and the fold into the slots'
running sums (`SlotAccumulator.add_rows`). In torch that tail is about twenty small kernels,
~60 µs of a 2 ms batch-1 step on an H100. `fold` does it in two launches: one program per layer
and row (one warp, as `premoe.serve.topk`) scores the row's logits, takes the k largest in k
rounds of "take the largest, then exclude it" (ties: the lower index) and stores the share;
then one program per row folds its L shares into the row's sums. (One program per row over a
`[layers, E]` tile took 15.8 µs a step on an H100 at batch 1: its k rounds of reductions over
the tile run one after another.)

It computes what `MissMeter._from_logits` + `RowMeter._share` + `SlotAccumulator.add_rows`
compute, in fp32: softmax scoring picks by the (biased) logits, sigmoid by its scores, and a
selection-only correction picks by score + correction; the weights are the scores of the k picked
(the share is scale-free, so a softmax's renormalisation over the k does not change it).
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import torch

from premoe.quant import kernels

SCORINGS = ("softmax", "sigmoid")


class RowSums(Protocol):
    """The running sums `fold` writes (premoe.serve.miss.SlotAccumulator)."""

    sum: torch.Tensor  # [N, L]
    max_layer: torch.Tensor  # [N, L]
    max_token: torch.Tensor  # [N]
    win_sum: torch.Tensor  # [N]
    count: torch.Tensor  # [N]
    win_count: torch.Tensor  # [N]


@functools.lru_cache(maxsize=1)
def _kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def meter_share_kernel(
        logits_ptr,  # [L, B, E], last dim contiguous
        bias_ptr,  # [L, E] fp32 (HAS_BIAS)
        corr_ptr,  # [L, E] fp32 (HAS_CORR)
        tok_ptr,  # [B] int64: the row's pattern
        masks_ptr,  # [P, L, E] fp32: 1.0 where the expert is not in the pattern
        dropped_ptr,  # [L, B] fp32 out
        L,
        B,
        E,
        stride_l,
        stride_b,
        K: tl.constexpr,
        BLOCK_E: tl.constexpr,
        SIGMOID: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_CORR: tl.constexpr,
    ):
        layer, b = tl.program_id(0), tl.program_id(1)
        offs = tl.arange(0, BLOCK_E)
        ok = offs < E
        x = tl.load(logits_ptr + layer * stride_l + b * stride_b + offs, mask=ok, other=0.0)
        x = x.to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + layer * E + offs, mask=ok, other=0.0)
        x = tl.where(ok, x, float("-inf"))
        if SIGMOID:
            p = tl.sigmoid(x)
        else:
            e = tl.exp(x - tl.max(x, axis=0))
            p = e / tl.sum(e, axis=0)
        if HAS_CORR:
            choice = p + tl.load(corr_ptr + layer * E + offs, mask=ok, other=0.0)
        elif SIGMOID:
            choice = p
        else:
            choice = x  # softmax keeps the order of the logits
        # order-preserving int keys: larger float -> larger int; NaN above +inf
        bits = choice.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = tl.where(choice != choice, 0x7FFFFFFF, key)
        taken = -2147483647 - 1  # below every real key
        key = tl.where(ok, key, taken)
        pattern = tl.load(tok_ptr + b)
        miss = tl.load(masks_ptr + (pattern * L + layer) * E + offs, mask=ok, other=0.0)
        num = 0.0
        den = 0.0
        for _ in tl.static_range(K):
            best = tl.max(key, axis=0)
            idx = tl.min(tl.where(key == best, offs, BLOCK_E), axis=0)
            hit = offs == idx
            w = tl.sum(tl.where(hit, p, 0.0), axis=0)
            num += w * tl.sum(tl.where(hit, miss, 0.0), axis=0)
            den += w
            key = tl.where(hit, taken, key)
        tl.store(dropped_ptr + layer * B + b, num / tl.maximum(den, 1e-20))

    @triton.jit
    def meter_fold_kernel(
        dropped_ptr,  # [L, B] fp32
        live_ptr,  # [B] fp32: 1.0 for a decoding row
        sum_ptr,  # [N, L]
        max_layer_ptr,  # [N, L]
        max_token_ptr,  # [N]
        win_sum_ptr,  # [N]
        count_ptr,  # [N]
        win_count_ptr,  # [N]
        L,
        B,
        BLOCK_L: tl.constexpr,
    ):
        b = tl.program_id(0)
        live = tl.load(live_ptr + b)
        total = tl.zeros((BLOCK_L,), tl.float32)
        for l0 in range(0, L, BLOCK_L):
            offs = l0 + tl.arange(0, BLOCK_L)
            ok = offs < L
            d = tl.load(dropped_ptr + offs * B + b, mask=ok, other=0.0)
            d = tl.where(live > 0, d * live, 0.0)  # an idle row's values are not read
            row = b * L + offs
            tl.store(sum_ptr + row, tl.load(sum_ptr + row, mask=ok) + d, mask=ok)
            old = tl.load(max_layer_ptr + row, mask=ok)
            tl.store(max_layer_ptr + row, tl.maximum(old, d), mask=ok)
            total += d
        per_token = tl.sum(total, axis=0) / L
        tl.store(max_token_ptr + b, tl.maximum(tl.load(max_token_ptr + b), per_token))
        tl.store(win_sum_ptr + b, tl.load(win_sum_ptr + b) + per_token)
        tl.store(count_ptr + b, tl.load(count_ptr + b) + live)
        tl.store(win_count_ptr + b, tl.load(win_count_ptr + b) + live)

    return meter_share_kernel, meter_fold_kernel


def available(device: torch.device, scoring: str) -> bool:
    """True when `fold` runs for a router of this scoring on `device` (CUDA with Triton, or
    CPU under Triton's interpreter)."""
    return scoring in SCORINGS and kernels.available(device)


def fold(
    logits: torch.Tensor,  # [L, B, E] full routers' logits of the step's rows
    tok: torch.Tensor,  # [B] int64 pattern index of each row
    masks: torch.Tensor,  # [P, L, E] fp32, 1.0: not in the pattern
    live: torch.Tensor,  # [B] fp32, 1.0: a decoding row (0.0: not folded)
    sums: RowSums,  # rows 0..B-1 are the step's rows
    *,
    k: int,
    scoring: str,
    bias: torch.Tensor | None = None,  # [L, E] fp32 logit bias
    correction: torch.Tensor | None = None,  # [L, E] fp32 selection-only bias
) -> None:
    """Fold each row's dropped mass [L] into its running sums: two kernel launches (the shares,
    one program per layer and row; the fold, one per row), sync-free, so they can be captured
    in a CUDA graph."""
    import triton

    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n_layers, b, e = logits.shape
    has_bias, has_corr = bias is not None, correction is not None
    masks = masks.contiguous()
    bias = masks if bias is None else bias.contiguous()  # unread where there is none
    correction = masks if correction is None else correction.contiguous()
    dropped = torch.empty((n_layers, b), dtype=torch.float32, device=logits.device)  # [L, B]
    share, fold_rows = _kernels()
    share[(n_layers, b)](
        logits, bias, correction, tok, masks, dropped, n_layers, b, e, logits.stride(0),
        logits.stride(1), K=k, BLOCK_E=max(32, triton.next_power_of_2(e)),
        SIGMOID=scoring == "sigmoid", HAS_BIAS=has_bias, HAS_CORR=has_corr, num_warps=1,
    )  # fmt: skip
    fold_rows[(b,)](
        dropped, live, sums.sum, sums.max_layer, sums.max_token, sums.win_sum, sums.count,
        sums.win_count, n_layers, b, BLOCK_L=min(1024, triton.next_power_of_2(n_layers)),
        num_warps=1,
    )  # fmt: skip


__all__ = ["SCORINGS", "RowSums", "available", "fold"]
