"""Benchmark: quantized experts as a memory lever (issue 15).

Figures:

(a) accuracy at equal memory, on the bundled demo model (`premoe/demo/model`, store
    `patterns/demo`, greedy exact match from `premoe.eval`): for every (keep, precision) with
    precision in source / fp8 / int4, the accuracy per task and the resident bytes; then, for the
    budgets of the source model at each keep count, the best (keep, precision) within it;
(b) on the device, a Qwen3-MoE-shaped random model (default ~15 B parameters, `bench/_common.py`)
    holding 32 experts per layer, per precision (bf16, fp8, int4), each built afresh:
    - resident bytes (allocated device memory) / ideal bytes (target <= 1.02), where ideal is
      every non-expert tensor plus the quantized experts' exact format bytes (weights and their
      scales, no padding);
    - batch-1 greedy decode tokens/s (static cache, torch.compile reduce-overhead by default),
      quantized / bf16 in the same run (targets: fp8 >= 1.3, int4 >= 1.6);
    - swap bytes/s writing every slot from pinned host entries, in place / the pinned
      host-to-device bandwidth of one plain copy (target >= 0.9);
    - the kernel's decode logits against the dequantizing path (max relative difference).

    python bench/bench_quant.py --device cuda --out bench/results/quant_h200.json
    python bench/bench_quant.py --smoke --out /tmp/quant_smoke.json       # CPU, about a minute
    python bench/bench_quant.py --device cuda --skip-demo --layers 8      # smaller, GPU only
"""

from __future__ import annotations

import argparse
import gc
import inspect
import logging
import sys
import time
from typing import Any

import _common as bc
import torch

from premoe.quant.resident import QuantizedResident, quantize_resident

log = logging.getLogger("bench_quant")

PRECISIONS = ("source", "fp8", "int4")
DEMO_TASKS = ("add", "reverse", "sort", "count", "close")


def say(msg: str) -> None:
    print(msg, flush=True)


