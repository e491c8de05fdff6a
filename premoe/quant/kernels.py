"""Triton kernel for MoE experts at decode: one gathered GEMV per (token, expert) row.

`moe_gemv(x, rows, experts, weight, scale, ...)` computes, for every routed pair s,

    y[s, n] = sum_k x[rows[s], k] * W[experts[s], n, k]        # y [S, N] fp32

reading W in its quantized form and dequantizing in registers:

- fp8 block: ``W = float(q) * scale[e, n // b0, k // b1]`` (q e4m3 ``[E, N, K]``);
- int4 (compressed-tensors pack-quantized, symmetric): ``W = (nibble - 8) * scale[e, n, k // g]``
  with ``q`` int32 ``[E, N, K/8]``, element k at bits ``4 * (k % 8)``;
- plain (bf16 / fp16 / fp32, no scales): ``W`` as stored, ``[E, N, K]`` or transposed
  ``[E, K, N]`` (gpt-oss), for `premoe.quant.gemv_experts`.

Dequantized weights stay fp32 (the exact quantized values); `round_dtype=torch.bfloat16` rounds
each to bf16 first, so only the summation order differs from a dense matmul of
`premoe.quant.codecs.dequantize(..., dtype=bfloat16)`'s weights. Work per row is K·N weight
bytes: it is meant for decode (few rows); prefill dequantizes the hit experts and uses dense
matmuls (`QuantizedExperts.forward`).

Two fused variants make a gated SiLU experts forward two kernels instead of about six (up GEMV,
casts, activation, down GEMV, routing weight, sum over the k experts), in any weight format:

- `moe_gemv_silu(x, experts, W_gate_up, ...)`: ``silu(gate) * up`` ``[S, I]`` in the activation
  dtype, gate and up rows of the concatenated ``[E, 2I, H]`` projection read in one K loop;
- `moe_gemv_wsum(h, experts, route_w, W_down, ...)`: ``sum_j route_w[t, j] * W[e_tj] @ h[t*k+j]``
  ``[T, H]``, accumulated in fp32 and rounded once to the hidden dtype.

Both round once (the unfused path rounds after each step): about one rounding of difference.

Triton exists only where a GPU does: this module imports it lazily. `available()` says whether
the kernel can run on a device; `TRITON_INTERPRET=1` runs it on CPU tensors (tests).

On sm_90+ the kernels can be launched with programmatic dependent launch (`premoe.quant.pdl`):
the ops are opaque custom ops, so compiled graphs launch them through `_launch` too (inductor's
launches of user kernels take no launch attributes).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from premoe.quant import pdl

_OPS: dict[str, Any] | None = None  # the custom ops by variant; {} where torch has none


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


def _kernel() -> Any:
    from premoe.quant import _gemv_triton  # imports triton

    return _gemv_triton.moe_gemv_kernel


ANY = 1 << 30
Shapes = tuple[tuple[int, tuple[int, int, int]], ...]
# (BLOCK_N, BLOCK_K, num_warps) per format (dense_t: plain weights stored transposed) and number
# of routed pairs S (the first entry whose bound >= S): the best at S = 8 (batch-1 decode,
# top-8), 64 and 256 on an H200, timed inside a CUDA graph (bench/tune_gemv.py, RESULTS.md;
# fp8/int4 at S = 8 were timed on weights the L2 cache held, before the tuner rotated experts)
SHAPES: dict[str, Shapes] = {
    "dense": ((8, (16, 256, 8)), (64, (16, 128, 4)), (ANY, (32, 128, 8))),
    "dense_t": ((ANY, (64, 64, 4)),),
    "fp8": ((8, (16, 512, 2)), (64, (16, 256, 2)), (ANY, (32, 512, 2))),
    "int4": ((8, (16, 256, 2)), (64, (8, 256, 2)), (ANY, (16, 256, 2))),
}
_WIDE = (ANY, (8, 1024, 4))  # linear layers past 2048 columns: q/k/v, LM head
# The fused variants, same layout. silu (keyed by pairs S): a program reads BLOCK_N gate and
# BLOCK_N up rows, so BLOCK_N is half of SHAPES' for the same bytes per program. wsum (keyed by
# tokens T: the grid is (T, N / BLOCK_N), each program loops over its token's k experts, unrolled
# so that their loads overlap): small BLOCK_N at T = 1 so that N = 2048 still gives 256 programs
# for 132 SMs, and at most ~160 registers a thread (ptxas, sm_90, no spills). Untuned guesses
# until measured (bench/bench_moe_kernels.py --sweep).
FUSED_SHAPES: dict[str, dict[str, Shapes]] = {
    "silu": {
        "dense": ((8, (8, 256, 8)), (64, (8, 128, 4)), (ANY, (16, 128, 8))),
        "dense_t": ((ANY, (32, 64, 4)),),
        "fp8": ((8, (8, 512, 2)), (64, (8, 256, 2)), (ANY, (16, 512, 2))),
        "int4": ((8, (8, 256, 2)), (ANY, (8, 256, 2))),
    },
    "wsum": {
        "dense": ((1, (4, 256, 4)), (ANY, (16, 128, 8))),
        "dense_t": ((ANY, (32, 64, 4)),),
        "fp8": ((ANY, (8, 256, 4)),),
        "int4": ((ANY, (8, 256, 4)),),
    },
    # a plain linear layer at decode (`gemv_linear`), keyed by its output columns N: the best of
    # 30 shapes for each layer of the bench model on an H100 (routers of 32-128 rows, o_proj
    # 2048 x 4096, q/k/v 5120 x 2048, LM head; bench_linear.py --sweep); wider past grid y 65535
    "linear": {"dense": ((81, (1, 1024, 4)), (128, (4, 1024, 4)), (2048, (1, 1024, 4)), _WIDE)},
    # the down projection reading the up's [gate | up] (`moe_gemv(glu=)`; else SHAPES), S = 8 tuned
    # alone on an H100 (bench/tune_gemv.py --projections down_glu)
    "glu": {"dense": ((8, (32, 256, 8)), (64, (16, 128, 4)), (ANY, (32, 128, 8)))},
}
_FUSE = {"": 0, "silu": 1, "wsum": 2, "linear": 3}
GLU_DTYPES = {torch.bfloat16: 1, torch.float32: 2}
"""Activation dtypes `moe_gemv`'s `glu` computes exactly as the activation kernel it replaces,
and the kernel's GLU mode for each (1: rounded to bf16, 2: fp32; 0: no activation)."""
_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension


