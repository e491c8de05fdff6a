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
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import premoe  # noqa: E402
from premoe.arch import arch_for_config  # noqa: E402
from premoe.profile.corpus import TaskCorpus  # noqa: E402
from premoe.profile.profiler import load_causal_lm, run_profile  # noqa: E402
from premoe.profile.sequential import run_profile_sequential  # noqa: E402

log = logging.getLogger("bench_sequential")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return None


def ensure_checkpoint(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    from make_checkpoint import qwen3_config, write_checkpoint

    folder = Path(args.model_dir) if args.model_dir else work / "model"
    if (folder / "config.json").is_file():
        return folder, {"path": str(folder), "reused": True}
    config = qwen3_config(
        layers=args.layers,
        hidden=args.hidden,
        moe_intermediate=args.moe_intermediate,
        experts=args.experts,
        top_k=args.top_k,
        vocab=args.vocab,
        heads=args.heads,
        head_dim=args.head_dim,
    )
    config.max_position_embeddings = max(4096, args.seq)
    info = write_checkpoint(config, folder, shard_bytes=args.shard_bytes, device=args.pool_device)
    log.info("checkpoint: %.2f GB in %d shards, %.1f s", info["bytes"] / 1e9, info["shards"],
             info["seconds"])  # fmt: skip
    return folder, info


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Max relative difference of the sums (per row, scaled by the row's max) and keys."""
    out: dict[str, float] = {}
    for task in a:
        for row, x in a[task].sums.items():
            y = b[task].sums[row]
            scale = max(float(x.abs().max()), 1e-30)
            key = f"sums/{row}"
            out[key] = max(out.get(key, 0.0), float((x - y).abs().max()) / scale)
        for kind, x in a[task].keys.items():
            y = b[task].keys[kind]
            if x.shape != y.shape:
                out[f"keys/{kind}"] = float("inf")
                continue
            scale = max(float(x.abs().max()), 1e-30)
            key = f"keys/{kind}"
            out[key] = max(out.get(key, 0.0), float((x - y).abs().max()) / scale)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
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
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
        args.hidden, args.moe_intermediate, args.experts, args.top_k = 64, 32, 8, 2
        args.layers, args.heads, args.head_dim, args.vocab = 4, 4, 16, 1000
        args.batch, args.seq, args.batches = 2, 48, 4
        args.shard_bytes = 200_000
        args.layers_at_once = "1,2"
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
    g = torch.Generator().manual_seed(0)
    n = args.batch * args.batches
    ids = torch.randint(10, args.vocab, (n, args.seq), generator=g).tolist()
    corpora = {"bench": TaskCorpus("bench", "random", ids)}
    tokens = n * args.seq

    # 1. normal: the whole model on the device
    reset_peak(device)
    t0 = time.perf_counter()
    model = load_causal_lm(folder, device=device, dtype="auto")
    sync(device)
    load_s = time.perf_counter() - t0
    arch = arch_for_config(model.config)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    warm = {"warm": TaskCorpus("warm", "random", ids[: args.batch])}
    run_profile(model, arch, warm, tokenizer=None, metrics=metrics, batch_size=args.batch)
    sync(device)
    t0 = time.perf_counter()
    normal = run_profile(model, arch, corpora, tokenizer=None, metrics=metrics,
                         batch_size=args.batch)  # fmt: skip
    sync(device)
    normal_s = time.perf_counter() - t0
    normal_peak = peak(device)
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

    # 2. sequential, per group size
    rows: dict[str, Any] = {}
    for k in [int(x) for x in args.layers_at_once.split(",")]:
        reset_peak(device)
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
        pk = peak(device)
        rows[str(k)] = {
            **st.to_json(),
            "peak_bytes": pk,
            "peak_ratio": pk / model_bytes if pk else None,
            "throughput_ratio": st.tokens_per_s / normal_row["tokens_per_s"],
            "throughput_ratio_with_load": st.tokens_per_s / normal_row["tokens_per_s_with_load"],
            "agreement": compare(normal, run.recorded),
        }
    result = {
        "benchmark": "sequential_profiling",
        "premoe_version": premoe.__version__,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "experts_implementation": impl,
        "model": {
            "hidden": args.hidden,
            "moe_intermediate": args.moe_intermediate,
            "experts": args.experts,
            "top_k": args.top_k,
            "layers": args.layers,
            "param_bytes": model_bytes,
            "checkpoint": ckpt,
        },
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
    gib = 2**30
    print(
        f"\nsequential vs normal profiling, {result['device']}, model {model_bytes / 1e9:.2f} GB, "
        f"{args.batches} batches of {args.batch} x {args.seq}"
    )
    print(
        f"{'mode':<14} {'tok/s':>10} {'ratio':>7} {'ratio+load':>10} {'peak GiB':>9} "
        f"{'peak/model':>10} {'max rel diff':>12}"
    )

    def fmt_peak(b: int | None) -> tuple[str, str]:
        if b is None:
            return "n/a", "n/a"
        return f"{b / gib:.2f}", f"{b / model_bytes:.3f}"

    pk_s, pr_s = fmt_peak(normal_row["peak_bytes"])
    print(
        f"{'normal':<14} {normal_row['tokens_per_s']:>10,.0f} {1.0:>7.3f} {'':>10} {pk_s:>9} "
        f"{pr_s:>10} {'-':>12}"
    )
    for k, r in rows.items():
        pk_s, pr_s = fmt_peak(r["peak_bytes"])
        diff = max(r["agreement"].values()) if r["agreement"] else 0.0
        print(
            f"{'sequential/' + k:<14} {r['tokens_per_s']:>10,.0f} {r['throughput_ratio']:>7.3f} "
            f"{r['throughput_ratio_with_load']:>10.3f} {pk_s:>9} {pr_s:>10} {diff:>12.2e}"
        )
    print(f"normal load (not in its tok/s): {load_s:.1f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
