"""The Triton kernels behind `premoe.serve.attention` (imported only where Triton is).

`decode_attention_kernel` runs one program per (row, KV head, split of the KV columns); split
calls write partial sums that `merge_splits_kernel` merges, or, with ``MERGE``, the last program
of each (row, KV head) to take its ticket merges them itself (`_merge` either way).
"""

import triton
import triton.language as tl

from premoe.quant._gemv_triton import pdl_enter


@triton.jit
def _merge(part_ptr, stat_ptr, out_ptr, bh, n_splits, out_off, so_h, G: tl.constexpr,
           BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Write the splits' partial sums of (row, KV head) `bh`, merged, to its G heads of out.
    Loads bypass L1 (.cg): the partials were written by other programs."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full((BLOCK_G,), -1.0e30, tl.float32)
    for p in range(n_splits):
        stat = stat_ptr + (bh * n_splits + p) * 2 * BLOCK_G + offs_g
        m = tl.maximum(m, tl.load(stat, cache_modifier=".cg"))
    num = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    den = tl.zeros((BLOCK_G,), tl.float32)
    for p in range(n_splits):
        row = bh * n_splits + p
        w = tl.exp(tl.load(stat_ptr + row * 2 * BLOCK_G + offs_g, cache_modifier=".cg") - m)
        den += w * tl.load(stat_ptr + row * 2 * BLOCK_G + BLOCK_G + offs_g,
                           cache_modifier=".cg")  # fmt: skip
        part = tl.load(part_ptr + (row * BLOCK_G + offs_g[:, None]) * BLOCK_D
                       + offs_d[None, :], cache_modifier=".cg")  # fmt: skip
        num += w[:, None] * part
    out = num / den[:, None]
    tl.store(
        out_ptr + out_off + offs_g[:, None] * so_h + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=(offs_g < G)[:, None] & (offs_d < D)[None, :],
    )


@triton.jit
def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, stat_ptr, ticket_ptr,
    n_kv, n_kv_heads, scale,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_n, so_b, so_h,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr, HAS_MASK: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, MERGE: tl.constexpr,
    N_SPLITS: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    pdl_enter(PDL)  # launched with programmatic dependent launch: q and the cache are new
    bh = tl.program_id(0)  # row b, KV head h
    split = tl.program_id(1)
    b = bh // n_kv_heads
    h = bh % n_kv_heads
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < D
    q = tl.load(
        q_ptr + b * sq_b + (h * G + offs_g)[:, None] * sq_h + offs_d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BG, BD]
    m_i = tl.full((BLOCK_G,), -1.0e30, tl.float32)  # finite: a fully masked block adds 0
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    start = split * SPLIT_LEN
    for n0 in range(0, SPLIT_LEN, BLOCK_N):
        offs_n = start + n0 + tl.arange(0, BLOCK_N)
        n_ok = (offs_n < n_kv) & (n0 + tl.arange(0, BLOCK_N) < SPLIT_LEN)
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_ptr + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :],
            mask=kv_ok,
            other=0.0,
        )  # [BN, BD]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BG, BN] fp32
        if HAS_MASK:
            add = tl.load(mask_ptr + b * sm_b + offs_n * sm_n, mask=n_ok, other=0.0)
            s += add.to(tl.float32)[None, :]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :],
            mask=kv_ok,
            other=0.0,
        )  # [BN, BD]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if SPLIT:  # partial sums [B*Hk, P, BG, BD] and (max, sum) [B*Hk, P, 2, BG]
        n_splits = tl.num_programs(1)
        row = bh * n_splits + split
        tl.store(part_ptr + (row * BLOCK_G + offs_g[:, None]) * BLOCK_D + offs_d[None, :], acc)
        tl.store(stat_ptr + row * 2 * BLOCK_G + offs_g, m_i)
        tl.store(stat_ptr + row * 2 * BLOCK_G + BLOCK_G + offs_g, l_i)
        if MERGE:  # the last split of (row, KV head) to finish merges them all
            tl.debug_barrier()  # every thread's partial stored before the ticket (release)
            ticket = tl.atomic_add(ticket_ptr + bh, 1, sem="acq_rel", scope="gpu")
            if ticket == N_SPLITS - 1:
                _merge(part_ptr, stat_ptr, out_ptr, bh, N_SPLITS, b * so_b + h * G * so_h,
                       so_h, G, BLOCK_G, D, BLOCK_D)  # fmt: skip
                tl.store(ticket_ptr + bh, 0)  # ready for the next call
    else:
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + b * so_b + (h * G + offs_g)[:, None] * so_h + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=g_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def merge_splits_kernel(
    part_ptr, stat_ptr, out_ptr, n_kv_heads, so_b, so_h,
    N_SPLITS: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // n_kv_heads
    h = bh % n_kv_heads
    _merge(part_ptr, stat_ptr, out_ptr, bh, N_SPLITS, b * so_b + h * G * so_h, so_h, G,
           BLOCK_G, D, BLOCK_D)  # fmt: skip