def launch_shape(
    scale_bk: int, mode: str, pairs: int = 8, fuse: str = ""
) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SCALE_MODE, num_warps) for a format (`mode`: fp8 | int4 | dense |
    dense_t), its scale block / group width and `pairs` rows of the grid (routed pairs; tokens
    for `fuse="wsum"`; `fuse`: a `FUSED_SHAPES` table, "glu" too). A chunk of BLOCK_K lies in
    one scale block (SCALE_MODE 0: one scale per row), spans whole fp8 blocks (1), or takes a
    scale per element (2: int4 chunks wider than a group, fp8 widths not a power of two >= 16)."""
    table = FUSED_SHAPES[fuse].get(mode, SHAPES[mode]) if fuse else SHAPES[mode]
    bn, bk, warps = next(shape for bound, shape in table if pairs <= bound)
    if mode.startswith("dense"):
        return bn, bk, 2, warps
    if mode == "int4":
        return bn, bk, 0 if scale_bk % bk == 0 else 2, warps
    if scale_bk < 16 or scale_bk & (scale_bk - 1):
        return bn, min(bk, 128), 2, warps
    return bn, bk, 0 if bk <= scale_bk else 1, warps


def _launch(
    x: torch.Tensor,  # [R, K]
    rows: torch.Tensor,  # [S] int (plain only)
    experts: torch.Tensor,  # [S] int, or [T, k] (fused: pair s = token s // k)
    weight: torch.Tensor,  # [E, N, K] fp8 | [E, N, K/8] int32 | [E, N, K] or [E, K, N] dense
    scale: torch.Tensor,  # [E, ceil(N/b0), ceil(K/b1)] | [E, N, K/g] | unused (dense)
    route_w: torch.Tensor,  # [T, k] (wsum only)
    y: torch.Tensor,  # [S, N] fp32 | [S, N/2] (silu) | [T, N] (wsum) (out)
    n: int,
    k: int,
    scale_bn: int,
    scale_bk: int,
    mode: str,
    round_to: str,
    fuse: str = "",
    per_row: int = 0,  # plain: pairs per x row, row = s // per_row (0: rows[s])
    has_bias: bool = False,  # linear: route_w is the bias [N]
    glu: int = 0,  # plain: x rows are [gate | up], read as silu(gate) * up (`GLU_DTYPES`)
) -> None:
    kern = _kernel()
    if mode == "dense_t":  # [E, K, N]: row n of W starts at n, element k at k * stride
        stride_wn, stride_wk = weight.stride(2), weight.stride(1)
    else:
        stride_wn, stride_wk = weight.stride(1), 1
    topk = experts.shape[-1] if fuse else per_row
    key = y.shape[1] if fuse == "linear" else y.shape[0]
    shapes = fuse or ("glu" if glu else "")  # the FUSED_SHAPES table ("": SHAPES)
    block_n, block_k, fp8_mode, warps = launch_shape(scale_bk, mode, key, shapes)
    while -(-y.shape[1] // block_n) > _MAX_GRID_Y:  # e.g. an LM head's 152k rows one by one
        block_n *= 2
    grid = (y.shape[0], -(-y.shape[1] // block_n))
    kern[grid](
        x,
        rows,
        experts,
        weight,
        scale,
        y,
        route_w,
        y.shape[1],
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
        FUSE=_FUSE[fuse],
        TOPK=topk,
        OUT_BF16=y.dtype == torch.bfloat16,
        HAS_BIAS=has_bias,
        GLU=glu,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        **pdl.launch_args(x.device),
    )


def _round_name(dtype: torch.dtype | None) -> str:
    return "bf16" if dtype == torch.bfloat16 else "none"


_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.bfloat16, torch.float16, torch.float32)}
_DTYPE_NAMES = {d: name for name, d in _DTYPES.items()}


def _out(x: torch.Tensor, rows: int, cols: int, out_dtype: str) -> torch.Tensor:
    return torch.empty(rows, cols, dtype=_DTYPES[out_dtype], device=x.device)


def _register_ops() -> dict[str, Any]:
    """`premoe::moe_gemv`, `premoe::moe_gemv_silu`, `premoe::moe_gemv_wsum` and
    `premoe::gemv_linear` as opaque torch custom ops (traceable by torch.compile and CUDA
    graphs: output shapes from input shapes alone; launched by `_launch`, with PDL)."""
    from torch.library import custom_op

    @custom_op("premoe::moe_gemv", mutates_args=())
    def moe_gemv_op(
        x: torch.Tensor,
        rows: torch.Tensor,
        per_row: int,
        experts: torch.Tensor,
        weight: torch.Tensor,
        scale: torch.Tensor,
        n: int,
        k: int,
        scale_bn: int,
        scale_bk: int,
        mode: str,
        round_to: str,
        glu: int,
    ) -> torch.Tensor:
        y = _out(x, experts.shape[0], n, "float32")
        _launch(x, rows, experts, weight, scale, x, y, n, k, scale_bn, scale_bk, mode, round_to,
                per_row=per_row, glu=glu)  # fmt: skip
        return y

    @moe_gemv_op.register_fake
    def _(x: torch.Tensor, rows: Any, per_row: int, experts: torch.Tensor, w: Any, s: Any,
          n: int, *a: Any) -> Any:  # fmt: skip
        return _out(x, experts.shape[0], n, "float32")

    @custom_op("premoe::moe_gemv_silu", mutates_args=())
    def moe_gemv_silu_op(
        x: torch.Tensor,
        experts: torch.Tensor,
        weight: torch.Tensor,
        scale: torch.Tensor,
        n: int,
        k: int,
        scale_bn: int,
        scale_bk: int,
        mode: str,
        round_to: str,
        out_dtype: str,
    ) -> torch.Tensor:
        y = _out(x, experts.numel(), n, out_dtype)
        _launch(x, experts, experts, weight, scale, x, y, n, k, scale_bn, scale_bk, mode,
                round_to, "silu")  # fmt: skip
        return y

    @moe_gemv_silu_op.register_fake
    def _(x: torch.Tensor, experts: torch.Tensor, w: Any, s: Any, n: int, *a: Any) -> Any:
        return _out(x, experts.numel(), n, a[-1])

    @custom_op("premoe::moe_gemv_wsum", mutates_args=())
    def moe_gemv_wsum_op(
        x: torch.Tensor,
        experts: torch.Tensor,
        route_w: torch.Tensor,
        weight: torch.Tensor,
        scale: torch.Tensor,
        n: int,
        k: int,
        scale_bn: int,
        scale_bk: int,
        mode: str,
        round_to: str,
        out_dtype: str,
    ) -> torch.Tensor:
        y = _out(x, experts.shape[0], n, out_dtype)
        _launch(x, experts, experts, weight, scale, route_w, y, n, k, scale_bn, scale_bk, mode,
                round_to, "wsum")  # fmt: skip
        return y

    @moe_gemv_wsum_op.register_fake
    def _(x: torch.Tensor, experts: torch.Tensor, rw: Any, w: Any, s: Any, n: int,
          *a: Any) -> Any:  # fmt: skip
        return _out(x, experts.shape[0], n, a[-1])

    @custom_op("premoe::gemv_linear", mutates_args=())
    def gemv_linear_op(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        y = x.new_empty(x.shape[0], weight.shape[0])
        _linear(x, weight, y, bias)
        return y

    @gemv_linear_op.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, bias: Any) -> Any:
        return x.new_empty(x.shape[0], weight.shape[0])

    return {"": moe_gemv_op, "silu": moe_gemv_silu_op, "wsum": moe_gemv_wsum_op,
            "linear": gemv_linear_op}  # fmt: skip


def _linear(
    x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    n, k = weight.shape
    w = weight.unsqueeze(0)  # [1, N, K]: expert 0
    b = x if bias is None else bias  # a pointer the kernel never reads without a bias
    _launch(x, x, x, w, w, b, y, n, k, 1, 1, "dense", "none", "linear",
            has_bias=bias is not None)  # fmt: skip


def prepare(device: torch.device) -> bool:
    """Build the kernel (and its custom ops on CUDA) ahead of any trace; True if usable."""
    global _OPS
    if not available(device):
        return False
    _kernel()
    if device.type == "cuda" and _OPS is None:
        try:
            _OPS = _register_ops()
        except Exception:  # older torch: no custom ops; eager launches still work
            _OPS = {}
    return True


def _args(
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    n: int,
    k: int,
    scale_block: tuple[int, int],
    int4: bool,
    transposed: bool,
    round_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, tuple[int, int, int, int, str, str]]:
    """(scale tensor, the ops' (n, k, scale_bn, scale_bk, mode, round_to))."""
    if scale is None:
        mode = "dense_t" if transposed else "dense"
    else:
        mode = "int4" if int4 else "fp8"
    scale_t = weight if scale is None else scale  # a pointer the dense kernel never reads
    sb = (int(scale_block[0]), int(scale_block[1]))
    return scale_t, (n, k, sb[0], sb[1], mode, _round_name(round_dtype))


def _op(x: torch.Tensor, fuse: str) -> Any:
    """The custom op of `fuse` for CUDA tensors (None: launch directly)."""
    if x.device.type != "cuda":
        return None
    if _OPS is None:
        prepare(x.device)
    return (_OPS or {}).get(fuse)


def moe_gemv(
    x: torch.Tensor,
    rows: torch.Tensor | int,
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
    glu: torch.dtype | None = None,
) -> torch.Tensor:
    """`y [S, N]` fp32 with ``y[s] = W[experts[s]] @ x[rows[s]]`` (see the module docstring);
    `rows` an int r: ``x[s // r]`` (r pairs per row, token-major: no row tensor to compute).

    `glu` (bf16 or fp32): x's rows are an up projection's output ``[gate | up]`` (2 `k` values,
    fp32) and the product reads ``silu(gate) * up`` in its place, computed as
    ``act(h.to(glu))`` rounded to `glu` once (`GLU_DTYPES`): the activation between the
    up and the down projection without a kernel of its own.

    `scale=None`: plain weights `[E, N, K]` (`[E, K, N]` with `transposed`), read as they are.
    `round_dtype=torch.bfloat16` rounds every dequantized weight to bf16 first, so the weights
    are exactly `dequantize(..., dtype=bfloat16)`'s; by default they stay fp32 (exact quantized
    values, fewer instructions). `weight`/`scale` may be strided views (E-stride of a shared
    slot buffer); their last dim must be contiguous, as must `x`'s.
    """
    x, experts = x.contiguous(), experts.contiguous()
    per_row = rows if isinstance(rows, int) else 0
    rows_t = experts if isinstance(rows, int) else rows.contiguous()  # never read with per_row
    scale_t, args = _args(weight, scale, n, k, scale_block, int4, transposed, round_dtype)
    act = 0 if glu is None else GLU_DTYPES[glu]
    op = _op(x, "")
    if op is not None:
        return op(x, rows_t, per_row, experts, weight, scale_t, *args, act)
    y = _out(x, experts.shape[0], n, "float32")
    _launch(x, rows_t, experts, weight, scale_t, x, y, *args, per_row=per_row, glu=act)
    return y


def moe_gemv_silu(
    x: torch.Tensor,  # [T, K]
    experts: torch.Tensor,  # [T, k]
    weight: torch.Tensor,  # [E, 2 n, K] (quantized as for `moe_gemv`): gate rows, then up rows
    scale: torch.Tensor | None = None,
    *,
    n: int,
    k: int,
    out_dtype: torch.dtype,
    scale_block: tuple[int, int] = (1, 1),
    int4: bool = False,
    transposed: bool = False,
    round_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`y [S, n]` in `out_dtype`, S = T*k pairs in `experts`' order (token-major), with
    ``y[s] = silu(W[e_s, :n] @ x[s // k]) * (W[e_s, n:] @ x[s // k])``, computed in fp32 and
    rounded once: ``act_fn(gate) * up`` of ``h.chunk(2, -1)`` for a SiLU experts module. The
    weight arguments are those of `moe_gemv` for the whole ``[E, 2n, K]`` projection."""
    if experts.ndim != 2:
        raise ValueError(f"experts must be [T, k], got {tuple(experts.shape)}")
    x, experts = x.contiguous(), experts.contiguous()
    scale_t, args = _args(weight, scale, n, k, scale_block, int4, transposed, round_dtype)
    dt = _DTYPE_NAMES[out_dtype]
    op = _op(x, "silu")
    if op is not None:
        return op(x, experts, weight, scale_t, *args, dt)
    y = _out(x, experts.numel(), n, dt)
    _launch(x, experts, experts, weight, scale_t, x, y, *args, "silu")
    return y


def moe_gemv_wsum(
    x: torch.Tensor,  # [S, K]: row s is pair s
    experts: torch.Tensor,  # [T, k]
    route_w: torch.Tensor,  # [T, k]
    weight: torch.Tensor,  # [E, n, K] (quantized as for `moe_gemv`)
    scale: torch.Tensor | None = None,
    *,
    n: int,
    k: int,
    out_dtype: torch.dtype,
    scale_block: tuple[int, int] = (1, 1),
    int4: bool = False,
    transposed: bool = False,
    round_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`y [T, n]` in `out_dtype` with ``y[t] = sum_j route_w[t, j] * (W[experts[t, j]] @
    x[t * k + j])``: the down projection, routing weight and sum over a token's k experts in
    one kernel, accumulated in fp32 (routing weights too) and rounded once."""
    if experts.ndim != 2 or route_w.shape != experts.shape:
        raise ValueError(f"experts and route_w must be [T, k], got {tuple(experts.shape)}, "
                         f"{tuple(route_w.shape)}")  # fmt: skip
    x, experts, route_w = x.contiguous(), experts.contiguous(), route_w.contiguous()
    scale_t, args = _args(weight, scale, n, k, scale_block, int4, transposed, round_dtype)
    dt = _DTYPE_NAMES[out_dtype]
    op = _op(x, "wsum")
    if op is not None:
        return op(x, experts, route_w, weight, scale_t, *args, dt)
    y = _out(x, experts.shape[0], n, dt)
    _launch(x, experts, experts, weight, scale_t, route_w, y, *args, "wsum")
    return y


def gemv_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` (`[T, K]` x `[N, K]` (+ `[N]`) -> `[T, N]` in x's dtype) for a
    few rows: one GEMV kernel, fp32 accumulation, the bias added in fp32, rounded once (a dense
    matmul differs by its summation order)."""
    x = x.contiguous()
    op = _op(x, "linear")
    if op is not None:
        return op(x, weight, bias)
    y = x.new_empty(x.shape[0], weight.shape[0])
    _linear(x, weight, y, bias)
    return y


__all__ = [
    "available",
    "gemv_linear",
    "interpret_mode",
    "moe_gemv",
    "moe_gemv_silu",
    "moe_gemv_wsum",
    "prepare",
    "triton_importable",
]
