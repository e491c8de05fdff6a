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
import logging
import sys
import time
from pathlib import Path
from typing import Any

import _common as bc
import torch

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
    """(median seconds, peak device bytes; 0 off CUDA) of `fn()` over `repeats` runs."""
    bc.reset_peak(device)
    seconds = bc.median_seconds(fn, repeats, device)
    return seconds, bc.peak_bytes(device) or 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    bc.add_model_args(p)
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
        vars(args).update(bc.SMOKE_SHAPE, device="cpu", dtype="fp32")
        vars(args).update(batch=2, seq=64, batches=3, repeats=2, warmup=1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    config = bc.qwen3_config(args)
    t0 = time.perf_counter()
    model = bc.build_on_device(config, device, args.dtype)
    arch = arch_for_config(config)
    n_params = bc.n_params(model)
    log.info("model: %.2f B parameters, built in %.1f s", n_params / 1e9, time.perf_counter() - t0)

    n = args.batch * args.batches
    ids = bc.random_token_ids(n, args.seq, args.vocab)
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
        "dtype": args.dtype,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "model": {**bc.model_shape(args), "params": n_params},
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_run": tokens,
        "plain": {"tokens_per_s": base_tps, "peak_bytes": base_peak},
        "profile": rows,
        "smoke": args.smoke,
    }
    table = [("plain", f"{base_tps:,.0f}", "1.000", f"{base_peak / 2**30:.2f}", "1.000")]
    for name, r in rows.items():
        pr = f"{r['peak_ratio']:.3f}" if r["peak_ratio"] is not None else "n/a"
        table.append(
            (
                name,
                f"{r['tokens_per_s']:,.0f}",
                f"{r['throughput_ratio']:.3f}",
                f"{r['peak_bytes'] / 2**30:.2f}",
                pr,
            )
        )
    bc.print_table(
        ("run", "tok/s", "ratio", "peak GiB", "peak ratio"),
        table,
        title=f"profiling overhead, {bc.device_name(device)}, {n_params / 1e9:.2f} B params, "
        f"batch {args.batch} x {args.seq}",
    )
    bc.write_json(args.out, result, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
