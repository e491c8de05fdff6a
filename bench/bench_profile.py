"""Benchmark: profiling overhead versus the plain forward pass (issue 3 figures).

For each metric set (tcess, frequency, reap, and all four together) it runs `run_profile` (the
library's profiling loop: host batches -> device, router hooks, per-sample keys, one host sync
per task) and the plain decoder forward on the same batches, same model and card, and reports

- throughput ratio: tokens/s of profiling / tokens/s of the plain forward (target >= 0.95 for
  tcess and frequency; reap recomputes every routed expert's output, so it costs more);
- peak memory ratio: peak device memory while profiling / peak of the plain forward (target
  <= 1.05), and the extra bytes.

Default model: Qwen3-MoE-shaped, random bf16 weights built directly on the device (hidden 2048,
moe_intermediate 768, 128 experts, top-8, 24 layers, 32 heads x 128, vocab 151936: about 15.6 B
parameters, 31 GB), batch 8 x 512 random token ids, warm-up then timed with
torch.cuda.synchronize.

    python bench/bench_profile.py --device cuda --out bench/profile.json
    python bench/bench_profile.py --smoke --out /tmp/profile_smoke.json   # tiny model, CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import premoe
from premoe.arch import arch_for_config
from premoe.profile.corpus import TaskCorpus
from premoe.profile.profiler import iter_batches, run_profile

log = logging.getLogger("bench_profile")

METRIC_SETS: dict[str, list[str]] = {
    "tcess": ["tcess"],
    "frequency": ["frequency"],
    "reap": ["reap"],
    "all": ["tcess", "frequency", "paper-logits", "reap"],
}


def make_config(args: argparse.Namespace) -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 8),
        head_dim=args.head_dim,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        max_position_embeddings=max(4096, args.seq),
        tie_word_embeddings=False,
    )


def build_model(config: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Random weights, allocated and initialised on `device` (never on the host)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return 0


def plain_forward(model: Any, corpus: TaskCorpus, batch: int, device: torch.device) -> None:
    """The baseline: the same batches through the same decoder call, no hooks."""
    pin = device.type == "cuda"
    with torch.inference_mode():
        for ids, mask, _ in iter_batches(corpus.token_ids, batch, 0, pin=pin):
            ids = ids.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True)
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)


def profiled(model: Any, arch: Any, corpus: TaskCorpus, batch: int, metrics: list[str]) -> None:
    run_profile(model, arch, {"bench": corpus}, tokenizer=None, metrics=metrics, batch_size=batch)


def timed(fn: Any, device: torch.device, repeats: int) -> tuple[float, int]:
    """(median seconds, peak device bytes) of `fn()` over `repeats` runs."""
    times = []
    reset_peak(device)
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--moe-intermediate", type=int, default=768)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batches", type=int, default=8, help="batches per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up batches")
    p.add_argument("--metrics", default="tcess,frequency,reap,all")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.dtype = "cpu", "fp32"
        args.hidden, args.moe_intermediate, args.experts, args.top_k = 64, 32, 8, 2
        args.layers, args.heads, args.head_dim, args.vocab = 4, 4, 16, 1000
        args.batch, args.seq, args.batches, args.repeats, args.warmup = 2, 64, 3, 2, 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    config = make_config(args)
    t0 = time.perf_counter()
    model = build_model(config, device, dtype)
    arch = arch_for_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2f B parameters, built in %.1f s", n_params / 1e9, time.perf_counter() - t0)

    g = torch.Generator().manual_seed(0)
    n = args.batch * args.batches
    ids = torch.randint(10, args.vocab, (n, args.seq), generator=g).tolist()
    corpus = TaskCorpus("bench", "random", ids)
    warm = TaskCorpus("warm", "random", ids[: args.batch * args.warmup])
    tokens = n * args.seq

    plain_forward(model, warm, args.batch, device)
    base_s, base_peak = timed(
        lambda: plain_forward(model, corpus, args.batch, device), device, args.repeats
    )
    base_tps = tokens / base_s
    rows: dict[str, Any] = {}
    for name in args.metrics.split(","):
        metrics = METRIC_SETS[name]
        profiled(model, arch, warm, args.batch, metrics)
        secs, pk = timed(
            lambda m=metrics: profiled(model, arch, corpus, args.batch, m), device, args.repeats
        )
        # the baseline again right after, to cancel clock drift
        b2, _ = timed(lambda: plain_forward(model, corpus, args.batch, device), device, 1)
        tps = tokens / secs
        rows[name] = {
            "metrics": metrics,
            "tokens_per_s": tps,
            "throughput_ratio": tps / base_tps,
            "throughput_ratio_vs_adjacent_baseline": tps / (tokens / b2),
            "peak_bytes": pk,
            "peak_ratio": (pk / base_peak) if base_peak else None,
            "extra_peak_bytes": pk - base_peak,
        }
    result = {
        "benchmark": "profile_overhead",
        "premoe_version": premoe.__version__,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "model": {
            "hidden": args.hidden,
            "moe_intermediate": args.moe_intermediate,
            "experts": args.experts,
            "top_k": args.top_k,
            "layers": args.layers,
            "params": n_params,
        },
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_run": tokens,
        "plain": {"tokens_per_s": base_tps, "peak_bytes": base_peak},
        "profile": rows,
        "smoke": args.smoke,
    }
    print(
        f"\nprofiling overhead, {result['device']}, {n_params / 1e9:.2f} B params, "
        f"batch {args.batch} x {args.seq}"
    )
    print(f"{'run':<10} {'tok/s':>12} {'ratio':>7} {'peak GiB':>9} {'peak ratio':>10}")
    print(f"{'plain':<10} {base_tps:>12,.0f} {1.0:>7.3f} {base_peak / 2**30:>9.2f} {1.0:>10.3f}")
    for name, r in rows.items():
        pr = f"{r['peak_ratio']:.3f}" if r["peak_ratio"] is not None else "n/a"
        print(
            f"{name:<10} {r['tokens_per_s']:>12,.0f} {r['throughput_ratio']:>7.3f} "
            f"{r['peak_bytes'] / 2**30:>9.2f} {pr:>10}"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