def human(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


# ---- (a) accuracy at equal memory on the demo model --------------------------------------------


def experts_paths(model: Any) -> list[str]:
    """Module paths of the fused experts modules (transformers' experts interface)."""
    return [n for n, m in model.named_modules() if hasattr(m, "gate_up_proj") and n]


def demo_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from premoe.demo import MODEL_DIR
    from premoe.eval.harness import accuracy, demo_eval_set
    from premoe.eval.runner import ModelShape, method_keep
    from premoe.load import load_pruned
    from premoe.patterns.store import PatternStore
    from premoe.plan import SizeModel
    from premoe.source import load_tokenizer, resolve_model

    src = resolve_model(MODEL_DIR)
    store = PatternStore.load(bc.ROOT / "patterns" / "demo")
    tokenizer = load_tokenizer(MODEL_DIR)
    sizes = SizeModel.from_source(src)
    shape = ModelShape(
        layers=tuple(src.moe_layers),
        num_experts=src.num_experts,
        top_k=src.top_k,
        groups=src.arch.groups(src.config),
    )
    tasks = [t for t in args.tasks if t in store.task_names]
    evalsets = {t: demo_eval_set(t, args.eval_n) for t in tasks}
    block, group = (args.demo_block, args.demo_block), args.demo_group
    rows = []
    for keep in args.keeps:
        for prec in PRECISIONS:
            accs = {}
            for task in tasks:
                ks = method_keep(store, task, "tcess", keep, shape)
                model = load_pruned(src, ks, dtype=torch.float32)
                if prec != "source":
                    quantize_resident(
                        model, experts_paths(model), prec, block=block, group_size=group
                    )
                accs[task] = accuracy(model, tokenizer, evalsets[task]).value
                del model
            nbytes = sizes.non_expert_bytes(keep) + keep * sizes.expert_per_k_at(
                prec if prec != "source" else "source", block=block, group_size=group
            )
            mean = sum(accs.values()) / len(accs)
            rows.append(
                {
                    "keep": keep,
                    "precision": prec,
                    "resident_bytes": nbytes,
                    "accuracy": accs,
                    "mean_accuracy": mean,
                }
            )
            say(f"  keep {keep:3d} {prec:6s}: mean accuracy {mean:.3f} ({nbytes / 2**20:.2f} MiB)")
    # equal memory: for the source model's size at each keep, the best row that fits
    equal = []
    for keep in args.keeps:
        budget = sizes.resident(keep)
        fitting = [r for r in rows if r["resident_bytes"] <= budget]
        # the most accurate; on a tie the higher precision (quantization is a cost of its own),
        # then more experts
        best = max(
            fitting,
            key=lambda r: (r["mean_accuracy"], -PRECISIONS.index(r["precision"]), r["keep"]),
        )
        source = next(r for r in rows if r["keep"] == keep and r["precision"] == "source")
        equal.append(
            {
                "budget_bytes": budget,
                "source_keep": keep,
                "source_accuracy": source["mean_accuracy"],
                "best": best,
            }
        )
    src.close()
    return {
        "tasks": tasks,
        "eval_n": args.eval_n,
        "block": list(block),
        "group_size": group,
        "rows": rows,
        "equal_memory": equal,
    }


# ---- (b) device figures ------------------------------------------------------------------------


def pinned_bandwidth(device: torch.device, nbytes: int, reps: int = 5) -> float:
    """Bytes/s of a plain host->device copy from pinned memory (CPU: a plain memcpy)."""
    pin = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = 0.0
    for _ in range(reps):
        with bc.DeviceTimer(device) as t:
            dst.copy_(src, non_blocking=pin)
        best = max(best, nbytes / t.seconds)
    del src, dst
    return best


def resident_bytes(model: Any, device: torch.device) -> int:
    """Allocated device bytes (CUDA, after freeing caches); CPU: unique tensor storage bytes."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        return int(torch.cuda.memory_allocated(device))
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def ideal_bytes(model: Any, qr: QuantizedResident | None) -> int:
    """Every parameter and buffer except the quantized storages, plus the quantized fields'
    exact bytes (no alignment padding)."""
    storages = set()
    exact = 0
    if qr is not None:
        for q in qr.layers.values():
            storages.add(q.storage.data_ptr())
            exact += q.num_experts * sum(p.weight.nbytes + p.scale.nbytes for p in q.projs.values())
    dense = sum(
        t.numel() * t.element_size()
        for t in [*model.parameters(), *model.buffers()]
        if t.data_ptr() not in storages
    )
    return dense + exact


def decode_tokens_per_s(
    model: Any, device: torch.device, *, steps: int, warmup: int, compile_mode: str
) -> dict[str, Any]:
    """Batch-1 greedy decode, one token per step through a static cache (as premoe serve's
    decoder does): tokens/s over `steps` steps after `warmup` (compilation, graph capture)."""
    from transformers import StaticCache

    max_len = warmup + steps + 2
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    dtype = next(model.parameters()).dtype
    min_value = torch.finfo(dtype).min
    valid = torch.zeros(1, max_len, dtype=torch.bool, device=device)
    # the cache keyword: `cache` in newer transformers, `past_key_values` before
    params = inspect.signature(model.forward).parameters
    kw = "cache" if "cache" in params else "past_key_values"

    def step(ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=dtype, device=valid.device)
        mask = torch.where(valid, zero, min_value)[:, None, None, :]  # [1, 1, 1, L]
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache}
        )
        return out.logits[:, -1, :].argmax(-1, keepdim=True)  # [1, 1]

    fn = step
    if compile_mode != "none":
        fn = torch.compile(step, mode=compile_mode, fullgraph=False, dynamic=False)
    tok = torch.tensor([[11]], device=device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for pos in range(warmup):
            valid[:, pos] = True
            tok = fn(tok, torch.tensor([[pos]], device=device), valid).clone()
        warm_s = time.perf_counter() - t0
        with bc.DeviceTimer(device) as t:
            for pos in range(warmup, warmup + steps):
                valid[:, pos] = True
                tok = fn(tok, torch.tensor([[pos]], device=device), valid).clone()
    return {
        "tokens_per_s": steps / t.seconds,
        "steps": steps,
        "warmup_s": warm_s,
        "compile": compile_mode,
    }


def kernel_check(model: Any, qr: QuantizedResident, device: torch.device) -> float | None:
    """Max relative difference of one decode-sized forward: kernel path vs dequantizing path."""
    if not any(q.use_kernel for q in qr.layers.values()):
        return None
    ids = torch.tensor([[11, 12, 13, 14]], device=device)
    with torch.inference_mode():
        a = model(input_ids=ids, use_cache=False).logits.float()
        saved = {p: q.gemv_rows for p, q in qr.layers.items()}
        for q in qr.layers.values():
            q.gemv_rows = 0
        b = model(input_ids=ids, use_cache=False).logits.float()
        for p, q in qr.layers.items():
            q.gemv_rows = saved[p]
    return bc.max_rel_diff(b, a)


def swap_figures(qr: QuantizedResident, device: torch.device, reps: int = 3) -> dict[str, Any]:
    """Write every slot of every layer from pinned host entries (in place); bytes/s."""
    from premoe.quant.codecs import dequantize

    first = next(iter(qr.layers.values()))
    n = first.num_experts
    pin = device.type == "cuda"
    entries = [first.read_slot(s) for s in range(n)]
    entries = [e.pin_memory() if pin else e for e in entries]
    ptrs = {p: q.storage.data_ptr() for p, q in qr.layers.items()}
    total = sum(q.slot_bytes * q.num_experts for q in qr.layers.values())
    best = 0.0
    for r in range(reps):
        with bc.DeviceTimer(device) as t:
            for q in qr.layers.values():
                for slot in range(q.num_experts):
                    q.write_slot(slot, entries[(slot + 1 + r) % n], non_blocking=pin)
        best = max(best, total / t.seconds)
    # the last write is visible and exact; storage never moved
    q = first
    entry = entries[(0 + 1 + reps - 1) % n]
    parts = q.parts_of_entry(entry.cpu())
    ok = all(
        torch.equal(
            q.dense_slot(name, 0).cpu(),
            (lambda w: w.t().contiguous() if q.transposed else w)(
                dequantize(q.fmt, parts[name], q.qconfig(), dtype=q.dtype)
            ),
        )
        for name in q.projs
    )
    same = ptrs == {p: q.storage.data_ptr() for p, q in qr.layers.items()}
    bw = pinned_bandwidth(device, min(total, 2 << 30))
    return {
        "bytes": total,
        "bytes_per_second": best,
        "pinned_bytes_per_second": bw,
        "ratio_to_pinned": best / bw if bw else None,
        "slot_exact": ok,
        "in_place": same,
    }


def device_figures(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    config = bc.qwen3_config(args, experts=args.kept)
    block, group = (args.block, args.block), args.group_size
    out: dict[str, Any] = {
        "shape": {**bc.model_shape(args), "experts": args.kept},
        "block": list(block),
        "group_size": group,
        "precisions": {},
    }
    for prec in ("bf16", "fp8", "int4"):
        say(f"[{prec}] building the {args.kept}-expert model on {device}")
        model = bc.build_on_device(config, device, "bf16")
        if args.bf16_impl and prec == "bf16":
            model.config._experts_implementation = args.bf16_impl
        qr = None
        t0 = time.perf_counter()
        if prec != "bf16":
            qr = quantize_resident(
                model,
                experts_paths(model),
                prec,
                block=block,
                group_size=group,
                gemv_rows=args.gemv_rows,
            )
        quant_s = time.perf_counter() - t0
        res = resident_bytes(model, device)
        ideal = ideal_bytes(model, qr)
        fig: dict[str, Any] = {
            "resident_bytes": res,
            "ideal_bytes": ideal,
            "resident_over_ideal": res / ideal,
            "quantize_s": quant_s,
        }
        say(f"[{prec}] resident {human(res)}, ideal {human(ideal)} ({res / ideal:.4f})")
        if qr is not None:
            fig["kernel_vs_dequant_max_rel"] = kernel_check(model, qr, device)
        try:
            fig["decode"] = decode_tokens_per_s(
                model,
                device,
                steps=args.decode_tokens,
                warmup=args.warmup,
                compile_mode=args.compile,
            )
        except Exception as exc:  # a compile failure is a figure too; fall back to eager
            log.warning("compiled decode failed for %s (%s); eager", prec, exc)
            torch._dynamo.reset()
            fig["decode_compile_error"] = repr(exc)[:500]
            fig["decode"] = decode_tokens_per_s(
                model, device, steps=args.decode_tokens, warmup=args.warmup, compile_mode="none"
            )
        say(f"[{prec}] batch-1 decode {fig['decode']['tokens_per_s']:.1f} tokens/s")
        if qr is not None:
            fig["swap"] = swap_figures(qr, device)
            say(
                f"[{prec}] swap {fig['swap']['bytes_per_second'] / 1e9:.2f} GB/s = "
                f"{fig['swap']['ratio_to_pinned']:.3f} of pinned"
            )
        out["precisions"][prec] = fig
        del model, qr
        torch._dynamo.reset()
        if device.type == "cuda":  # compiled graphs' private memory pools
            from torch._inductor import cudagraph_trees

            cudagraph_trees.reset_cudagraph_trees()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = out["precisions"]["bf16"]["decode"]["tokens_per_s"]
    for prec in ("fp8", "int4"):
        fig = out["precisions"][prec]
        fig["decode_over_bf16"] = fig["decode"]["tokens_per_s"] / base if base else None
    return out


# ---- main --------------------------------------------------------------------------------------


def print_results(result: dict[str, Any]) -> None:
    demo = result.get("demo")
    if demo:
        rows = []
        for r in demo["rows"]:
            rows.append(
                [
                    r["keep"],
                    r["precision"],
                    f"{r['resident_bytes'] / 2**20:.2f}",
                    f"{r['mean_accuracy']:.3f}",
                    " ".join(f"{t}={a:.2f}" for t, a in r["accuracy"].items()),
                ]
            )
        bc.print_table(
            ["keep", "precision", "MiB", "accuracy", "per task"],
            rows,
            title="(a) demo model: accuracy per (keep, precision)",
            align="rlrrl",
        )
        rows = [
            [
                f"{e['budget_bytes'] / 2**20:.2f}",
                e["source_keep"],
                f"{e['source_accuracy']:.3f}",
                f"{e['best']['keep']} {e['best']['precision']}",
                f"{e['best']['mean_accuracy']:.3f}",
            ]
            for e in demo["equal_memory"]
        ]
        bc.print_table(
            ["budget MiB", "source keep", "source acc", "best (keep, prec)", "best acc"],
            rows,
            title="(a) at equal memory",
        )
    dev = result.get("device")
    if dev:
        rows = []
        for prec, f in dev["precisions"].items():
            swap = f.get("swap") or {}
            rows.append(
                [
                    prec,
                    human(f["resident_bytes"]),
                    f"{f['resident_over_ideal']:.4f}",
                    f"{f['decode']['tokens_per_s']:.1f}",
                    f"{f['decode_over_bf16']:.3f}" if f.get("decode_over_bf16") else "-",
                    f"{swap['bytes_per_second'] / 1e9:.2f}" if swap else "-",
                    f"{swap['ratio_to_pinned']:.3f}" if swap else "-",
                    f"{f['kernel_vs_dequant_max_rel']:.2e}"
                    if f.get("kernel_vs_dequant_max_rel") is not None
                    else "-",
                ]
            )
        bc.print_table(
            [
                "precision",
                "resident",
                "÷ ideal (≤1.02)",
                "decode tok/s",
                "÷ bf16 (fp8≥1.3, int4≥1.6)",
                "swap GB/s",
                "÷ pinned (≥0.9)",
                "kernel rel diff",
            ],
            rows,
            title=f"(b) {dev['shape']['experts']} experts kept, {result['device_name']}",
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (cuda when present)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of everything")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--skip-device", action="store_true")
    p.add_argument("--keeps", default="4,8,16,32,64", help="demo keep counts")
    p.add_argument("--tasks", default=",".join(DEMO_TASKS), help="demo tasks")
    p.add_argument("--eval-n", type=int, default=100, help="demo eval rows per task")
    p.add_argument("--demo-block", type=int, default=32, help="demo fp8 block (square)")
    p.add_argument("--demo-group", type=int, default=32, help="demo int4 group size")
    p.add_argument("--kept", type=int, default=32, help="experts per layer of the device model")
    p.add_argument("--block", type=int, default=128, help="fp8 block (square)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size")
    p.add_argument(
        "--gemv-rows", type=int, default=64, help="routed pairs up to which the Triton GEMV runs"
    )
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument(
        "--compile",
        default="reduce-overhead",
        choices=["reduce-overhead", "default", "max-autotune-no-cudagraphs", "none"],
    )
    p.add_argument(
        "--bf16-impl",
        default=None,
        help="experts_implementation of the bf16 baseline (default: transformers' choice)",
    )
    bc.add_model_args(p)
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in bc.SMOKE_SHAPE.items():
            setattr(args, k, v)
        args.device = "cpu"
        args.kept = bc.SMOKE_SHAPE["experts"]
        args.block, args.group_size = 32, 32
        args.decode_tokens, args.warmup, args.compile = 8, 2, "none"
        args.keeps, args.tasks, args.eval_n = "8,32", "add,reverse", 20
    args.keeps = [int(k) for k in str(args.keeps).split(",") if k]
    args.tasks = [t for t in str(args.tasks).split(",") if t]
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available; use --device cpu or --smoke")
    logging.basicConfig(level=logging.WARNING)
    result: dict[str, Any] = {
        "bench": "quant",
        "smoke": args.smoke,
        "device_name": bc.device_name(device),
    }
    if not args.skip_demo:
        say("(a) demo model: accuracy per (keep, precision)")
        result["demo"] = demo_accuracy(args)
    if not args.skip_device:
        say(f"(b) device figures on {device}")
        result["device"] = device_figures(args, device)
    print_results(result)
    bc.write_json(args.out, result, device=device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
