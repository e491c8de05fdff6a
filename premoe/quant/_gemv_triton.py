"""The Triton kernel behind `premoe.quant.kernels` (imported only where Triton is).

`moe_gemv_kernel` runs one program per (row, block of BLOCK_N output columns); `FUSE` picks what
a row is and what is stored:

- 0: a routed pair s; ``y[s, n] = W[e_s, n, :] @ x[rows[s]]`` in fp32 (`kernels.moe_gemv`),
  or ``x[s // TOPK]`` where TOPK > 0 (no rows tensor); with GLU, x's row holds an up
  projection's ``[gate | up]`` (2 K values) and the dot product reads ``silu(gate) * up``
  (`_load_x`: the down projection takes the activation as it loads, no kernel between);
- 1: a routed pair s of token ``s // TOPK``; the gate rows n and the up rows N + n of the
  concatenated ``[gate; up]`` projection are read in the same K loop and
  ``y[s, n] = silu(gate) * up`` is stored once in y's dtype (`kernels.moe_gemv_silu`);
- 2: a token t; its TOPK routed pairs are looped over and
  ``y[t, n] = sum_j rw[t, j] * (W[e_tj, n, :] @ x[t * TOPK + j])`` is stored once in y's dtype
  (`kernels.moe_gemv_wsum`);
- 3: a token t of a plain linear layer (one weight, no index loads);
  ``y[t, n] = W[n, :] @ x[t] (+ bias[n])`` is stored once in y's dtype (`kernels.gemv_linear`).

Every dot product goes through `_chunk_dot`, so each weight format (fp8 block, int4 packed,
plain) gets every fusion.

With ``PDL`` the kernel was launched with programmatic dependent launch (sm_90+,
`premoe.quant.pdl`): it may start while the kernel before it still runs, so it waits for that one
(`pdl_enter`) before it reads anything another kernel wrote. FUSE 3 loads its first weight
chunk before the wait (a linear layer's weights are written once, at load), so the weight
fetch overlaps the previous kernel's tail; the others wait first (expert indices and the
slots' weights may be new).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Under programmatic dependent launch: wait until the kernel before this one has finished
    (its writes visible), then let the kernel after this one launch. A kernel calls it before it
    reads anything another kernel wrote; nothing without `PDL`."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _round_bf16(w):
    # bf16 round-to-nearest-even on the bits (same under the interpreter)
    bits = w.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _store(ptrs, v, mask, OUT_BF16: tl.constexpr):
    """Store fp32 `v` in the pointers' dtype; to bf16 (`OUT_BF16`) rounded to nearest even on
    the bits, as the GPU's cast does (the interpreter's own cast truncates)."""
    if OUT_BF16:
        v = _round_bf16(v)
    tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _load_x(ptrs, mask, K: tl.constexpr, GLU: tl.constexpr):
    """fp32 x values at `ptrs` (offsets < K in the row). GLU 1 or 2: the row is ``[gate | up]``
    (2 K values) and ``silu(gate) * up`` is returned; 1 rounds gate and up to bf16 first and the
    activation after, as an activation computed in bf16 and stored there would be."""
    if GLU == 0:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
    if GLU == 1:
        gate = _round_bf16(gate)
        up = _round_bf16(up)
    act = gate * tl.sigmoid(gate) * up
    if GLU == 1:
        act = _round_bf16(act)
    return act


@triton.jit
def _chunk_dot(
    x_base,  # x row start
    w_row,  # [BN] pointers: start of each weight row
    s_row,  # [BN] pointers: start of each row's scales
    k0,  # first input column of the chunk
    mask_n,  # [BN]
    K: tl.constexpr,
    stride_wk,
    SCALE_BK: tl.constexpr,
    INT4: tl.constexpr,
    DENSE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    FP8_MODE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GLU: tl.constexpr = 0,
    WAIT: tl.constexpr = False,
):
    """[BN] fp32: sum over k in [k0, k0 + BLOCK_K) of W[n, k] * x[k], W dequantized (x as
    `_load_x` reads it). `WAIT` (plain weights): `pdl_enter` between the weight load and x's."""
    if INT4:
        # 8 nibbles per int32 word: load words once, unpack with shifts to [BN, BW, 8]
        BW: tl.constexpr = BLOCK_K // 8
        shifts = tl.arange(0, 8) * 4
        offs_w = k0 // 8 + tl.arange(0, BW)  # word index along K/8
        mask_w = offs_w < K // 8
        m2 = mask_n[:, None] & mask_w[None, :]
        words = tl.load(w_row[:, None] + offs_w[None, :], mask=m2, other=0)
        nib = (words[:, :, None] >> shifts[None, None, :]) & 0xF
        w = (nib - 8).to(tl.float32)  # [BN, BW, 8]
        offs_x = offs_w[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BW, 8]
        xk = _load_x(x_base + offs_x, mask_w[:, None], K, GLU)
        if FP8_MODE == 0 and not ROUND_BF16:  # the chunk lies in one group
            sc1 = tl.load(s_row + k0 // SCALE_BK, mask=mask_n, other=0.0)
            part = tl.sum(tl.sum(w * xk[None, :, :], axis=2), axis=1)  # [BN]
            out = part * sc1.to(tl.float32)
        else:
            sc = tl.load(s_row[:, None] + (offs_w[None, :] * 8) // SCALE_BK, mask=m2,
                         other=0.0).to(tl.float32)  # [BN, BW]  # fmt: skip
            if ROUND_BF16:
                w = _round_bf16(w * sc[:, :, None])
                out = tl.sum(tl.sum(w * xk[None, :, :], axis=2), axis=1)
            else:
                out = tl.sum(tl.sum(w * xk[None, :, :], axis=2) * sc, axis=1)
    elif FP8_MODE == 1:
        # several whole scale blocks per chunk: load W as [BN, NB, SCALE_BK], one scale each
        NB: tl.constexpr = BLOCK_K // SCALE_BK
        offs_b = tl.arange(0, NB)
        offs_k = k0 + offs_b[:, None] * SCALE_BK + tl.arange(0, SCALE_BK)[None, :]  # [NB, SBK]
        mask_k = offs_k < K
        mask_b = (k0 + offs_b * SCALE_BK) < K  # [NB]
        m3 = mask_n[:, None, None] & mask_k[None, :, :]
        xk = _load_x(x_base + offs_k, mask_k, K, GLU)
        w = tl.load(w_row[:, None, None] + offs_k[None, :, :], mask=m3, other=0.0)
        w = w.to(tl.float32)  # [BN, NB, SCALE_BK]
        sc = tl.load(s_row[:, None] + (k0 // SCALE_BK + offs_b)[None, :],
                     mask=mask_n[:, None] & mask_b[None, :], other=0.0)  # fmt: skip
        sc = sc.to(tl.float32)  # [BN, NB]
        if ROUND_BF16:
            w = _round_bf16(w * sc[:, :, None])
            out = tl.sum(tl.sum(w * xk[None, :, :], axis=2), axis=1)
        else:
            out = tl.sum(tl.sum(w * xk[None, :, :], axis=2) * sc, axis=1)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        m2 = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_row[:, None] + offs_k[None, :] * stride_wk, mask=m2, other=0.0)
        pdl_enter(WAIT)
        xk = _load_x(x_base + offs_k, mask_k, K, GLU)
        w = w.to(tl.float32)  # [BN, BK]
        if DENSE:
            out = tl.sum(w * xk[None, :], axis=1)
        elif FP8_MODE == 0:  # the chunk lies in one scale block: one scale per row
            sc = tl.load(s_row + k0 // SCALE_BK, mask=mask_n, other=0.0).to(tl.float32)
            if ROUND_BF16:
                w = _round_bf16(w * sc[:, None])
                out = tl.sum(w * xk[None, :], axis=1)
            else:
                out = tl.sum(w * xk[None, :], axis=1) * sc
        else:  # per-element scales (any block width)
            sc = tl.load(s_row[:, None] + offs_k[None, :] // SCALE_BK, mask=m2,
                         other=0.0).to(tl.float32)  # fmt: skip
            w = w * sc
            if ROUND_BF16:
                w = _round_bf16(w)
            out = tl.sum(w * xk[None, :], axis=1)
    return out


@triton.jit
def _row_ptrs(w_ptr, s_ptr, e, rows_n, stride_we, stride_wn, stride_se, stride_sn,
              SCALE_BN: tl.constexpr):  # fmt: skip
    """([BN], [BN]) pointers to the starts of weight rows `rows_n` of expert e and their scales."""
    w_row = w_ptr + e * stride_we + rows_n.to(tl.int64) * stride_wn
    s_row = s_ptr + e * stride_se + (rows_n // SCALE_BN).to(tl.int64) * stride_sn
    return w_row, s_row


@triton.jit
def moe_gemv_kernel(
    x_ptr,
    rows_ptr,  # [S] x row of each pair (FUSE 0 with TOPK 0 only)
    experts_ptr,  # [S] expert of each pair (token-major: pair s = token s // TOPK)
    w_ptr,
    s_ptr,
    y_ptr,
    rw_ptr,  # [S] routing weight of each pair (FUSE 2); [N] bias (FUSE 3 with HAS_BIAS)
    N,  # output columns (FUSE 1: the intermediate size I; the projection has 2 I rows)
    K: tl.constexpr,
    stride_xr,
    stride_we,
    stride_wn,
    stride_wk,  # 1 except for dense weights stored transposed ([E, K, N])
    stride_se,
    stride_sn,
    stride_yr,
    SCALE_BN: tl.constexpr,  # rows of W sharing one scale (fp8 block rows; 1 for int4)
    SCALE_BK: tl.constexpr,  # columns sharing one scale (fp8 block cols; int4 group size)
    INT4: tl.constexpr,
    DENSE: tl.constexpr,  # plain weights (bf16/fp16/fp32), no scales
    ROUND_BF16: tl.constexpr,  # round each dequantized weight to bf16 before use
    FP8_MODE: tl.constexpr,  # scale mode: 0 chunk in one block/group, 1 whole blocks, 2 any
    FUSE: tl.constexpr,  # 0 plain, 1 SiLU-gated up, 2 weighted sum over TOPK pairs, 3 linear
    TOPK: tl.constexpr,  # routed pairs per token (FUSE 1 and 2; FUSE 0: per x row, 0: rows_ptr)
    OUT_BF16: tl.constexpr,  # y is bf16 (FUSE 1 and 2)
    HAS_BIAS: tl.constexpr,  # FUSE 3: add rw_ptr's [N] before the one rounding
    GLU: tl.constexpr,  # FUSE 0: x rows are [gate | up], read as silu(gate) * up (`_load_x`)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (module docstring)
):
    if FUSE != 3:
        pdl_enter(PDL)  # FUSE 3 waits in its first chunk, after the weight load
    pid = tl.program_id(0)  # the pair s (FUSE 0, 1) or the token t (FUSE 2, 3)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    out_ptrs = y_ptr + pid.to(tl.int64) * stride_yr + offs_n
    if FUSE == 2:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(TOPK):
            s = pid.to(tl.int64) * TOPK + j
            e = tl.load(experts_ptr + s).to(tl.int64)
            wt = tl.load(rw_ptr + s).to(tl.float32)
            w_row, s_row = _row_ptrs(w_ptr, s_ptr, e, offs_n, stride_we, stride_wn, stride_se,
                                     stride_sn, SCALE_BN)  # fmt: skip
            part = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                part += _chunk_dot(x_ptr + s * stride_xr, w_row, s_row, k0, mask_n, K, stride_wk,
                                   SCALE_BK, INT4, DENSE, ROUND_BF16, FP8_MODE,
                                   BLOCK_K)  # fmt: skip
            acc += wt * part
        _store(out_ptrs, acc, mask_n, OUT_BF16)
    elif FUSE == 1:
        r = (pid // TOPK).to(tl.int64)
        e = tl.load(experts_ptr + pid).to(tl.int64)
        x_base = x_ptr + r * stride_xr
        g_row, g_srow = _row_ptrs(w_ptr, s_ptr, e, offs_n, stride_we, stride_wn, stride_se,
                                  stride_sn, SCALE_BN)  # fmt: skip
        u_row, u_srow = _row_ptrs(w_ptr, s_ptr, e, offs_n + N, stride_we, stride_wn, stride_se,
                                  stride_sn, SCALE_BN)  # fmt: skip
        gate = tl.zeros([BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            gate += _chunk_dot(x_base, g_row, g_srow, k0, mask_n, K, stride_wk, SCALE_BK, INT4,
                               DENSE, ROUND_BF16, FP8_MODE, BLOCK_K)  # fmt: skip
            up += _chunk_dot(x_base, u_row, u_srow, k0, mask_n, K, stride_wk, SCALE_BK, INT4,
                             DENSE, ROUND_BF16, FP8_MODE, BLOCK_K)  # fmt: skip
        act = gate * tl.sigmoid(gate) * up  # silu(gate) * up, fp32
        _store(out_ptrs, act, mask_n, OUT_BF16)
    else:
        if FUSE == 3:
            r = pid.to(tl.int64)
            e = 0
        elif TOPK > 0:  # pair s of token s // TOPK: no rows tensor
            r = (pid // TOPK).to(tl.int64)
            e = tl.load(experts_ptr + pid).to(tl.int64)
        else:
            r = tl.load(rows_ptr + pid).to(tl.int64)
            e = tl.load(experts_ptr + pid).to(tl.int64)
        w_row, s_row = _row_ptrs(w_ptr, s_ptr, e, offs_n, stride_we, stride_wn, stride_se,
                                 stride_sn, SCALE_BN)  # fmt: skip
        x_row = x_ptr + r * stride_xr
        if FUSE == 3:  # the first chunk apart: its weight load comes before the PDL wait
            tl.static_assert(DENSE)
            acc = _chunk_dot(x_row, w_row, s_row, 0, mask_n, K, stride_wk, SCALE_BK, INT4, DENSE,
                             ROUND_BF16, FP8_MODE, BLOCK_K, GLU, PDL)  # fmt: skip
            start: tl.constexpr = BLOCK_K
        else:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            start: tl.constexpr = 0
        for k0 in range(start, K, BLOCK_K):
            acc += _chunk_dot(x_row, w_row, s_row, k0, mask_n, K, stride_wk, SCALE_BK, INT4,
                              DENSE, ROUND_BF16, FP8_MODE, BLOCK_K, GLU)  # fmt: skip
        if FUSE == 3:
            if HAS_BIAS:
                acc += tl.load(rw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            _store(out_ptrs, acc, mask_n, OUT_BF16)
        else:
            tl.store(out_ptrs, acc, mask=mask_n)
