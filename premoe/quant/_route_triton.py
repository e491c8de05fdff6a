"""A router's selection in Triton registers (imported only where Triton is): the k largest of
one row of scores, and the routing rule's arithmetic around them. Shared by the top-k kernel
(`premoe.serve._topk_triton`), the router GEMV that does its own top-k
(`_gemv_triton.moe_gemv_kernel` with ROUTE_K, `premoe.quant.router_gemv`) and the
meter (`premoe.serve._meter_triton`, which takes `order_keys`).

Scoring codes (`premoe.serve.topk` names them): 0 the k largest of the row as given, 1 a softmax
over the row first, 2 a sigmoid first, 3 the k largest logits and then a softmax over those.
"""

import triton
import triton.language as tl

TAKEN: tl.constexpr = tl.constexpr(-2147483647 - 1)  # below every real key (also -inf's)


@triton.jit
def order_keys(x, ok):
    """int32 keys of fp32 `x` in the same order (larger float, larger key; NaN above +inf);
    TAKEN where not `ok`. The map is its own inverse on real keys (`_key_value`)."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(x != x, 0x7FFFFFFF, key)
    return tl.where(ok, key, TAKEN)


@triton.jit
def _key_value(key):
    """The fp32 value of a key from `order_keys` (a NaN for NaN's)."""
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def route_select(
    x,  # [BLOCK_E] fp32: the row's logits
    ok,  # [BLOCK_E] the row's columns (below E)
    offs,  # [BLOCK_E] 0 .. BLOCK_E - 1
    values_ptr,  # the row's [K] weights (out)
    indices_ptr,  # the row's [K] int64 experts (out)
    scaling,
    K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCORING: tl.constexpr,
    RENORM: tl.constexpr,
):
    """Store the row's k experts (largest first; among equal scores the lower index; NaN counts
    as the largest, as in torch.topk) and their weights: the scores (module docstring), over
    their sum with RENORM, times `scaling` unless SCORING is 0; in fp32, cast once.

    Each of the k rounds is two 32-bit reductions, one `redux.sync` each on sm_80+: the largest
    order key, then the lowest column holding it; the value is read back from the key. (A
    64-bit key of both, one reduction a round, took five shuffle steps of two shuffles; Triton's
    bitonic `tl.topk` of it compiles to 143 shuffles at E = 128, k = 8, against these rounds'
    13 for the whole kernel, ptxas for sm_90.)"""
    if SCORING == 1:  # softmax over the row, then its k largest
        e = tl.where(ok, tl.exp(x - tl.max(x, axis=0)), 0.0)
        x = e / tl.sum(e, axis=0)
    elif SCORING == 2:  # sigmoid scores
        x = tl.sigmoid(x)
    offs_k = tl.arange(0, BLOCK_K)
    key = order_keys(x, ok)
    vals = tl.zeros((BLOCK_K,), tl.float32)
    idxs = tl.zeros((BLOCK_K,), tl.int64)
    for i in tl.static_range(K):
        best = tl.max(key, axis=0)
        idx = tl.min(tl.where(key == best, offs, BLOCK_E), axis=0)
        vals = tl.where(offs_k == i, _key_value(best), vals)
        idxs = tl.where(offs_k == i, idx.to(tl.int64), idxs)
        key = tl.where(offs == idx, TAKEN, key)
    in_k = offs_k < K
    if SCORING == 3:  # the k largest logits, then a softmax over them
        e = tl.where(in_k, tl.exp(vals - tl.max(tl.where(in_k, vals, float("-inf")), 0)), 0.0)
        vals = e / tl.sum(e, axis=0)
    if RENORM:
        vals = vals / tl.sum(tl.where(in_k, vals, 0.0), axis=0)
    if SCORING != 0:
        vals = vals * scaling
    tl.store(indices_ptr + offs_k, idxs, mask=in_k)
    tl.store(values_ptr + offs_k, vals.to(values_ptr.dtype.element_ty), mask=in_k)
