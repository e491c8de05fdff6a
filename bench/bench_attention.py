"""Benchmark: the decode step's one-query attention kernel (`premoe.serve.attention`) against
how many programs a call aims for, issue #17.

At batch 1 the bench model's attention is 4 KV heads, so a call with unsplit columns runs 4
programs on 4 of the device's SMs. For every (batch, KV columns) of `--batches` x `--columns`,
times one call on each of `--layers` distinct caches (strided views of a slot cache, as serve's
are) captured in one CUDA graph, with `attention.PROGRAMS` at each of `--programs` (0: split by
`SPLIT_COLUMNS` alone, the kernel's behaviour before this setting) and `MIN_SPLIT_COLUMNS` at
each of `--min-columns`, split calls merged in the kernel or by the merge kernel (`--merge`,
`attention.MERGE_IN_KERNEL`); and transformers' sdpa path (K and V repeated per query head, then
`F.scaled_dot_product_attention`) for reference. Checks every setting against sdpa's output.
Prints µs per call, writes JSON.

    python3 bench/bench_attention.py --out bench/results/attention_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Any

import _common as bc
import torch
import torch.nn.functional as F

from premoe.serve import attention


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # transformers' repeat_kv
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask).transpose(1, 2)


def measure(args: argparse.Namespace, b: int, n: int, device: torch.device) -> dict[str, Any]:
    """µs per call of sdpa and of the kernel at every (programs, min columns) setting."""
    hq, hk, d = args.heads, bc.kv_heads(args), args.head_dim
    caches = [  # [2, slots, Hk, max_len, D] per layer; the call reads the first b rows, n columns
        torch.randn(2, b + 1, hk, n + 7, d, dtype=torch.bfloat16, device=device)
        for _ in range(args.layers)
    ]
    kv = [(c[0, :b, :, :n], c[1, :b, :, :n]) for c in caches]
    q = torch.randn(b, 1, hq, d, dtype=torch.bfloat16, device=device).transpose(1, 2)
    pos = torch.randint(n // 2, n, (b, 1), device=device)
    mask = torch.where(torch.arange(n, device=device)[None, :] <= pos, 0.0, -1e30)
    mask = mask.to(torch.bfloat16)[:, None, None, :]  # [B, 1, 1, K]
    scale = d**-0.5
    want = sdpa(q, *kv[0], mask).float()

    def kernel() -> None:
        for k, v in kv:
            attention.decode_attention(q, k, v, mask, scale)

    row: dict[str, Any] = {"b": b, "n_kv": n, "settings": {}}
    row["sdpa_us"] = 1e6 * bc.graph_seconds(
        lambda: [sdpa(q, k, v, mask) for k, v in kv], device, args.layers
    )
    saved = attention.PROGRAMS, attention.MIN_SPLIT_COLUMNS, attention.MERGE_IN_KERNEL
    try:
        for programs, cols, merge in itertools.product(args.programs, args.min_columns, args.merge):
            if programs == 0 and cols != args.min_columns[0]:
                continue  # min columns only matter where PROGRAMS splits
            splits, per, block = attention._blocks(n, d, 2, b * hk)
            if splits == 1 and merge != args.merge[0]:
                continue  # nothing to merge
            attention.PROGRAMS, attention.MIN_SPLIT_COLUMNS = programs, cols
            attention.MERGE_IN_KERNEL = merge == "in-kernel"
            got = attention.decode_attention(q, *kv[0], mask, scale).float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            us = bc.graph_seconds(kernel, device, args.layers) * 1e6
            key = f"{programs}/{cols}" + ("" if splits == 1 else f"/{merge}")
            row["settings"][key] = {
                "us": us, "splits": splits, "per": per, "block": block, "max_rel_err": err,
            }  # fmt: skip
    finally:
        attention.PROGRAMS, attention.MIN_SPLIT_COLUMNS, attention.MERGE_IN_KERNEL = saved
    row["best"] = min(row["settings"].items(), key=lambda kv: kv[1]["us"])[0]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    bc.add_model_args(p)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--columns", type=int, nargs="+", default=[161, 256, 513, 1024, 4096])
    p.add_argument("--programs", type=int, nargs="+", default=[0, 16, 32, 64, 132])
    p.add_argument("--min-columns", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument(
        "--merge",
        nargs="+",
        default=["in-kernel", "separate"],
        choices=["in-kernel", "separate"],
        help="how split calls merge (attention.MERGE_IN_KERNEL: the last program, or a kernel)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = bc.cuda_device("bench_attention")
    if device is None:
        return 2
    attention.prepare(device)
    result: dict[str, Any] = {
        "args": vars(args),
        "defaults": {
            "programs": attention.PROGRAMS,
            "min_columns": attention.MIN_SPLIT_COLUMNS,
            "merge_in_kernel": attention.MERGE_IN_KERNEL,
        },  # fmt: skip
        "rows": [],
    }
    for b, n in itertools.product(args.batches, args.columns):
        row = measure(args, b, n, device)
        result["rows"].append(row)
        cells = "  ".join(f"{k}:{s['us']:.2f}({s['splits']})" for k, s in row["settings"].items())
        worst = max(s["max_rel_err"] for s in row["settings"].values())
        print(f"b {b:3d} kv {n:5d}  sdpa {row['sdpa_us']:6.2f}  {cells}  best {row['best']}  "
              f"err {worst:.1e}", flush=True)  # fmt: skip
    bc.write_json(args.out, result, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
