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


def _kernels() -> tuple[Any, Any]:
    from premoe.serve import _meter_triton as t  # imports triton

    return t.meter_share_kernel, t.meter_fold_kernel


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
