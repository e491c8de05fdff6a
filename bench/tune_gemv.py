"""Tune the decode GEMV (`premoe.quant.kernels`): launch shapes per weight format at decode shapes.

For every format (dense bf16, fp8 128x128 blocks, int4 groups of 128) and every (BLOCK_N,
BLOCK_K, num_warps) in a small grid, times `moe_gemv` on the bench model's expert projections
(gate_up: N = 2 x 768, K = 2048; down: N = 2048, K = 768; down_glu: the down projection reading
the up projection's output through the activation, as serve's step runs it) for S routed pairs
of distinct experts (8: batch 1, top-8; 64), each projection alone, and reports the weight bytes
read per second, timed inside a CUDA graph as serve's decode step runs it. Each call of a graph
routes its pairs to the next of `--experts` / S sets of experts, so that the weights one replay
reads (hundreds of MB) do not stay in the L2 cache (50 MB), as a decode step's do not. The best
shapes per format at 8 pairs are what `kernels.SHAPES` (gate_up) and `kernels.FUSED_SHAPES["glu"]`
(down_glu) should say. `PREMOE_PDL=0` times them launched without programmatic dependent launch.

    python3 bench/tune_gemv.py --out bench/results/tune_gemv_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Any
from unittest.mock import patch

import _common as bc
import torch

from premoe.quant import kernels
from premoe.quant.codecs import quantize_fp8_block, quantize_int4_pack

GRID_N = (4, 8, 16, 32, 64)
GRID_K = (128, 256, 512)
GRID_W = (4, 8)
# name: (N, K, glu); down_glu reads the up projection's fp32 [gate | up] rows as serve's decode
# step does (`moe_gemv(..., glu=bf16)`, its own table `FUSED_SHAPES["glu"]`)
PROJS = {"gate_up": (1536, 2048, None), "down": (2048, 768, None),
         "down_glu": (2048, 768, torch.bfloat16)}  # fmt: skip


def weights(fmt: str, e: int, n: int, k: int, device: torch.device) -> dict[str, Any]:
    dense = torch.randn(e, n, k, dtype=torch.bfloat16, device=device) * 0.02
    if fmt == "dense":
        return {"w": dense, "s": None, "block": (1, 1), "int4": False, "bytes": dense.nbytes}
    if fmt == "fp8":
        parts = [quantize_fp8_block(dense[i].cpu(), (128, 128)) for i in range(e)]
        w = torch.stack([p["weight"] for p in parts]).to(device)
        s = torch.stack([p["weight_scale_inv"] for p in parts]).to(device)
        return {"w": w, "s": s, "block": (128, 128), "int4": False, "bytes": w.nbytes + s.nbytes}
    parts = [quantize_int4_pack(dense[i].cpu(), group_size=128) for i in range(e)]
    w = torch.stack([p["weight_packed"] for p in parts]).to(device)
    s = torch.stack([p["weight_scale"] for p in parts]).to(device)
    return {"w": w, "s": s, "block": (1, 128), "int4": True, "bytes": w.nbytes + s.nbytes}


def time_grid(
    fmt: str,
    projs: dict[str, tuple[int, int, torch.dtype | None]],
    ws: dict[str, dict[str, Any]],
    xs: dict[str, torch.Tensor],
    sets: list[torch.Tensor],
    share: float,
    device: torch.device,
) -> dict[str, list[dict[str, Any]]]:
    """{projection: [{shape, us, gb_per_s}]} at every grid shape, put in `SHAPES` and
    `FUSED_SHAPES["glu"]` for `fmt` (both restored after); one call per set of experts."""
    timings: dict[str, list[dict[str, Any]]] = {name: [] for name in projs}
    with patch.dict(kernels.SHAPES), patch.dict(kernels.FUSED_SHAPES["glu"]):
        for bn, bk, warps in itertools.product(GRID_N, GRID_K, GRID_W):
            kernels.SHAPES[fmt] = kernels.FUSED_SHAPES["glu"][fmt] = (
                (kernels.ANY, (bn, bk, warps)),
            )
            for name, (n, k, glu) in projs.items():
                w = ws[name]

                def call(
                    w: dict = w,
                    x: torch.Tensor = xs[name],
                    n: int = n,
                    k: int = k,
                    glu: torch.dtype | None = glu,
                ) -> None:
                    for e in sets:
                        kernels.moe_gemv(
                            x, 1, e, w["w"], w["s"], n=n, k=k,
                            scale_block=w["block"], int4=w["int4"], glu=glu,
                        )  # fmt: skip

                try:
                    sec = bc.graph_seconds(call, device, calls=len(sets), replays=10)
                except Exception as exc:  # a shape the kernel cannot take
                    print(f"{fmt} {name} {bn}x{bk} w{warps}: {type(exc).__name__}",
                          file=sys.stderr)  # fmt: skip
                    continue
                timings[name].append({"shape": [bn, bk, warps], "us": sec * 1e6,
                                      "gb_per_s": w["bytes"] * share / sec / 1e9})  # fmt: skip
    return timings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", type=int, default=128, help="experts per projection")
    p.add_argument("--pairs", type=int, nargs="+", default=[8, 64])
    p.add_argument("--formats", nargs="+", default=["dense", "fp8", "int4"])
    p.add_argument("--projections", nargs="+", choices=list(PROJS), default=list(PROJS))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    kernels.prepare(device)
    projs = {name: PROJS[name] for name in args.projections}
    result: dict[str, Any] = {"formats": {}}
    rows = []
    for fmt in args.formats:
        ws = {name: weights(fmt, args.experts, n, k, device) for name, (n, k, _) in projs.items()}
        fig: dict[str, Any] = {}
        for s in args.pairs:
            sets = [(torch.arange(s, device=device) + r * s) % args.experts
                    for r in range(max(1, args.experts // s))]  # fmt: skip
            xs = {name: torch.randn(s, 2 * k if glu else k, device=device,
                                    dtype=torch.float32 if glu else torch.bfloat16)
                  for name, (_, k, glu) in projs.items()}  # fmt: skip
            share = min(s, args.experts) / args.experts  # of a projection's bytes a call reads
            timings = time_grid(fmt, projs, ws, xs, sets, share, device)
            fig[s] = {}
            for name, (_, _, glu) in projs.items():
                bn, bk, _, warps = kernels.launch_shape(ws[name]["block"][1], fmt, s,
                                                        "glu" if glu else "")  # fmt: skip
                default = (bn, bk, warps)
                ranked = sorted(timings[name], key=lambda r: r["us"])
                base = next((r for r in ranked if tuple(r["shape"]) == default), None)
                fig[s][name] = {"best": ranked[:5], "default": base}
                best = ranked[0]
                rows.append(
                    [fmt, s, name, "x".join(map(str, best["shape"])), f"{best['us']:.2f}",
                     f"{best['gb_per_s']:.0f}", "x".join(map(str, default)),
                     f"{base['us']:.2f}" if base else "-",
                     f"{base['gb_per_s']:.0f}" if base else "-"]
                )  # fmt: skip
        result["formats"][fmt] = fig
    head = ["format", "pairs", "projection", "best BNxBKxW", "us", "GB/s", "default", "us", "GB/s"]
    bc.print_table(head, rows)
    bc.write_json(args.out, result, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
