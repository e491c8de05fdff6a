"""The captured dropped-mass meter's pass in one kernel (decode steps on CUDA).

Shape legend: L MoE layers, B rows of the step, E routed experts (full router width), P patterns,
N KV slots, k experts per token.

A captured decode step measures its rows right after the step (`premoe.serve.miss.SlotMiss`):
the full routers' logits of every layer in one batched matmul `[L, B, E]`, then each row's top-k,
the share of its weight on experts outside the row's pattern, and the fold into the slots'
running sums (`SlotAccumulator.add_rows`). In torch that tail is about twenty small kernels,
~60 µs of a 2 ms batch-1 step on an H100. `fold` does the tail in one Triton program per row:
the layers' logits as a `[layers, E]` tile, the scoring, k rounds of "take the largest, then
exclude it" (ties: the lower index, as `premoe.serve.topk`), the share, and the row's sums.

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
_TILE = 4096  # elements of one program's [layers, E] tile


class RowSums(Protocol):
    """The running sums `fold` writes (premoe.serve.miss.SlotAccumulator)."""

    sum: torch.Tensor  # [N, L]
    max_layer: torch.Tensor  # [N, L]
    max_token: torch.Tensor  # [N]
    win_sum: torch.Tensor  # [N]
    count: torch.Tensor  # [N]
    win_count: torch.Tensor  # [N]


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def meter_fold_kernel(
        logits_ptr,  # [L, B, E], last dim contiguous
        bias_ptr,  # [L, E] fp32 (HAS_BIAS)
        corr_ptr,  # [L, E] fp32 (HAS_CORR)
        tok_ptr,  # [B] int64: the row's pattern
        masks_ptr,  # [P, L, E] fp32: 1.0 where the expert is not in the pattern
        live_ptr,  # [B] fp32: 1.0 for a decoding row
        sum_ptr,  # [N, L]
        max_layer_ptr,  # [N, L]
        max_token_ptr,  # [N]
        win_sum_ptr,  # [N]
        count_ptr,  # [N]
        win_count_ptr,  # [N]
        L,
        E,
        stride_l,
        stride_b,
        K: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_E: tl.constexpr,
        SIGMOID: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_CORR: tl.constexpr,
    ):
        b = tl.program_id(0)
        live = tl.load(live_ptr + b)
        pattern = tl.load(tok_ptr + b)
        offs_e = tl.arange(0, BLOCK_E)
        ok_e = offs_e < E
        taken = -2147483647 - 1  # below every real key
        total = tl.zeros((BLOCK_L,), tl.float32)
        for l0 in range(0, L, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            ok_l = offs_l < L
            ok = ok_l[:, None] & ok_e[None, :]
            le = offs_l[:, None] * E + offs_e[None, :]  # [BL, BE] into [L, E]
            x = tl.load(logits_ptr + offs_l[:, None] * stride_l + b * stride_b + offs_e[None, :],
                        mask=ok, other=0.0).to(tl.float32)  # fmt: skip
            if HAS_BIAS:
                x += tl.load(bias_ptr + le, mask=ok, other=0.0)
            x = tl.where(ok_e[None, :], x, float("-inf"))
            if SIGMOID:
                p = tl.sigmoid(x)
            else:
                e = tl.exp(x - tl.max(x, axis=1)[:, None])
                p = e / tl.sum(e, axis=1)[:, None]
            if HAS_CORR:
                choice = p + tl.load(corr_ptr + le, mask=ok, other=0.0)
            elif SIGMOID:
                choice = p
            else:
                choice = x  # softmax keeps the order of the logits
            # order-preserving int keys: larger float -> larger int; NaN above +inf
            bits = choice.to(tl.int32, bitcast=True)
            key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
            key = tl.where(choice != choice, 0x7FFFFFFF, key)
            key = tl.where(ok_e[None, :], key, taken)
            miss = tl.load(masks_ptr + pattern * L * E + le, mask=ok, other=0.0)
            num = tl.zeros((BLOCK_L,), tl.float32)
            den = tl.zeros((BLOCK_L,), tl.float32)
            for _ in tl.static_range(K):
                best = tl.max(key, axis=1)
                idx = tl.min(tl.where(key == best[:, None], offs_e[None, :], BLOCK_E), axis=1)
                hit = offs_e[None, :] == idx[:, None]  # [BL, BE]
                w = tl.sum(tl.where(hit, p, 0.0), axis=1)
                num += w * tl.sum(tl.where(hit, miss, 0.0), axis=1)
                den += w
                key = tl.where(hit, taken, key)
            d = num / tl.maximum(den, 1e-20)  # [BL] the row's dropped mass per layer
            d = tl.where(ok_l, d, 0.0)
            d = tl.where(live > 0, d * live, 0.0)
            row = b * L + offs_l
            tl.store(sum_ptr + row, tl.load(sum_ptr + row, mask=ok_l) + d, mask=ok_l)
            old = tl.load(max_layer_ptr + row, mask=ok_l)
            tl.store(max_layer_ptr + row, tl.maximum(old, d), mask=ok_l)
            total += d
        per_token = tl.sum(total, axis=0) / L
        tl.store(max_token_ptr + b, tl.maximum(tl.load(max_token_ptr + b), per_token))
        tl.store(win_sum_ptr + b, tl.load(win_sum_ptr + b) + per_token)
        tl.store(count_ptr + b, tl.load(count_ptr + b) + live)
        tl.store(win_count_ptr + b, tl.load(win_count_ptr + b) + live)

    return meter_fold_kernel


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
    """Fold each row's dropped mass [L] into its running sums, in one kernel launch (sync-free,
    so it can be captured in a CUDA graph)."""
    import triton

    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n_layers, b, e = logits.shape
    block_e = max(16, triton.next_power_of_2(e))
    block_l = min(triton.next_power_of_2(n_layers), max(1, _TILE // block_e))
    has_bias, has_corr = bias is not None, correction is not None
    masks = masks.contiguous()
    bias = masks if bias is None else bias.contiguous()  # unread where there is none
    correction = masks if correction is None else correction.contiguous()
    _kernel()[(b,)](
        logits, bias, correction, tok, masks, live, sums.sum, sums.max_layer, sums.max_token,
        sums.win_sum, sums.count, sums.win_count, n_layers, e, logits.stride(0),
        logits.stride(1), K=k, BLOCK_L=block_l, BLOCK_E=block_e, SIGMOID=scoring == "sigmoid",
        HAS_BIAS=has_bias, HAS_CORR=has_corr, num_warps=4,
    )  # fmt: skip


__all__ = ["SCORINGS", "RowSums", "available", "fold"]
