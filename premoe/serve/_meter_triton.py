"""The Triton kernels behind `premoe.serve.meter_fold` (imported only where Triton is)."""

import triton
import triton.language as tl

from premoe.serve._topk_triton import TAKEN, order_keys


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
    key = order_keys(choice, ok)
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
        key = tl.where(hit, TAKEN, key)
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
    L: tl.constexpr,  # a loop bound: constexpr (Triton 3.6's interpreter cannot take a runtime one)
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
