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
(down_glu) should say. `--projections mlp` times the one-kernel experts forward
(`premoe.quant.fused_mlp`, dense weights; its best shapes go in `MLP_SHAPES`) beside the up and
down_glu GEMVs it replaces. `PREMOE_PDL=0` times them launched without programmatic dependent
launch.

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

from premoe.quant import fused_mlp, kernels
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


def timing(
    call: Any, shape: tuple[int, ...], nbytes: float, calls: int, device: torch.device, label: str
) -> dict[str, Any] | None:
    """{shape, us, gb_per_s} of `call` (`calls` calls, captured in a CUDA graph and replayed);
    None, said on stderr, for a shape the kernel cannot take."""
    try:
        sec = bc.graph_seconds(call, device, calls=calls, replays=10)
    except Exception as exc:
        print(f"{label} {'x'.join(map(str, shape))}: {type(exc).__name__}", file=sys.stderr)
        return None
    return {"shape": list(shape), "us": sec * 1e6, "gb_per_s": nbytes / sec / 1e9}


def ranked(timings: list[dict[str, Any]], default: list[int]) -> tuple[list, dict | None]:
    """(timings fastest first, the one of the `default` shape or None)."""
    order = sorted(timings, key=lambda r: r["us"])
    return order, next((r for r in order if r["shape"] == default), None)


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

                r = timing(call, (bn, bk, warps), w["bytes"] * share, len(sets), device,
                           f"{fmt} {name}")  # fmt: skip
                if r:
                    timings[name].append(r)
    return timings


# (BLOCK_J, GROUP) pairs, then BLOCK_K, BLOCK_H, num_warps
MLP_GRID = (((8, 1), (16, 1), (32, 1), (4, 2), (8, 2), (16, 2), (4, 8), (8, 8)), (256, 512),
            (128, 512), (4, 8))  # fmt: skip


def time_mlp(
    ws: dict[str, dict[str, Any]], s: int, sets: list[torch.Tensor], share: float,
    device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """The one-kernel experts forward (`fused_mlp`, dense) at every `MLP_GRID` shape, and the
    two kernels it replaces (up GEMV, down GEMV reading the activation, current tables) side by
    side: {"grid": [{shape, us, gb_per_s}], "two_kernels": {us, gb_per_s}}."""
    wu, wd = ws["gate_up"]["w"], ws["down_glu"]["w"]
    nbytes = (wu.nbytes + wd.nbytes) * share
    i, h = wd.shape[2], wd.shape[1]
    x = torch.randn(s // 8, h, device=device, dtype=torch.bfloat16)  # top-8: S / 8 tokens
    rw = torch.rand(s // 8, 8, device=device)
    idx = [e.view(-1, 8) for e in sets]

    def two() -> None:
        for e in sets:
            up = kernels.moe_gemv(x, 8, e, wu, n=2 * i, k=h)
            kernels.moe_gemv(up, 1, e, wd, n=h, k=i, glu=torch.bfloat16)

    out: dict[str, Any] = {"two_kernels": timing(two, (), nbytes, len(sets), device, "two"),
                           "grid": []}  # fmt: skip
    with patch.object(fused_mlp, "MLP_SHAPES", fused_mlp.MLP_SHAPES):
        for (bj, group), *rest in itertools.product(*MLP_GRID):
            shape = (bj, group, *rest)
            fused_mlp.MLP_SHAPES = ((kernels.ANY, shape),)
            parts = torch.empty(s // group, -(-i // bj), h, device=device)

            def one(parts: torch.Tensor = parts) -> None:
                for e in idx:
                    fused_mlp._launch(x, e, rw, wu, wd, parts, 1)

            r = timing(one, shape, nbytes, len(sets), device, "mlp")
            if r:
                out["grid"].append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", type=int, default=128, help="experts per projection")
    p.add_argument("--pairs", type=int, nargs="+", default=[8, 64])
    p.add_argument("--formats", nargs="+", default=["dense", "fp8", "int4"])
    p.add_argument("--projections", nargs="+", choices=[*PROJS, "mlp"], default=list(PROJS),
                   help="mlp: the one-kernel experts forward (dense only) against the up and "
                   "down_glu GEMVs it replaces")  # fmt: skip
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    kernels.prepare(device)
    mlp = "mlp" in args.projections
    names = {*args.projections, *(("gate_up", "down_glu") if mlp else ())} - {"mlp"}
    projs = {name: PROJS[name] for name in PROJS if name in names}
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
            tuned = {name: projs[name] for name in args.projections if name in projs}
            timings = time_grid(fmt, tuned, ws, xs, sets, share, device) if tuned else {}
            fig[s] = {}
            if mlp and fmt == "dense" and s % 8 == 0:  # top-8 routing: S / 8 tokens
                fig[s]["mlp"] = m = time_mlp(ws, s, sets, share, device)
                default = list(fused_mlp.launch_shape(s, 8))
                order, base = ranked(m["grid"], default)
                m["best"], m["default"] = order[:5], base
                two = m["two_kernels"]
                rows.append(
                    [fmt, s, "mlp", "x".join(map(str, order[0]["shape"])),
                     f"{order[0]['us']:.2f}", f"{order[0]['gb_per_s']:.0f}",
                     "two kernels", f"{two['us']:.2f}", f"{two['gb_per_s']:.0f}"]
                )  # fmt: skip
                if base:
                    rows.append([fmt, s, "mlp default", "x".join(map(str, default)),
                                 f"{base['us']:.2f}", f"{base['gb_per_s']:.0f}", "", "",
                                 ""])  # fmt: skip
            for name, (_, _, glu) in tuned.items():
                bn, bk, _, warps = kernels.launch_shape(ws[name]["block"][1], fmt, s,
                                                        "glu" if glu else "")  # fmt: skip
                default = [bn, bk, warps]
                order, base = ranked(timings[name], default)
                fig[s][name] = {"best": order[:5], "default": base}
                best = order[0]
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
