"""Benchmark: data-parallel profiling over torch.distributed, 2 GPUs versus 1 (issue 8).

The script is its own driver: it launches ``torchrun --nproc-per-node 1`` and then
``--nproc-per-node 2`` on itself (``--worker``), each rank building the same random
Qwen3-MoE-shaped model directly on its GPU (same seed; the router fingerprint is compared),
profiling its shard of the same corpus through `premoe.profile.distributed.profile_corpora` (the
code `premoe profile` runs under torchrun), timed after a warm-up from a barrier to the end of the
gather. Rank 0 of each run writes the gathered sums and keys; the driver compares them and
reports

- speed-up = time(1 GPU) / time(2 GPUs) and efficiency = speed-up / 2 (target >= 0.85);
- agreement: max relative difference of the sums and the keys, 2 GPUs vs 1 (bf16 on GPUs: the
  shards batch different samples together, so expert kernels see other token counts; report it;
  ``--dtype fp32`` for a tighter comparison).

    python bench/bench_dp.py --out bench/results/dp_h100x2.json        # on a 2-GPU machine
    python bench/bench_dp.py --sequential --out bench/results/dp_seq.json  # DP + --sequential
    python bench/bench_dp.py --smoke --out /tmp/dp_smoke.json          # CPU, gloo, tiny model

With ``--sequential`` the model is written to disk once (`make_checkpoint.py`) and every rank
profiles it layer by layer from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

log = logging.getLogger("bench_dp")

SHAPE_ARGS = ("hidden", "moe_intermediate", "experts", "top_k", "layers", "heads", "head_dim",
              "vocab", "batch", "seq", "batches")  # fmt: skip


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", help="cuda (one GPU per rank) or cpu (gloo)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
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
    p.add_argument("--batches", type=int, default=64, help="batches of the whole corpus")
    p.add_argument("--metrics", default="tcess,frequency")
    p.add_argument("--sequential", action="store_true", help="profile layer by layer from disk")
    p.add_argument("--world", type=int, default=2, help="GPUs of the parallel run")


def config_for(args: argparse.Namespace) -> Any:
    from make_checkpoint import qwen3_config

    cfg = qwen3_config(
        layers=args.layers,
        hidden=args.hidden,
        moe_intermediate=args.moe_intermediate,
        experts=args.experts,
        top_k=args.top_k,
        vocab=args.vocab,
        heads=args.heads,
        head_dim=args.head_dim,
    )
    cfg.max_position_embeddings = max(4096, args.seq)
    return cfg


# ---- worker (one rank, under torchrun) -----------------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    import premoe.profile.distributed as pd
    from premoe.demo.tasks import build_tokenizer
    from premoe.profile.corpus import TaskCorpus
    from premoe.profile.profiler import ModelHandle

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = args.device == "cuda"
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:  # our own group, so that warm-up and timed run share it
        dist.init_process_group("nccl" if cuda else "gloo")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tok = build_tokenizer(128)
    g = torch.Generator().manual_seed(0)
    n = args.batch * args.batches
    ids = torch.randint(3, min(args.vocab, 128), (n, args.seq), generator=g).tolist()
    corpora = {"bench": TaskCorpus("bench", "random", ids)}
    warm = {"warm": TaskCorpus("warm", "random", ids[: args.batch * world])}
    metrics = args.metrics.split(",")
    t0 = time.perf_counter()
    if args.sequential:
        handle = ModelHandle(args.model_dir, tok)
        fingerprint = handle.fingerprint
    else:
        from transformers import AutoModelForCausalLM

        from premoe.fingerprint import fingerprint_model

        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config_for(args), dtype=dtype).eval()
        handle = ModelHandle(model, tok)
        fingerprint = fingerprint_model(model, handle.arch)
    build_s = time.perf_counter() - t0

    def once(c: dict[str, TaskCorpus]) -> pd.RunResult:
        return pd.profile_corpora(
            handle,
            c,
            metrics=metrics,
            threshold=0.0,
            batch_size=args.batch,
            device=device,
            dtype=dtype,
            sequential=args.sequential,
        )

    once(warm)
    if world > 1:
        dist.barrier()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    res = once(corpora)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    if world > 1:
        times = [None] * world
        dist.all_gather_object(times, {"seconds": seconds, "peak": peak})
        dist.destroy_process_group()
    else:
        times = [{"seconds": seconds, "peak": peak}]
    if rank == 0:
        from safetensors.torch import save_file

        out = Path(args.result_dir)
        tensors = {}
        for task, rec in res.recorded.items():
            for row, t in rec.sums.items():
                tensors[f"sums/{task}/{row}"] = t.contiguous()
            for kind, t in rec.keys.items():
                tensors[f"keys/{task}/{kind}"] = t.contiguous()
        save_file(tensors, str(out / "recorded.safetensors"))
        info = {
            "world": world,
            "seconds": max(t["seconds"] for t in times),
            "per_rank": times,
            "build_seconds": build_s,
            "tokens": n * args.seq,
            "fingerprint": fingerprint,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "stats": res.stats,
        }
        (out / "run.json").write_text(json.dumps(info, indent=2, default=str))
    return 0


# ---- driver -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(args: argparse.Namespace, world: int, result_dir: Path, extra: list[str]) -> None:
    result_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(Path(__file__).resolve()), "--worker", "--result-dir", str(result_dir), *extra,
    ]  # fmt: skip
    log.info("launching %d rank(s)", world)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"torchrun with {world} rank(s) failed ({done.returncode})")


def load_recorded(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "recorded.safetensors"))


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, x in a.items():
        y = b.get(name)
        if y is None or y.shape != x.shape:
            out[name] = float("inf")
            continue
        scale = max(float(x.double().abs().max()), 1e-30)
        out[name] = float((x.double() - y.double()).abs().max()) / scale
    return out


def driver(args: argparse.Namespace, passthrough: list[str]) -> int:
    import premoe

    work = Path(tempfile.mkdtemp(prefix="bench-dp-", dir=args.work))
    try:
        extra = list(passthrough)
        if args.sequential:
            from make_checkpoint import write_checkpoint

            model_dir = work / "model"
            write_checkpoint(config_for(args), model_dir, shard_bytes=2 * 10**9)
            from premoe.demo.tasks import build_tokenizer

            build_tokenizer(128).save_pretrained(model_dir)
            extra += ["--model-dir", str(model_dir)]
        one, many = work / "w1", work / f"w{args.world}"
        launch(args, 1, one, extra)
        launch(args, args.world, many, extra)
        r1 = json.loads((one / "run.json").read_text())
        rn = json.loads((many / "run.json").read_text())
        same_model = r1["fingerprint"] == rn["fingerprint"]
        diffs = agreement(load_recorded(one), load_recorded(many))
        speedup = r1["seconds"] / rn["seconds"]
        result = {
            "benchmark": "data_parallel_profiling",
            "premoe_version": premoe.__version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
            "device": r1["device"],
            "dtype": args.dtype,
            "mode": "sequential" if args.sequential else "plain",
            "model": {k: getattr(args, k) for k in SHAPE_ARGS},
            "tokens": r1["tokens"],
            "one": r1,
            "parallel": rn,
            "world": args.world,
            "speedup": speedup,
            "efficiency": speedup / args.world,
            "same_model": same_model,
            "agreement": diffs,
            "max_rel_diff": max(diffs.values()) if diffs else 0.0,
            "targets": {"efficiency_min": 0.85, "agreement_max": 1e-5},
            "smoke": args.smoke,
        }
        print(
            f"\ndata-parallel profiling, {result['device']}, {result['mode']}, {args.dtype}, "
            f"{r1['tokens']:,} tokens"
        )
        print(f"{'ranks':<6} {'seconds':>9} {'tok/s':>12} {'speed-up':>9} {'efficiency':>10}")
        for label, r in (("1", r1), (str(args.world), rn)):
            s = r1["seconds"] / r["seconds"]
            print(
                f"{label:<6} {r['seconds']:>9.2f} {r['tokens'] / r['seconds']:>12,.0f} {s:>9.3f} "
                f"{s / r['world']:>10.3f}"
            )
        print(f"same model on every rank: {same_model}; max rel diff {result['max_rel_diff']:.2e}")
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
            print(f"wrote {args.out}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_args(p)
    p.add_argument("--smoke", action="store_true", help="tiny model, CPU, gloo")
    p.add_argument("--work", default=None, help="scratch folder (checkpoint, results)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.dtype = "cpu", "fp32"
        args.hidden, args.moe_intermediate, args.experts, args.top_k = 64, 32, 8, 2
        args.layers, args.heads, args.head_dim, args.vocab = 4, 4, 16, 1000
        args.batch, args.seq, args.batches = 2, 32, 6
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.worker:
        return worker(args)
    passthrough = [f"--device={args.device}", f"--dtype={args.dtype}", f"--metrics={args.metrics}"]
    passthrough += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SHAPE_ARGS]
    if args.sequential:
        passthrough.append("--sequential")
    return driver(args, passthrough)


if __name__ == "__main__":
    sys.exit(main())
