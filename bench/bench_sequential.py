"""Benchmark: layer-sequential profiling (`--sequential`) versus normal profiling (issue 8).

A big random Qwen3-MoE-shaped checkpoint is written to disk (`make_checkpoint.py`: per-expert hub
layout, bf16, values from a random pool, one shard in host memory at a time). Then, on the same
batches of random token ids:

1. **normal**: `from_pretrained(..., device_map={"": device})` (the whole model on the device),
   `run_profile`; the load is timed apart;
2. **sequential**: `run_profile_sequential` from the checkpoint folder (a meta skeleton, each
   layer read from the checkpoint onto the device when its turn comes, activations on pinned host
   memory), for each ``--layers-at-once`` value.

Reported: peak device memory of each (torch.cuda.max_memory_allocated) and its ratio to the full
model's parameter bytes (target <= 0.15 for sequential), tokens/s of the profiling pass (the
sequential pass includes reading every layer: it is its whole cost) and the ratio sequential /
normal (aim >= 0.5), the same ratio with the normal mode's load counted in, and the agreement of
the per-task sums and keys (max relative difference; the target is <= 1e-4).

    python bench/bench_sequential.py --device cuda --out bench/results/sequential_h100.json
    python bench/bench_sequential.py --smoke --out /tmp/sequential_smoke.json     # CPU, tiny

Default model: hidden 2048, moe_intermediate 768, 128 experts, top-8, 24 layers, 32 heads x 128,
vocab 151936 (about 15.6 B parameters, 31 GB in bf16); 64 batches of 8 x 512 tokens. The
checkpoint goes to ``--model-dir`` (reused if it holds a config.json) or a temporary folder under
``--work`` that is removed at the end (about 31 GB of disk).
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import _common as bc
import torch
from make_checkpoint import write_checkpoint

from premoe.arch import arch_for_config
from premoe.load.loader import param_bytes
from premoe.profile.corpus import TaskCorpus
from premoe.profile.profiler import load_causal_lm, run_profile
from premoe.profile.sequential import run_profile_sequential

log = logging.getLogger("bench_sequential")


def ensure_checkpoint(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    folder = Path(args.model_dir) if args.model_dir else work / "model"
    if (folder / "config.json").is_file():
        return folder, {"path": str(folder), "reused": True}
    config = bc.qwen3_config(args)
    info = write_checkpoint(
        config, folder, shard_bytes=args.shard_bytes, device=args.pool_device, quant=args.quant
    )
    log.info("checkpoint: %.2f GB in %d shards, %.1f s", info["bytes"] / 1e9, info["shards"],
             info["seconds"])  # fmt: skip
    return folder, info


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Max relative difference of the sums (per row, scaled by the row's max) and keys."""
    out: dict[str, float] = {}
    for task in a:
        for part in ("sums", "keys"):
            for name, x in getattr(a[task], part).items():
                key = f"{part}/{name}"
                diff = bc.max_rel_diff(x, getattr(b[task], part)[name])
                out[key] = max(out.get(key, 0.0), diff)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    bc.add_model_args(p, kv_ratio=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batches", type=int, default=64, help="batches per profiling pass")
    p.add_argument("--layers-at-once", default="1,4", help="sequential group sizes to run")
    p.add_argument("--metrics", default="tcess,frequency")
    p.add_argument("--model-dir", default=None, help="checkpoint folder (written if absent)")
    p.add_argument("--work", default=None, help="where a temporary checkpoint goes")
    p.add_argument("--shard-bytes", type=int, default=2 * 10**9)
    p.add_argument("--pool-device", default="cpu", help="where make_checkpoint draws its pool")
    p.add_argument("--offload-dir", default=None, help="spill activations here (sequential)")
    p.add_argument("--host-budget", type=int, default=None, help="activation bytes on the host")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    p.add_argument("--quant", choices=["fp8"], default=None, help="an fp8-block checkpoint")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(bc.SMOKE_SHAPE, device="cpu", batch=2, seq=48, batches=4)
        vars(args).update(shard_bytes=200_000, layers_at_once="1,2")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    work = Path(tempfile.mkdtemp(prefix="bench-seq-", dir=args.work))
    try:
        return run(args, device, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, device: torch.device, work: Path) -> int:
    metrics = args.metrics.split(",")
    folder, ckpt = ensure_checkpoint(args, work)
    n = args.batch * args.batches
    ids = bc.random_token_ids(n, args.seq, args.vocab)
    corpora = {"bench": TaskCorpus("bench", "random", ids)}
    tokens = n * args.seq

    # 1. normal: the whole model on the device
    bc.reset_peak(device, empty_cache=True)
    with bc.DeviceTimer(device) as t:
        model = load_causal_lm(folder, device=device, dtype="auto")
    load_s = t.seconds
    arch = arch_for_config(model.config)
    model_bytes = param_bytes(model)
    warm = {"warm": TaskCorpus("warm", "random", ids[: args.batch])}
    run_profile(model, arch, warm, tokenizer=None, metrics=metrics, batch_size=args.batch)
    with bc.DeviceTimer(device) as t:
        normal = run_profile(model, arch, corpora, tokenizer=None, metrics=metrics,
                             batch_size=args.batch)  # fmt: skip
    normal_s = t.seconds
    normal_peak = bc.peak_bytes(device)
    impl = getattr(model.config, "_experts_implementation", None)
    del model
    gc.collect()
    normal_row = {
        "load_seconds": load_s,
        "seconds": normal_s,
        "tokens_per_s": tokens / normal_s,
        "tokens_per_s_with_load": tokens / (normal_s + load_s),
        "peak_bytes": normal_peak,
        "peak_ratio": normal_peak / model_bytes if normal_peak else None,
    }

    ckpt_bytes = ckpt.get("bytes")  # on disk (fp8: half the dequantized model_bytes)

    # 2. sequential, per group size
    rows: dict[str, Any] = {}
    for k in [int(x) for x in args.layers_at_once.split(",")]:
        bc.reset_peak(device, empty_cache=True)
        run = run_profile_sequential(
            folder,
            arch,
            corpora,
            tokenizer=None,
            metrics=metrics,
            batch_size=args.batch,
            device=device,
            dtype="auto",
            layers_at_once=k,
            offload_dir=args.offload_dir,
            host_budget=args.host_budget,
        )
        st = run.stats
        pk = bc.peak_bytes(device)
        rows[str(k)] = {
            **st.to_json(),
            "peak_bytes": pk,
            "peak_ratio": pk / model_bytes if pk else None,
            "peak_ratio_of_checkpoint": pk / ckpt_bytes if pk and ckpt_bytes else None,
            "throughput_ratio": st.tokens_per_s / normal_row["tokens_per_s"],
            "throughput_ratio_with_load": st.tokens_per_s / normal_row["tokens_per_s_with_load"],
            "agreement": compare(normal, run.recorded),
        }
    result = {
        "benchmark": "sequential_profiling",
        "experts_implementation": impl,
        "model": {**bc.model_shape(args), "param_bytes": model_bytes, "checkpoint": ckpt},
        "format": args.quant or "bf16",
        "batch": args.batch,
        "seq": args.seq,
        "batches": args.batches,
        "tokens": tokens,
        "metrics": metrics,
        "normal": normal_row,
        "sequential": rows,
        "targets": {"peak_ratio_max": 0.15, "throughput_ratio_min": 0.5, "agreement_max": 1e-4},
        "smoke": args.smoke,
    }

    def fmt_peak(b: int | None) -> tuple[str, str]:
        if b is None:
            return "n/a", "n/a"
        return f"{b / 2**30:.2f}", f"{b / model_bytes:.3f}"

    table = [
        ("normal", f"{normal_row['tokens_per_s']:,.0f}", "1.000", "",
         *fmt_peak(normal_row["peak_bytes"]), "-"),
    ]  # fmt: skip
    for k, r in rows.items():
        diff = max(r["agreement"].values()) if r["agreement"] else 0.0
        table.append(
            (
                f"sequential/{k}",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['throughput_ratio']:.3f}",
                f"{r['throughput_ratio_with_load']:.3f}",
                *fmt_peak(r["peak_bytes"]),
                f"{diff:.2e}",
            )
        )
    bc.print_table(
        ("mode", "tok/s", "ratio", "ratio+load", "peak GiB", "peak/model", "max rel diff"),
        table,
        title=f"sequential vs normal profiling, {bc.device_name(device)}, model "
        f"{model_bytes / 1e9:.2f} GB resident ({args.quant or 'bf16'} checkpoint "
        f"{(ckpt_bytes or 0) / 1e9:.2f} GB), {args.batches} batches of {args.batch} x {args.seq}",
    )
    for k, r in rows.items():
        if r.get("peak_ratio_of_checkpoint"):
            print(f"sequential/{k}: peak / checkpoint bytes = {r['peak_ratio_of_checkpoint']:.3f}")
    print(f"normal load (not in its tok/s): {load_s:.1f} s")
    bc.write_json(args.out, result, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
