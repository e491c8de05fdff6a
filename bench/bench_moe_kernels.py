"""Decode experts path per MoE layer: the unfused GEMV path against the two fused kernels.

For a Qwen3-30B-A3B-shaped layer (H = 2048, I = 768, k = 8) with E = 81 resident experts in bf16,
and S = 8 and 64 routed pairs (T = 1 and 8 tokens), times `gemv_experts.gemv_forward` with the
unfused ops (up GEMV, cast, activation, down GEMV, cast, routing weight, sum over k: about 7
kernels) and with the fused ones (`kernels.moe_gemv_silu`, `kernels.moe_gemv_wsum`: 2 kernels).
Each is captured in one CUDA graph of `--calls` calls, every call with its own routing (so the
weights come from HBM, not L2), and the graph is replayed `--replays` times: µs per call, the
weight bytes of the distinct routed experts read per second, and the max abs difference between
the two paths (which differ by the unfused path's intermediate bf16 roundings).

``--formats fp8 int4`` adds quantized resident slots (`premoe.quant.resident`, fp8 128x128
blocks, int4 groups of 128); ``--sweep`` also times each fused kernel alone over a grid of
(BLOCK_N, BLOCK_K, num_warps), to fill `kernels.FUSED_SHAPES`.

    python3 bench/bench_moe_kernels.py --out bench/results/moe_kernels_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from typing import Any

import _common as bc
import torch
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from premoe.quant import kernels
from premoe.quant.gemv_experts import gemv_forward, plain_gemvs
from premoe.quant.resident import quantize_resident

NAMES = ("gate_up_proj", "down_proj")
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden [T, H], idx [T, k], w [T, k]
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
SWEEP = {"silu": ((4, 8, 16), (128, 256, 512), (2, 4, 8)),
         "wsum": ((4, 8, 16, 32), (128, 256), (2, 4, 8))}  # fmt: skip


def experts_module(args: argparse.Namespace, device: torch.device) -> Any:
    """A Qwen3-MoE experts module with random bf16 weights on the device."""
    cfg = Qwen3MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.intermediate,
                         num_experts=args.experts, num_experts_per_tok=args.top_k)  # fmt: skip
    with torch.device("meta"):
        mod = Qwen3MoeExperts(cfg)
    e, h, i = args.experts, args.hidden, args.intermediate
    for name, shape in (("gate_up_proj", (e, 2 * i, h)), ("down_proj", (e, h, i))):
        w = torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02
        setattr(mod, name, torch.nn.Parameter(w, requires_grad=False))
    return mod


def forward_of(fmt: str, mod: Any) -> tuple[Forward, int]:
    """(forward(hidden, idx, w, fuse), weight bytes per expert) for `fmt` dense | fp8 | int4."""
    if fmt == "dense":
        up, down, fused = plain_gemvs(mod)
        per_expert = sum(getattr(mod, n)[0].nbytes for n in NAMES)

        def forward(h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, fuse: bool) -> Any:
            return gemv_forward(mod, h, idx, w, up, down, NAMES, h.dtype, fused if fuse else None)

        return forward, per_expert
    root = torch.nn.Module()
    root.experts = mod
    opt = {"block": (128, 128)} if fmt == "fp8" else {"group_size": 128}
    q = quantize_resident(root, ["experts"], fmt, **opt).layers["experts"]
    q.gemv_rows = 10**6

    def forward_q(h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, fuse: bool) -> Any:
        q.fuse = fuse
        return q.forward(h, idx, w)

    return forward_q, q.slot_bytes


def routes(args: argparse.Namespace, t: int, device: torch.device, seed: int) -> Inputs:
    gen = torch.Generator(device).manual_seed(seed)
    hidden = torch.randn(t, args.hidden, generator=gen, device=device, dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(args.experts, generator=gen, device=device)[: args.top_k]
                       for _ in range(t)])  # fmt: skip
    w = torch.rand(t, args.top_k, generator=gen, device=device).softmax(-1)
    return hidden, idx, w


def time_graph(fn: Callable[[Any], Any], inputs: list[Any], device: torch.device,
               replays: int) -> float:  # fmt: skip
    """Seconds per call: one call per input captured in one CUDA graph, replayed `replays`
    times (as serve's decode step runs it: no launch overhead)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for inp in inputs[:3]:
            fn(inp)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for inp in inputs:
            fn(inp)
    graph.replay()
    with bc.DeviceTimer(device) as t:
        for _ in range(replays):
            graph.replay()
    return t.seconds / (len(inputs) * replays)


def sweep(fmt: str, forward: Forward, inputs: list[Inputs], device: torch.device,
          replays: int) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Each fused kernel alone over the SWEEP grid: {variant: timings, fastest first}."""
    saved = {v: dict(t) for v, t in kernels.FUSED_SHAPES.items()}
    calls: dict[str, list[tuple[Any, Any]]] = {"silu": [], "wsum": []}
    silu, wsum = kernels.moe_gemv_silu, kernels.moe_gemv_wsum

    def grab(name: str, fn: Any) -> Any:  # record each fused call's arguments
        def wrapped(*a: Any, **kw: Any) -> Any:
            calls[name].append((a, kw))
            return fn(*a, **kw)

        return wrapped

    kernels.moe_gemv_silu, kernels.moe_gemv_wsum = grab("silu", silu), grab("wsum", wsum)
    try:
        for inp in inputs:
            forward(*inp, True)
    finally:
        kernels.moe_gemv_silu, kernels.moe_gemv_wsum = silu, wsum
    out: dict[str, list[dict[str, Any]]] = {}
    for variant, fn in (("silu", silu), ("wsum", wsum)):
        recorded = calls[variant]
        timings = []
        for shape in itertools.product(*SWEEP[variant]):
            kernels.FUSED_SHAPES[variant][fmt] = ((kernels.ANY, shape),)
            try:
                sec = time_graph(lambda i, fn=fn: fn(*i[0], **i[1]), recorded, device, replays)
            except Exception as exc:  # a shape the kernel cannot take
                print(f"{fmt} {variant} {shape}: {type(exc).__name__}", file=sys.stderr)
                continue
            timings.append({"shape": list(shape), "us": sec * 1e6})
        kernels.FUSED_SHAPES[variant][fmt] = saved[variant][fmt]
        out[variant] = sorted(timings, key=lambda r: r["us"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--experts", type=int, default=81)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    p.add_argument("--formats", nargs="+", default=["dense"], choices=["dense", "fp8", "int4"])
    p.add_argument("--calls", type=int, default=20, help="calls (routings) per CUDA graph")
    p.add_argument("--replays", type=int, default=10)
    p.add_argument("--sweep", action="store_true", help="also time fused launch shapes")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    if not kernels.prepare(device):
        print("needs CUDA and triton", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"args": vars(args), "runs": []}
    rows, failed = [], False
    for fmt in args.formats:
        forward, per_expert = forward_of(fmt, experts_module(args, device))
        for t in args.tokens:
            inputs = [routes(args, t, device, seed=1000 * t + c) for c in range(args.calls)]
            distinct = sum(inp[1].unique().numel() for inp in inputs) / len(inputs)
            nbytes = distinct * per_expert  # weight bytes one call reads
            with torch.no_grad():
                a, b = (forward(*inputs[0], fuse) for fuse in (False, True))
                diff = float((a.float() - b.float()).abs().max())
                rel = diff / float(a.float().abs().max())
                us = {}
                for fuse in (False, True):

                    def call(i: Inputs, f: bool = fuse, fwd: Forward = forward) -> Any:
                        return fwd(*i, f)

                    us[fuse] = 1e6 * time_graph(call, inputs, device, args.replays)
                run = {"format": fmt, "tokens": t, "pairs": t * args.top_k,
                       "distinct_experts": distinct, "weight_bytes": nbytes,
                       "unfused_us": us[False], "fused_us": us[True],
                       "unfused_gb_per_s": nbytes / us[False] / 1e3,
                       "fused_gb_per_s": nbytes / us[True] / 1e3,
                       "max_abs_diff": diff, "max_rel_diff": rel}  # fmt: skip
                if args.sweep:
                    run["sweep"] = sweep(fmt, forward, inputs, device, args.replays)
            failed |= rel > 2e-2
            result["runs"].append(run)
            rows.append([fmt, t, t * args.top_k, f"{distinct:.1f}", f"{us[False]:.1f}",
                         f"{run['unfused_gb_per_s']:.0f}", f"{us[True]:.1f}",
                         f"{run['fused_gb_per_s']:.0f}", f"{us[False] / us[True]:.2f}",
                         f"{diff:.2e}"])  # fmt: skip
    head = ["format", "T", "S", "experts", "unfused us", "GB/s", "fused us", "GB/s", "speedup",
            "max |diff|"]  # fmt: skip
    bc.print_table(head, rows, title="experts forward per layer, inside a CUDA graph")
    if args.sweep:
        for run in result["runs"]:
            for variant, timings in run["sweep"].items():
                best = ", ".join(f"{'x'.join(map(str, r['shape']))} {r['us']:.1f}"
                                 for r in timings[:4])  # fmt: skip
                print(f"sweep {run['format']} T={run['tokens']} {variant}: {best} us")
    bc.write_json(args.out, result, device=device)
    if failed:
        print("fused and unfused paths differ by more than 2e-2 of the output", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
