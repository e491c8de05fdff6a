"""Run by tests/quant/test_resident.py: compile the GEMV kernel for an H100/H200 (sm_90) with no
GPU present (Triton's code generator, LLVM and its bundled ptxas), for every variant (plain,
silu, wsum), weight format and launch shape of the tables at H = 2048, I = 768, k = 8, as
launched on sm_90 (with programmatic dependent launch: `PDL`): the interpreter does not check
what only the compiler rejects."""

import itertools
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from premoe.quant import _gemv_triton, kernels
from premoe.serve import _topk_triton

H, I, TOPK = 2048, 768, 8  # noqa: E741
FORMATS = {  # mode: (weight, scale pointer types, scale block)
    "dense": ("bf16", "bf16", (1, 1)),
    "fp8": ("fp8e4nv", "fp32", (128, 128)),
    "int4": ("i32", "bf16", (1, 128)),
}
ARGS = ["x_ptr", "rows_ptr", "experts_ptr", "w_ptr", "s_ptr", "y_ptr", "rw_ptr", "N", "K",
        "stride_xr", "stride_we", "stride_wn", "stride_wk", "stride_se", "stride_sn",
        "stride_yr"]  # fmt: skip


def compile_sm90(kernel: Any, sig: dict[str, str], consts: dict[str, Any], warps: int) -> Any:
    """`kernel` compiled for sm_90 with `sig`'s runtime argument types and `consts`."""
    sig = {**sig, **dict.fromkeys(consts, "constexpr")}
    at = {(list(sig).index(c),): v for c, v in consts.items()}
    src = ASTSource(kernel, sig, constexprs=at)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


done = set()
# the plain kernel twice: an up projection (bf16 x), a down projection reading the activation
# from the up projection's fp32 output (GLU 1)
VARIANTS = (("", H, "fp32", 0), ("", I, "fp32", 1), ("silu", H, "bf16", 0), ("wsum", I, "bf16", 0))
for fuse, k_in, y_type, glu in VARIANTS:
    for mode, (w_type, s_type, block) in FORMATS.items():
        for rows in (1, 8, 64, 256):
            bn, bk, fp8_mode, warps = kernels.launch_shape(block[1], mode, rows, fuse)
            # plain: a rows tensor (TOPK 0) or pairs per row (the experts' k, or 1)
            for round_bf16, topk in itertools.product(
                (False, True) if mode != "dense" else (False,), (TOPK,) if fuse else (0, 8, 1)
            ):
                key = (fuse, mode, bn, bk, fp8_mode, warps, round_bf16, topk, glu)
                if key in done:
                    continue
                done.add(key)
                types = ["*fp32" if glu else "*bf16", "*i64", "*i64", f"*{w_type}", f"*{s_type}",
                         f"*{y_type}", "*fp32", "i32", "constexpr"] + ["i32"] * 7  # fmt: skip
                sig = dict(zip(ARGS, types, strict=True))
                consts = {"K": k_in, "stride_wk": 1, "SCALE_BN": block[0],
                          "SCALE_BK": block[1], "INT4": mode == "int4",
                          "DENSE": mode == "dense", "ROUND_BF16": round_bf16,
                          "FP8_MODE": fp8_mode, "FUSE": kernels._FUSE[fuse],
                          "TOPK": topk, "OUT_BF16": y_type == "bf16", "HAS_BIAS": False,
                          "GLU": glu, "BLOCK_N": bn, "BLOCK_K": bk, "PDL": True}  # fmt: skip
                compiled = compile_sm90(_gemv_triton.moe_gemv_kernel, sig, consts, warps)
                assert compiled.asm["cubin"], key
                assert "griddepcontrol.wait" in compiled.asm["ptx"], key
for (n_out, k_in), bias in itertools.product(((128, H), (H, 2 * H), (5 * 1024, H)), (False, True)):
    # a plain linear: router (with a row mask as its bias), o/qkv_proj
    bn, bk, fp8_mode, warps = kernels.launch_shape(1, "dense", n_out, "linear")
    types = ["*bf16", "*bf16", "*bf16", "*bf16", "*bf16", "*bf16", "*bf16", "i32",
             "constexpr"] + ["i32"] * 7  # fmt: skip
    sig = dict(zip(ARGS, types, strict=True))
    consts = {"K": k_in, "stride_wk": 1, "SCALE_BN": 1, "SCALE_BK": 1, "INT4": False,
              "DENSE": True, "ROUND_BF16": False, "FP8_MODE": fp8_mode,
              "FUSE": kernels._FUSE["linear"], "TOPK": 1, "OUT_BF16": True, "HAS_BIAS": bias,
              "GLU": 0, "BLOCK_N": bn, "BLOCK_K": bk, "PDL": True}  # fmt: skip
    compiled = compile_sm90(_gemv_triton.moe_gemv_kernel, sig, consts, warps)
    assert compiled.asm["cubin"], ("linear", n_out)
    ptx = compiled.asm["ptx"]  # the first weight chunk is loaded before the wait
    assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait"), ("linear", n_out)
    done.add(("linear", n_out))
TOPK_ARGS = ["x_ptr", "values_ptr", "indices_ptr", "E", "stride_x", "scaling"]
for (e, k), scoring in itertools.product(((128, 8), (1024, 8), (60, 6), (256, 32)), (0, 1, 3)):
    # the top-k kernel as `topk._launch` launches it (one warp): its rounds are 32-bit warp
    # reductions (`redux.sync`), not shuffles
    sig = dict(zip(TOPK_ARGS, ["*fp32", "*bf16", "*i64", "i32", "i32", "fp32"], strict=True))
    consts = {"K": k, "BLOCK_E": max(16, triton.next_power_of_2(e)),
              "BLOCK_K": max(2, triton.next_power_of_2(k)), "SCORING": scoring,
              "RENORM": scoring != 0, "PDL": True}  # fmt: skip
    compiled = compile_sm90(_topk_triton.route_topk_kernel, sig, consts, 1)
    ptx = compiled.asm["ptx"]
    assert ptx.count("redux.sync") == 2 * k, ("topk", e, k, scoring)
    assert ptx.count("shfl.sync") <= 20, ("topk", e, k, scoring)  # softmax and sums only
    done.add(("topk", e, k, scoring))
print("sm_90 compile ok", len(done), "variants")
