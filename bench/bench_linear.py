"""Benchmark: a decode step's one-row linear layers, cuBLAS (`F.linear`) against the Triton GEMV
(`premoe.quant.kernels.gemv_linear`, what `premoe.serve.gemv_linear` patches in), issue #17.

For every linear layer shape of the bench model at batch 1 (the fused q/k/v, o_proj, a router of
`--routers` widths, the LM head), times one call of each on `--layers` distinct weights (more
bytes than the L2 cache holds, as a decode step reads them) captured in one CUDA graph, as serve's
step runs them; the GEMV at its table's launch shape (`kernels.FUSED_SHAPES["linear"]`), with and
without programmatic dependent launch (`premoe.quant.pdl.ENABLED`), and at every shape of a
small grid (`--sweep`). Prints µs per call and the weight bytes read per second, writes JSON.

    python3 bench/bench_linear.py --sweep --out bench/results/linear_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Any

import _common as bc
import torch
import torch.nn.functional as F

from premoe.quant import kernels, pdl

GRID = list(
    itertools.product((1, 2, 4, 8, 16), (256, 512, 1024), (4, 8))
)  # BLOCK_N, BLOCK_K, warps


def shapes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """name: (N, K) of the bench model's one-row linear layers."""
    q = args.heads * args.head_dim
    kv = bc.kv_heads(args) * args.head_dim
    out = {"qkv_proj": (q + 2 * kv, args.hidden), "o_proj": (args.hidden, q)}
    out.update({f"router_{n}": (n, args.hidden) for n in args.routers})
    out["lm_head"] = (args.vocab, args.hidden)
    return out


def measure(n: int, k: int, layers: int, device: torch.device, sweep: bool) -> dict[str, Any]:
    """µs per call of cuBLAS and of the GEMV (table shape; every grid shape with `sweep`)."""
    ws = [torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02 for _ in range(layers)]
    x = torch.randn(1, k, dtype=torch.bfloat16, device=device)
    ref = F.linear(x, ws[0]).float()
    err = ((kernels.gemv_linear(x, ws[0]).float() - ref).abs().max() / ref.abs().max()).item()

    def gemv() -> None:
        for w in ws:
            kernels.gemv_linear(x, w)

    def cublas() -> None:
        for w in ws:
            F.linear(x, w)

    row: dict[str, Any] = {"n": n, "k": k, "max_rel_err": err, "sweep": {}}
    row["cublas_us"] = bc.graph_seconds(cublas, device, layers) * 1e6
    default = pdl.ENABLED
    try:
        for on in (False, True):
            pdl.ENABLED = on
            row[f"gemv_{'' if on else 'no'}pdl_us"] = bc.graph_seconds(gemv, device, layers) * 1e6
    finally:
        pdl.ENABLED = default
    row["gemv_us"] = row["gemv_pdl_us" if default else "gemv_nopdl_us"]  # as it ships
    table = kernels.FUSED_SHAPES["linear"]["dense"]
    for shape in GRID if sweep else []:
        kernels.FUSED_SHAPES["linear"]["dense"] = ((kernels.ANY, shape),)
        try:
            row["sweep"]["x".join(map(str, shape))] = bc.graph_seconds(gemv, device, layers) * 1e6
        finally:
            kernels.FUSED_SHAPES["linear"]["dense"] = table
    row["best"] = min(row["sweep"].items(), key=lambda kv: kv[1], default=("-", float("nan")))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    bc.add_model_args(p)
    p.add_argument("--routers", type=int, nargs="+", default=[32, 81, 128], help="router widths")
    p.add_argument("--sweep", action="store_true", help="also every launch shape of the grid")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = bc.cuda_device("bench_linear")
    if device is None:
        return 2
    kernels.prepare(device)
    table = kernels.FUSED_SHAPES["linear"]["dense"]
    result: dict[str, Any] = {"args": vars(args), "table": table, "shapes": {}}
    print(f"{'layer':<12} {'N x K':>13} {'cuBLAS us':>9} {'GEMV us':>8} {'ratio':>6} "
          f"{'GEMV GB/s':>9} {'no-PDL us':>9} {'PDL us':>8} {'best shape':>12} "
          f"{'best us':>8}")  # fmt: skip
    for name, (n, k) in shapes(args).items():
        layers = args.layers if n * k < (1 << 26) else 2  # the LM head: once per step
        row = result["shapes"][name] = measure(n, k, layers, device, args.sweep)
        gbs = n * k * 2 / row["gemv_us"] / 1e3
        print(f"{name:<12} {f'{n}x{k}':>13} {row['cublas_us']:9.2f} {row['gemv_us']:8.2f} "
              f"{row['cublas_us'] / row['gemv_us']:6.2f} {gbs:9.0f} {row['gemv_nopdl_us']:9.2f} "
              f"{row['gemv_pdl_us']:8.2f} "
              f"{row['best'][0]:>12} "
              f"{row['best'][1]:8.2f}", flush=True)  # fmt: skip
    bc.write_json(args.out, result, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
