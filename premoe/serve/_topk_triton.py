"""The Triton kernel behind `premoe.serve.topk` (imported only where Triton is), and the
order-preserving integer keys its k rounds of "take the largest" work on (shared with
`premoe.serve._meter_triton`)."""

import triton
import triton.language as tl

from premoe.quant._gemv_triton import pdl_enter

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
def route_topk_kernel(
    x_ptr,
    values_ptr,
    indices_ptr,
    E,
    stride_x,
    scaling,
    K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCORING: tl.constexpr,
    RENORM: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)  # launched with programmatic dependent launch: the logits are new
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    ok = offs < E
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=float("-inf")).to(tl.float32)
    if SCORING == 1:  # softmax over the row, then its k largest
        e = tl.where(ok, tl.exp(x - tl.max(x, axis=0)), 0.0)
        x = e / tl.sum(e, axis=0)
    elif SCORING == 2:  # sigmoid scores
        x = tl.sigmoid(x)
    # each round is two 32-bit reductions (one redux.sync each on sm_80+): the largest key, then
    # the lowest column holding it; its value is read back from the key
    key = order_keys(x, ok)
    offs_k = tl.arange(0, BLOCK_K)
    vals = tl.zeros((BLOCK_K,), tl.float32)
    idxs = tl.zeros((BLOCK_K,), tl.int64)
    for i in tl.static_range(K):
        best = tl.max(key, axis=0)
        idx = tl.min(tl.where(key == best, offs, BLOCK_E), axis=0)  # lowest index
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
    tl.store(indices_ptr + row * K + offs_k, idxs, mask=in_k)
    tl.store(values_ptr + row * K + offs_k, vals.to(values_ptr.dtype.element_ty), mask=in_k)
