"""Benchmark: decode speed of the continuous decoder against the memory-bandwidth bound.

Issues #17 (item 3: batch-1 decode >= 0.5 of the bound on the H200) and #15 (fp8 / int4 resident
experts decode faster than bf16: targets 1.3x / 1.6x at batch 1).

The Qwen3-MoE-shaped bench model (`bench/_common.py`, random weights, built on the device) with
`--kept` experts per layer, once per precision (bf16 experts through the `premoe_gemv` experts
implementation, fp8 128x128 blocks, int4 groups of 128: `quantize_resident`), decoded by
`premoe.serve.continuous.ContinuousDecoder` exactly as `premoe serve` does:

- `graphs`: the decode step as CUDA graph replays (`premoe.serve.graphs`, the serve default on
  CUDA), at every batch size in `--batches`;
- `eager`: the same step launched kernel by kernel, batch 1 (the previous serve path);
- `graphs_unfused` / `compiled_unfused`: as `graphs` / `compiled` without the step's fusions
  (sibling projections as one matmul, `premoe.serve.fusion`; routers' top-k as one kernel,
  `premoe.serve.topk`), run first in the same process for a side-by-side ratio.

Figures per precision: tokens/s per batch size; batch-1 tokens/s / bound, the bound being the
device bandwidth (a large device-to-device copy) / the bytes a batch-1 token reads (every weight
but the embedding table, one embedding row, top-k experts per layer at the precision's bytes);
greedy agreement of graphs with eager (same tokens at batch 1); graph capture seconds. With
`--profile`, the CUDA kernel time of a few batch-1 graph steps, by kernel. With `--meter B ...`,
the same step again with the dropped-mass meter `premoe serve` attaches by default (issue #18:
`RowMeter` + `SlotMiss`, full rows = the model's routers, measured against a 3/4 keep set) at
batch sizes B: tokens/s with it ÷ without (target >= 0.97). With `--sync`, every batch size
again with the decoder's pipeline off (each step read on the host before the next is launched).

    python3 bench/bench_decode.py --out bench/results/decode_h200.json          # H200: ~2 min
    python3 bench/bench_decode.py --layers 4 --precisions bf16 --batches 1 4    # quick check
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from typing import Any

import _common as bc
import torch
import torch._inductor.config as inductor_config

from premoe.arch.registry import arch_for_config
from premoe.demo.tasks import build_tokenizer
from premoe.load.miss import DroppedMass, FullRouterRows
from premoe.prune import KeepSets
from premoe.quant import gemv_experts, pdl
from premoe.quant.gemv_experts import register
from premoe.quant.resident import quantize_resident
from premoe.serve import attention, gemv_linear
from premoe.serve.continuous import ContinuousDecoder
from premoe.serve.decode import NullSink, SamplingParams
from premoe.serve.graphs import Regions
from premoe.serve.miss import RowMeter, SlotMiss

UNFUSED = "_unfused"
SDPA = "_sdpa"  # fused, but transformers' sdpa attention instead of premoe.serve.attention
CUBLAS = "_cublas"  # fused, but one-row linear layers through cuBLAS, not premoe.serve.gemv_linear
PREV = "_prev"  # fused as at the start of this stop: cuBLAS linears, 64-column attention blocks
FX = "_fx"  # fused, and the experts through the two fused GEMV kernels (gemv_experts.FUSE)
SPLIT = "_split"  # fused, the attention's programs target at --split-programs
SEPARATE = "_sepmerge"  # fused, split attention calls merged by a second kernel (not in-kernel)
PDL = "_pdl"  # fused, inductor's kernels launched with programmatic dependent launch (sm_90)
COMBO = "_combo"  # fused, combo kernels in one-row steps (Regions.COMBO_KERNELS; others: off)
NOGLU = "_noglu"  # fused, the experts' activation its own kernel (not gemv_experts.GLU_ON_LOAD)
NOPDL = "_nopdl"  # fused, premoe's own kernels launched without PDL (pdl.ENABLED off)
OWNPDL = "_ownpdl"  # fused, premoe's own kernels launched with PDL (pdl.ENABLED on)


def say(msg: str) -> None:
    print(msg, flush=True)


def bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    b = torch.empty_like(a)
    b.copy_(a)
    with bc.DeviceTimer(device) as t:
        for _ in range(10):
            b.copy_(a)
    del a, b
    return 2 * nbytes * 10 / t.seconds


def active_bytes(model: Any, qr: Any, top_k: int) -> dict[str, int]:
    """Bytes a batch-1 token reads: non-expert weights (one embedding row) + top-k experts."""
    dense = experts = 0
    n_layers = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            experts += p.numel() * p.element_size()
        elif "embed_tokens" in name:
            dense += p.shape[-1] * p.element_size()
        else:
            dense += p.numel() * p.element_size()
    if qr is not None:
        experts = qr.nbytes
    n_layers = sum(1 for n, _ in model.named_modules() if n.endswith("mlp.experts"))
    slots = model.config.num_experts
    routed = experts * top_k // slots  # per layer: top_k of `slots` experts
    return {"dense": dense, "routed": routed, "total": dense + routed, "layers": n_layers}


def decode(dec: ContinuousDecoder, batch: int, tokens: int, prompt_len: int, seed: int) -> float:
    """Tokens/s of the decode steps of `batch` rows admitted together (prefill not timed)."""
    rng = random.Random(seed)
    for _ in range(batch):
        prompt = [rng.randrange(10, 100) for _ in range(prompt_len)]
        dec.add(NullSink(), prompt, SamplingParams(max_tokens=tokens, ignore_eos=True))
    while any(s.prefilling for s in dec.active()):
        dec.step()
    rows = 0
    with bc.DeviceTimer(dec.device) as t:
        while dec.active():
            rows += dec.step().decode_rows
    return rows / t.seconds


def greedy_tokens(dec: ContinuousDecoder, tokens: int, prompt_len: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    prompt = [rng.randrange(10, 100) for _ in range(prompt_len)]
    got: list[int] = []
    seq = dec.add(NullSink(), prompt, SamplingParams(max_tokens=tokens, ignore_eos=True))
    while dec.active():
        dec.step()
        if seq.last is not None and len(got) < seq.generated:
            got.append(seq.last)
    return got


def metered(model: Any, dec: ContinuousDecoder, masses: list[DroppedMass]) -> RowMeter:
    """Attach the serve meter to `dec`: full rows = the model's routers [L, E, H], every row
    measured against a keep set of the first 3/4 of the experts (so the mass is not 0)."""
    arch = arch_for_config(model.config)
    layers = list(arch.moe_layer_ids(model.config))
    names = [n for n, _ in model.named_modules() if n.endswith("mlp.gate")]
    gates = [model.get_submodule(n).weight for n in names]  # [E, H] each
    rows = FullRouterRows(layers, torch.stack(gates), None)
    e = rows.weight.shape[1]
    keep = KeepSets.uniform(layers, range(3 * e // 4))
    meter = RowMeter(model, argparse.Namespace(arch=arch), {"p": keep}, rows=rows)
    meter.attach()
    dec.set_miss(SlotMiss(meter, dec.slots, on_mass=lambda seq, m: masses.append(m)))
    return meter


def profile_steps(dec: ContinuousDecoder, steps: int = 8) -> dict[str, Any]:
    """Kernel time of `steps` batch-1 steps: every kernel, and the totals per step."""
    seq = dec.add(NullSink(), [11] * 16, SamplingParams(max_tokens=steps + 4, ignore_eos=True))
    while seq.prefilling or seq.generated < 2:
        dec.step()
    sequence: list[dict[str, Any]] = []
    run = lambda: [dec.step() for _ in range(steps)]  # noqa: E731
    rows = bc.kernel_profile(run, steps, top=1000, sequence=sequence)
    while dec.active():
        dec.step()
    return {
        "kernels_per_step": sum(r["count"] for r in rows) / steps,
        "kernel_us_per_step": sum(r["us_per_step"] for r in rows),
        "kernels": rows,
        "last_step": sequence,
    }


def run_precision(args: argparse.Namespace, prec: str, device: torch.device, bw: float) -> dict:
    config = bc.qwen3_config(args, experts=args.kept)
    say(f"[{prec}] building the {args.kept}-expert model on {device}")
    model = bc.build_on_device(config, device, "bf16").eval()
    model.config._experts_implementation = register()
    qr = None
    if prec != "bf16":
        paths = [n for n, _ in model.named_modules() if n.endswith("mlp.experts")]
        qr = quantize_resident(model, paths, prec, block=(128, 128), group_size=128)
    act = active_bytes(model, qr, args.top_k)
    bound = bw / act["total"]
    tok = build_tokenizer(model_max_length=args.max_len)
    out: dict[str, Any] = {"active_bytes": act, "bound_tokens_per_s": bound, "modes": {}}
    slots = max([*args.batches, *args.meter])
    with torch.inference_mode():
        eager = ContinuousDecoder(model, tok, slots=1, max_len=args.max_len, graphs=False)
        ref = greedy_tokens(eager, args.check_tokens, args.prompt, seed=1)
        t_eager = decode(eager, 1, args.eager_tokens, args.prompt, seed=2)
        out["eager_b1_tokens_per_s"] = t_eager
        say(f"[{prec}] eager batch 1: {t_eager:.1f} tokens/s")
        del eager
        gc.collect()
        # unfused steps first: fusing the projections changes the model's modules for good
        wide, programs = attention.WIDE_COLUMNS, attention.PROGRAMS
        fuse_experts, glu_on_load = gemv_experts.FUSE, gemv_experts.GLU_ON_LOAD
        combo, own_pdl = Regions.COMBO_KERNELS, pdl.ENABLED
        for mode in sorted(args.modes, key=lambda m: not m.endswith(UNFUSED)):
            fuse = not mode.endswith(UNFUSED)
            attention.ENABLED = not mode.endswith(SDPA)
            attention.WIDE_COLUMNS = 0 if mode.endswith(PREV) else wide
            attention.PROGRAMS = args.split_programs if mode.endswith(SPLIT) else programs
            attention.MERGE_IN_KERNEL = not mode.endswith(SEPARATE)
            Regions.COMBO_KERNELS = mode.endswith(COMBO)
            if hasattr(inductor_config.triton, "enable_pdl"):  # torch >= 2.10
                inductor_config.triton.enable_pdl = mode.endswith(PDL)
            elif mode.endswith(PDL):
                say(f"[{prec}] {mode}: this torch's inductor has no PDL setting; skipped")
                continue
            gemv_linear.ENABLED = not mode.endswith((PREV, CUBLAS))
            gemv_experts.FUSE = mode.endswith(FX)
            gemv_experts.GLU_ON_LOAD = not mode.endswith(NOGLU)
            pdl.ENABLED = mode.endswith(OWNPDL) or (own_pdl and not mode.endswith(NOPDL))
            for q in qr.layers.values() if qr is not None else ():
                q.fuse = gemv_experts.FUSE
            torch._dynamo.reset()  # compiled layers do not guard on every patched function
            dec = ContinuousDecoder(
                model,
                tok,
                slots=slots,
                max_len=args.max_len,
                graphs=True,
                compile=mode.startswith("compiled"),
                fuse=fuse,
            )
            assert dec.graphs is not None
            torch._dynamo.utils.counters.clear()
            t0 = time.perf_counter()
            dec.graphs.warmup(batch=args.batches, kv=[args.prompt + args.tokens + 1])
            fig: dict[str, Any] = {"capture_s": time.perf_counter() - t0, "batches": {}}
            fig["dynamo_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            breaks = dict(torch._dynamo.utils.counters["graph_break"])  # reason -> count
            fig["graph_breaks"] = breaks
            say(f"[{prec}] {mode}: warm-up {fig['capture_s']:.1f} s, {fig['dynamo_graphs']} "
                f"graphs compiled, {sum(breaks.values())} graph breaks")  # fmt: skip
            for reason, count in sorted(breaks.items(), key=lambda kv: -kv[1])[:5]:
                say(f"[{prec}]   break x{count}: {reason[:300]}")
            got = greedy_tokens(dec, args.check_tokens, args.prompt, seed=1)
            same = sum(a == b for a, b in zip(got, ref, strict=False)) / max(len(ref), 1)
            fig["greedy_agreement_vs_eager"] = same
            for b in args.batches:
                tps = decode(dec, b, args.tokens, args.prompt, seed=3 + b)
                fig["batches"][b] = tps
                say(f"[{prec}] {mode} batch {b}: {tps:.1f} tokens/s")
                if args.sync:  # the same graphs, every step read before the next
                    dec.pipeline = False
                    sync = decode(dec, b, args.tokens, args.prompt, seed=3 + b)
                    dec.pipeline = True
                    fig.setdefault("sync_batches", {})[b] = sync
                    say(f"[{prec}] {mode} batch {b} unpipelined: {sync:.1f} tokens/s")
            b1 = fig["batches"].get(1)
            fig["b1_over_bound"] = b1 / bound if b1 else None
            if args.meter:
                masses: list[DroppedMass] = []
                mdec = ContinuousDecoder(
                    model, tok, slots=slots, max_len=args.max_len, graphs=True,
                    compile=mode.startswith("compiled"), fuse=fuse,
                )  # fmt: skip
                meter = metered(model, mdec, masses)
                assert mdec.graphs is not None
                mdec.graphs.warmup(batch=args.meter, kv=[args.prompt + args.tokens + 1])
                fig["meter"] = {}
                for b in args.meter:
                    on = decode(mdec, b, args.tokens, args.prompt, seed=3 + b)
                    off = decode(dec, b, args.tokens, args.prompt, seed=3 + b)  # same moment
                    fig["meter"][b] = {"on": on, "off": off, "ratio": on / off}
                    say(f"[{prec}] {mode} batch {b}: meter on {on:.1f} / off {off:.1f} tokens/s")
                fig["meter_mean_mass"] = sum(m.mean for m in masses) / max(1, len(masses))
                meter.detach()
                del mdec
            if args.profile:
                fig["profile_b1"] = profile_steps(dec)
            out["modes"][mode] = fig
        attention.ENABLED = gemv_linear.ENABLED = attention.MERGE_IN_KERNEL = True
        Regions.COMBO_KERNELS, pdl.ENABLED = combo, own_pdl
        if hasattr(inductor_config.triton, "enable_pdl"):
            inductor_config.triton.enable_pdl = False
        attention.WIDE_COLUMNS, attention.PROGRAMS = wide, programs
        gemv_experts.FUSE, gemv_experts.GLU_ON_LOAD = fuse_experts, glu_on_load
    del model, qr, dec
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    bc.add_model_args(p)
    p.add_argument("--kept", type=int, default=32, help="experts resident per layer")
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp8", "int4"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--tokens", type=int, default=128, help="decode tokens per row")
    p.add_argument("--eager-tokens", type=int, default=16, help="tokens of the eager batch-1 run")
    p.add_argument("--check-tokens", type=int, default=16, help="tokens compared graphs/eager")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--profile", action="store_true", help="kernel times of batch-1 steps")
    p.add_argument("--profile-top", type=int, default=15, help="kernels printed per profile")
    p.add_argument(
        "--profile-sequence", type=int, default=40, help="kernels of one step printed in order"
    )
    p.add_argument("--meter", type=int, nargs="*", default=[], help="batch sizes: meter on vs off")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["graphs", "compiled"],
        choices=[
            "graphs",
            "compiled",
            f"graphs{UNFUSED}",
            f"compiled{UNFUSED}",
            f"compiled{SDPA}",
            f"compiled{CUBLAS}",
            f"compiled{PREV}",
            f"compiled{FX}",
            f"compiled{SPLIT}",
            f"compiled{SEPARATE}",
            f"compiled{PDL}",
            f"compiled{COMBO}",
            f"compiled{NOGLU}",
            f"compiled{NOPDL}",
            f"compiled{OWNPDL}",
        ],  # fmt: skip
        help="graphs: CUDA graphs of eager steps; compiled: of torch.compile'd steps; "
        f"{UNFUSED}: without the serve step's fusions (projections, router top-k, one-query "
        f"attention, one-row GEMVs); {SDPA}: fused but with transformers' sdpa attention; "
        f"{CUBLAS}: fused but the one-row linear layers through cuBLAS; {PREV}: as at the start "
        "of this stop (cuBLAS linears, 64-column attention blocks); "
        f"{FX}: fused, and the experts' two fused GEMV kernels (gemv_experts.FUSE; the other "
        f"modes run them unfused); {SPLIT}: fused, the attention's columns "
        "split to reach --split-programs programs (premoe.serve.attention.PROGRAMS; default 0: "
        f"by length alone); {SEPARATE}: fused, split attention calls merged by a second kernel "
        f"(attention.MERGE_IN_KERNEL off); {PDL}: fused, inductor's kernels launched with "
        f"programmatic dependent launch (torch._inductor.config.triton.enable_pdl); {COMBO}: "
        f"fused, with inductor's combo kernels in one-row steps (graphs.Regions.COMBO_KERNELS, "
        f"as the server runs; the other modes run without); {NOGLU}: fused, "
        f"the experts' activation as its own kernel (gemv_experts.GLU_ON_LOAD off); {NOPDL} / "
        f"{OWNPDL}: fused, premoe's kernels (GEMVs, attention, top-k) launched without / with "
        "programmatic dependent launch (premoe.quant.pdl.ENABLED; the other modes: its default)",
    )
    p.add_argument("--split-programs", type=int, default=0, help="attention programs (_split)")
    p.add_argument(
        "--sync",
        action="store_true",
        help="each batch again unpipelined (every step read before the next is launched)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = bc.cuda_device("bench_decode")
    if device is None:
        return 2
    bw = bandwidth(device)
    say(f"device bandwidth {bw / 1e9:.0f} GB/s")
    result: dict[str, Any] = {"bandwidth_bytes_per_s": bw, "args": vars(args), "precisions": {}}
    for prec in args.precisions:
        result["precisions"][prec] = run_precision(args, prec, device, bw)
    rows = []
    for prec, r in result["precisions"].items():
        for mode, fig in r["modes"].items():
            base = result["precisions"].get("bf16", {}).get("modes", {}).get(mode, {})
            b1, base_b1 = fig["batches"].get(1), base.get("batches", {}).get(1)
            unfused_b1 = r["modes"].get(mode + UNFUSED, {}).get("batches", {}).get(1)
            rows.append(
                [
                    prec,
                    mode,
                    f"{r['active_bytes']['total'] / 1e9:.2f}",
                    f"{r['bound_tokens_per_s']:.0f}",
                    f"{r['eager_b1_tokens_per_s']:.1f}",
                    *[f"{fig['batches'][b]:.0f}" for b in args.batches],
                    f"{fig['b1_over_bound']:.3f}" if fig["b1_over_bound"] else "-",
                    f"{b1 / base_b1:.3f}" if (b1 and base_b1) else "-",
                    f"{b1 / unfused_b1:.3f}" if (b1 and unfused_b1) else "-",
                    f"{fig['greedy_agreement_vs_eager']:.2f}",
                    f"{fig['capture_s']:.1f}",
                ]
            )
            for b, sync in fig.get("sync_batches", {}).items():
                ratio = fig["batches"][b] / sync
                say(f"  [{prec}] {mode} b{b}: pipelined / unpipelined {ratio:.3f} ({sync:.1f})")
            for b, m in fig.get("meter", {}).items():
                say(f"  [{prec}] {mode} meter on/off at batch {b}: {m['ratio']:.3f}")
        for mode, fig in r["modes"].items():
            prof = fig.get("profile_b1")
            if not prof:
                continue
            say(f"  [{prec}] {mode}: {prof['kernels_per_step']:.0f} kernels, "
                f"{prof['kernel_us_per_step']:.0f} us of kernels per batch-1 step")  # fmt: skip
            for k in prof["kernels"][: args.profile_top]:
                say(f"  [{prec}] {k['us_per_step']:8.1f} us/step  x{k['count']:<5d} {k['kernel']}")
            seq = prof["last_step"]
            say(f"  [{prec}] {mode}: the last step, kernel by kernel (us, gap before it):")
            for k in seq[: args.profile_sequence]:
                say(f"  [{prec}]   {k['us']:6.2f} {k['gap_us']:5.2f}  {k['kernel']}")
            tail = seq[args.profile_sequence :]
            if tail:
                say(f"  [{prec}]   ... {len(tail)} more: {sum(k['us'] for k in tail):.1f} us, "
                    f"gaps {sum(k['gap_us'] for k in tail):.1f} us")  # fmt: skip
    header = ["precision", "step", "GB/token", "bound tok/s", "eager b1"]
    header += [f"b{b} tok/s" for b in args.batches]
    header += ["b1 / bound", "b1 / bf16 b1", "b1 / unfused b1", "greedy = eager", "capture s"]
    bc.print_table(header, rows)
    bc.write_json(args.out, result, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
