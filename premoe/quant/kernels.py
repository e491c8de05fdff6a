"""Triton kernel for MoE experts at decode: one gathered GEMV per (token, expert) row.

`moe_gemv(x, rows, experts, weight, scale, ...)` computes, for every routed pair s,

    y[s, n] = sum_k x[rows[s], k] * W[experts[s], n, k]        # y [S, N] fp32

reading W in its quantized form and dequantizing in registers:

- fp8 block: ``W = float(q) * scale[e, n // b0, k // b1]`` (q e4m3 ``[E, N, K]``);
- int4 (compressed-tensors pack-quantized, symmetric): ``W = (nibble - 8) * scale[e, n, k // g]``
  with ``q`` int32 ``[E, N, K/8]``, element k at bits ``4 * (k % 8)``;
- plain (bf16 / fp16 / fp32, no scales): ``W`` as stored, ``[E, N, K]`` or transposed
  ``[E, K, N]`` (gpt-oss), for `premoe.quant.gemv_experts`.

Dequantized weights stay fp32 (the exact quantized values); with `round_dtype=torch.bfloat16`
each is rounded to bf16 first, so the kernel multiplies by exactly the weights
`premoe.quant.codecs.dequantize(..., dtype=bfloat16)` gives and only the summation order differs
from a dense matmul of the dequantized model. Work per row is K·N weight bytes, so it is meant
for decode (few rows); prefill dequantizes the hit experts and uses dense matmuls
(`QuantizedExperts.forward`).

Triton exists only where a GPU does: this module imports it lazily. `available()` says whether
the kernel can run on a device; `TRITON_INTERPRET=1` runs it on CPU tensors (tests).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

_OP: Any = None


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install without a driver
        return False
    return True


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> bool:
    """True when the Triton kernel can run on tensors of `device`."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpret_mode()


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def moe_gemv_kernel(
        x_ptr,
        rows_ptr,
        experts_ptr,
        w_ptr,
        s_ptr,
        y_ptr,
        N,
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
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        pid_n = tl.program_id(1)
        r = tl.load(rows_ptr + pid_s).to(tl.int64)
        e = tl.load(experts_ptr + pid_s).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        w_base = w_ptr + e * stride_we + offs_n.to(tl.int64) * stride_wn  # [BN] row starts
        s_base = s_ptr + e * stride_se + (offs_n // SCALE_BN).to(tl.int64) * stride_sn
        x_base = x_ptr + r * stride_xr
        if INT4:
            # 8 nibbles per int32 word: load words once, unpack with shifts to [BN, BW, 8]
            BW: tl.constexpr = BLOCK_K // 8
            shifts = tl.arange(0, 8) * 4
            for k0 in range(0, K // 8, BW):
                offs_w = k0 + tl.arange(0, BW)  # word index along K/8
                mask_w = offs_w < K // 8
                m2 = mask_n[:, None] & mask_w[None, :]
                words = tl.load(w_base[:, None] + offs_w[None, :], mask=m2, other=0)
                nib = (words[:, :, None] >> shifts[None, None, :]) & 0xF
                w = (nib - 8).to(tl.float32)  # [BN, BW, 8]
                offs_x = offs_w[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BW, 8]
                xk = tl.load(x_base + offs_x, mask=mask_w[:, None], other=0.0).to(tl.float32)
                if FP8_MODE == 0 and not ROUND_BF16:  # the chunk lies in one group
                    sc1 = tl.load(s_base + (k0 * 8) // SCALE_BK, mask=mask_n, other=0.0)
                    part = tl.sum(tl.sum(w * xk[None, :, :], axis=2), axis=1)  # [BN]
                    acc += part * sc1.to(tl.float32)
                else:
                    sc = tl.load(s_base[:, None] + (offs_w[None, :] * 8) // SCALE_BK, mask=m2,
                                 other=0.0).to(tl.float32)  # [BN, BW]  # fmt: skip
                    if ROUND_BF16:
                        # bf16 round-to-nearest-even on the bits (same under the interpreter)
                        bits = (w * sc[:, :, None]).to(tl.uint32, bitcast=True)
                        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                        w = bits.to(tl.float32, bitcast=True)
                        acc += tl.sum(tl.sum(w * xk[None, :, :], axis=2), axis=1)
                    else:
                        acc += tl.sum(tl.sum(w * xk[None, :, :], axis=2) * sc, axis=1)
        elif FP8_MODE == 1:
            # several whole scale blocks per chunk: load W as [BN, NB, SCALE_BK], one scale each
            NB: tl.constexpr = BLOCK_K // SCALE_BK
            offs_b = tl.arange(0, NB)
            offs_j = tl.arange(0, SCALE_BK)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + offs_b[:, None] * SCALE_BK + offs_j[None, :]  # [NB, SCALE_BK]
                mask_k = offs_k < K
                mask_b = (k0 + offs_b * SCALE_BK) < K  # [NB]
                m3 = mask_n[:, None, None] & mask_k[None, :, :]
                xk = tl.load(x_base + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                w = tl.load(w_base[:, None, None] + offs_k[None, :, :], mask=m3, other=0.0)
                w = w.to(tl.float32)  # [BN, NB, SCALE_BK]
                sc = tl.load(s_base[:, None] + (k0 // SCALE_BK + offs_b)[None, :],
                             mask=mask_n[:, None] & mask_b[None, :], other=0.0)  # fmt: skip
                sc = sc.to(tl.float32)  # [BN, NB]
                if ROUND_BF16:
                    # bf16 round-to-nearest-even on the bits (same under the interpreter)
                    bits = (w * sc[:, :, None]).to(tl.uint32, bitcast=True)
                    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                    w = bits.to(tl.float32, bitcast=True)
                    acc += tl.sum(tl.sum(w * xk[None, :, :], axis=2), axis=1)
                else:
                    acc += tl.sum(tl.sum(w * xk[None, :, :], axis=2) * sc, axis=1)
        else:
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                m2 = mask_n[:, None] & mask_k[None, :]
                xk = tl.load(x_base + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                w = tl.load(w_base[:, None] + offs_k[None, :] * stride_wk, mask=m2, other=0.0)
                w = w.to(tl.float32)
                if DENSE:
                    acc += tl.sum(w * xk[None, :], axis=1)
                elif FP8_MODE == 0:  # the chunk lies in one scale block: one scale per row
                    sc = tl.load(s_base + k0 // SCALE_BK, mask=mask_n, other=0.0).to(tl.float32)
                    if ROUND_BF16:
                        # bf16 round-to-nearest-even on the bits (same under the interpreter)
                        bits = (w * sc[:, None]).to(tl.uint32, bitcast=True)
                        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                        w = bits.to(tl.float32, bitcast=True)
                        acc += tl.sum(w * xk[None, :], axis=1)
                    else:
                        acc += tl.sum(w * xk[None, :], axis=1) * sc
                else:  # per-element scales (any block width)
                    sc = tl.load(s_base[:, None] + offs_k[None, :] // SCALE_BK, mask=m2,
                                 other=0.0).to(tl.float32)  # fmt: skip
                    w = w * sc
                    if ROUND_BF16:
                        # bf16 round-to-nearest-even on the bits (same under the interpreter)
                        bits = w.to(tl.uint32, bitcast=True)
                        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                        w = bits.to(tl.float32, bitcast=True)
                    acc += tl.sum(w * xk[None, :], axis=1)
        tl.store(y_ptr + pid_s * stride_yr + offs_n, acc, mask=mask_n)

    return moe_gemv_kernel


ANY = 1 << 30
# (BLOCK_N, BLOCK_K, num_warps) per format (dense_t: plain weights stored transposed) and number
# of routed pairs S (the first entry whose bound >= S): the best at S = 8 (batch-1 decode,
# top-8), 64 and 256 on an H200, timed inside a CUDA graph (bench/tune_gemv.py, RESULTS.md)
SHAPES: dict[str, tuple[tuple[int, tuple[int, int, int]], ...]] = {
    "dense": ((8, (16, 256, 8)), (64, (16, 128, 4)), (ANY, (32, 128, 8))),
    "dense_t": ((ANY, (64, 64, 4)),),
    "fp8": ((8, (16, 512, 2)), (64, (16, 256, 2)), (ANY, (32, 512, 2))),
    "int4": ((8, (16, 256, 2)), (64, (8, 256, 2)), (ANY, (16, 256, 2))),
}


def launch_shape(scale_bk: int, mode: str, pairs: int = 8) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SCALE_MODE, num_warps) for a format (`mode`: fp8 | int4 | dense |
    dense_t), its scale block / group width and `pairs` routed pairs. A chunk of BLOCK_K lies in
    one scale block (SCALE_MODE 0: one scale per row), spans whole fp8 blocks (1), or takes a
    scale per element (2: int4 chunks wider than a group, fp8 widths that are not a power of
    two >= 16)."""
    bn, bk, warps = next(shape for bound, shape in SHAPES[mode] if pairs <= bound)
    if mode.startswith("dense"):
        return bn, bk, 2, warps
    if mode == "int4":
        return bn, bk, 0 if scale_bk % bk == 0 else 2, warps
    if scale_bk < 16 or scale_bk & (scale_bk - 1):
        return bn, min(bk, 128), 2, warps
    return bn, bk, 0 if bk <= scale_bk else 1, warps


def _launch(
    x: torch.Tensor,  # [R, K]
    rows: torch.Tensor,  # [S] int
    experts: torch.Tensor,  # [S] int
    weight: torch.Tensor,  # [E, N, K] fp8 | [E, N, K/8] int32 | [E, N, K] or [E, K, N] dense
    scale: torch.Tensor,  # [E, ceil(N/b0), ceil(K/b1)] | [E, N, K/g] | unused (dense)
    y: torch.Tensor,  # [S, N] fp32 (out)
    n: int,
    k: int,
    scale_bn: int,
    scale_bk: int,
    mode: str,
    round_to: str,
    wrap: Any = None,
) -> None:
    kern = _kernel() if wrap is None else wrap(_kernel())
    if mode == "dense_t":  # [E, K, N]: row n of W starts at n, element k at k * stride
        stride_wn, stride_wk = weight.stride(2), weight.stride(1)
    else:
        stride_wn, stride_wk = weight.stride(1), 1
    block_n, block_k, fp8_mode, warps = launch_shape(scale_bk, mode, rows.shape[0])
    grid = (rows.shape[0], -(-n // block_n))
    kern[grid](
        x,
        rows,
        experts,
        weight,
        scale,
        y,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        stride_wn,
        stride_wk,
        scale.stride(0),
        scale.stride(1),
        y.stride(0),
        SCALE_BN=scale_bn,
        SCALE_BK=scale_bk,
        INT4=mode == "int4",
        DENSE=mode.startswith("dense"),
        ROUND_BF16=round_to == "bf16",
        FP8_MODE=fp8_mode,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
    )


def _round_name(dtype: torch.dtype | None) -> str:
    return "bf16" if dtype == torch.bfloat16 else "none"


def _register_op() -> Any:
    """`premoe::moe_gemv` as a torch custom op (traceable by torch.compile / CUDA graphs)."""
    from torch.library import triton_op, wrap_triton

    @triton_op("premoe::moe_gemv", mutates_args=())
    def moe_gemv_op(
        x: torch.Tensor,
        rows: torch.Tensor,
        experts: torch.Tensor,
        weight: torch.Tensor,
        scale: torch.Tensor,
        n: int,
        k: int,
        scale_bn: int,
        scale_bk: int,
        mode: str,
        round_to: str,
    ) -> torch.Tensor:
        y = torch.empty(rows.shape[0], n, dtype=torch.float32, device=x.device)
        _launch(x, rows, experts, weight, scale, y, n, k, scale_bn, scale_bk, mode, round_to,
                wrap=wrap_triton)  # fmt: skip
        return y

    return moe_gemv_op


def prepare(device: torch.device) -> bool:
    """Build the kernel (and its custom op on CUDA) ahead of any trace; True if usable."""
    global _OP
    if not available(device):
        return False
    _kernel()
    if device.type == "cuda" and _OP is None:
        try:
            _OP = _register_op()
        except Exception:  # older torch: no triton_op; eager launches still work
            _OP = False
    return True


def moe_gemv(
    x: torch.Tensor,
    rows: torch.Tensor,
    experts: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    n: int,
    k: int,
    scale_block: tuple[int, int] = (1, 1),
    int4: bool = False,
    transposed: bool = False,
    round_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`y [S, N]` fp32 with ``y[s] = W[experts[s]] @ x[rows[s]]`` (see the module docstring).

    `scale=None`: plain weights `[E, N, K]` (`[E, K, N]` with `transposed`), read as they are.
    `round_dtype=torch.bfloat16` rounds every dequantized weight to bf16 first, so the weights
    are exactly `dequantize(..., dtype=bfloat16)`'s; by default they stay fp32 (exact quantized
    values, fewer instructions). `weight`/`scale` may be strided views (E-stride of a shared
    slot buffer); their last dim must be contiguous, as must `x`'s.
    """
    x = x.contiguous()
    rows = rows.contiguous()
    experts = experts.contiguous()
    if scale is None:
        mode = "dense_t" if transposed else "dense"
    else:
        mode = "int4" if int4 else "fp8"
    scale_t = weight if scale is None else scale  # a pointer the dense kernel never reads
    args = (n, k, int(scale_block[0]), int(scale_block[1]), mode, _round_name(round_dtype))
    if x.device.type == "cuda" and _OP is None:
        prepare(x.device)
    if x.device.type == "cuda" and _OP:
        return _OP(x, rows, experts, weight, scale_t, *args)
    y = torch.empty(rows.shape[0], n, dtype=torch.float32, device=x.device)
    _launch(x, rows, experts, weight, scale_t, y, *args)
    return y


__all__ = ["available", "interpret_mode", "moe_gemv", "prepare", "triton_importable"]
