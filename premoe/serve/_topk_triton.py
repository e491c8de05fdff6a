"""The Triton kernel behind `premoe.serve.topk` (imported only where Triton is): one program
per row, the selection of `premoe.quant._route_triton.route_select`."""

import triton
import triton.language as tl

from premoe.quant._gemv_triton import pdl_enter
from premoe.quant._route_triton import route_select


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
    route_select(x, ok, offs, values_ptr + row * K, indices_ptr + row * K, scaling, K, BLOCK_E,
                 BLOCK_K, SCORING, RENORM)  # fmt: skip
