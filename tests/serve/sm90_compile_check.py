"""Run by tests/serve/test_attention.py: compile the decode step's own kernels (one-query
attention and its split merge, the routers' top-k in every scoring) for an H100/H200 (sm_90)
with no GPU present, as launched there (attention and top-k with programmatic dependent launch):
the interpreter does not check what only the compiler rejects."""

import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from premoe.serve import attention, topk


def compile_for_sm90(fn, types: dict[str, str], consts: dict, warps: int) -> None:
    sig = {**types, **dict.fromkeys(consts, "constexpr")}
    at = {(list(sig).index(c),): v for c, v in consts.items()}
    target = GPUTarget("cuda", 90, 32)
    compiled = triton.compile(ASTSource(fn, sig, constexprs=at), target=target,
                              options={"num_warps": warps})  # fmt: skip
    assert compiled.asm["cubin"], (fn, consts)
    assert bool(consts.get("PDL")) == ("griddepcontrol.wait" in compiled.asm["ptx"]), (fn, consts)
    # registers: what ptxas reports for this PTX (a spill costs local-memory traffic per block)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        info = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr  # fmt: skip
    assert "0 bytes spill stores" in info, (fn.__name__, consts, info)


attend, merge = attention._kernels()
wide_cols, programs_default = attention.WIDE_COLUMNS, attention.PROGRAMS or 32
n = 0
for dtype, precision, size in (("bf16", "tf32", 2), ("fp16", "tf32", 2), ("fp32", "ieee", 4)):
    for g, d, split in ((8, 128, False), (8, 128, True), (1, 64, False), (4, 80, True)):
        types = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "mask_ptr", "out_ptr")}
        types.update({"part_ptr": "*fp32", "stat_ptr": "*fp32", "ticket_ptr": "*i32", "n_kv": "i32",
                      "n_kv_heads": "i32", "scale": "fp32"})  # fmt: skip
        types.update(dict.fromkeys(["sq_b", "sq_h", "sk_b", "sk_h", "sk_n", "sv_b", "sv_h",
                                    "sv_n", "sm_b", "sm_n", "so_b", "so_h"], "i32"))  # fmt: skip
        block_g, block_d = max(16, triton.next_power_of_2(g)), triton.next_power_of_2(d)
        # the blockings launch() picks: wide blocks, the 64-column loop, a short context at
        # batch 1 split over many programs (narrow blocks)
        for wide, programs in ((wide_cols, 0), (0, 0), (wide_cols, programs_default)):
            attention.WIDE_COLUMNS, attention.PROGRAMS = wide, programs
            _, per, block_n = attention._blocks(161 if programs else 700, block_d, size, 4)
            for merge_in_kernel in (True, False) if split and size == 2 else (False,):
                consts = {"G": g, "BLOCK_G": block_g, "D": d, "BLOCK_D": block_d,
                          "BLOCK_N": block_n, "SPLIT_LEN": per, "HAS_MASK": True, "SPLIT": split,
                          "PRECISION": precision, "MERGE": merge_in_kernel,
                          "N_SPLITS": 6 if merge_in_kernel else 1, "PDL": True}  # fmt: skip
                compile_for_sm90(attend, types, consts, attention._warps(block_d, block_n))
                n += 1
        if split:
            types = {"part_ptr": "*fp32", "stat_ptr": "*fp32", "out_ptr": f"*{dtype}",
                     "n_kv_heads": "i32", "so_b": "i32", "so_h": "i32"}  # fmt: skip
            consts = {"N_SPLITS": 36, "G": g, "BLOCK_G": block_g, "D": d, "BLOCK_D": block_d}
            compile_for_sm90(merge, types, consts, 4)
            n += 1
for x_type, v_type in (("bf16", "bf16"), ("fp32", "fp32"), ("bf16", "fp32")):
    for scoring in (topk.RAW, topk.SOFTMAX, topk.SIGMOID, topk.TOPK_SOFTMAX):
        for renorm in (False, True):
            types = {"x_ptr": f"*{x_type}", "values_ptr": f"*{v_type}", "indices_ptr": "*i64",
                     "E": "i32", "stride_x": "i32", "scaling": "fp32"}  # fmt: skip
            consts = {"K": 8, "BLOCK_E": 128, "BLOCK_K": 8, "SCORING": scoring, "RENORM": renorm,
                      "PDL": True}  # fmt: skip
            compile_for_sm90(topk._kernel(), types, consts, 1)
            n += 1
print("sm_90 compile ok", n, "variants")
