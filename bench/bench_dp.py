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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as bc
import torch

log = logging.getLogger("bench_dp")

RUN_ARGS = ("batch", "seq", "batches")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", help="cuda (one GPU per rank) or cpu (gloo)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    bc.add_model_args(p, kv_ratio=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batches", type=int, default=64, help="batches of the whole corpus")
    p.add_argument("--metrics", default="tcess,frequency")
    p.add_argument("--sequential", action="store_true", help="profile layer by layer from disk")
    p.add_argument("--world", type=int, default=2, help="GPUs of the parallel run")


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
    dtype = bc.torch_dtype(args.dtype)
    tok = build_tokenizer(128)
    n = args.batch * args.batches
    ids = bc.random_token_ids(n, args.seq, min(args.vocab, 128), low=3)
    corpora = {"bench": TaskCorpus("bench", "random", ids)}
    warm = {"warm": TaskCorpus("warm", "random", ids[: args.batch * world])}
    metrics = args.metrics.split(",")
    t0 = time.perf_counter()
    if args.sequential:
        handle = ModelHandle(args.model_dir, tok)
        fingerprint = handle.fingerprint
    else:
        from premoe.fingerprint import fingerprint_model

        model = bc.build_on_device(bc.qwen3_config(args), device, dtype)
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
    bc.reset_peak(device)
    with bc.DeviceTimer(device) as timer:
        res = once(corpora)
    seconds = timer.seconds
    peak = bc.peak_bytes(device)
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
            "device": bc.device_name(device),
            "stats": res.stats,
        }
        (out / "run.json").write_text(json.dumps(info, indent=2, default=str))
    return 0


# ---- driver -----------------------------------------------------------------------------------


def launch(args: argparse.Namespace, world: int, result_dir: Path, extra: list[str]) -> None:
    result_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
        "--master-addr", "127.0.0.1", "--master-port", str(bc.free_port()),
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
    return {
        name: bc.max_rel_diff(x, b[name]) if name in b else float("inf") for name, x in a.items()
    }


def driver(args: argparse.Namespace, passthrough: list[str]) -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-dp-", dir=args.work))
    try:
        extra = list(passthrough)
        if args.sequential:
            from make_checkpoint import write_checkpoint

            model_dir = work / "model"
            write_checkpoint(bc.qwen3_config(args), model_dir, shard_bytes=2 * 10**9)
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
            "device": r1["device"],
            "dtype": args.dtype,
            "mode": "sequential" if args.sequential else "plain",
            "model": {**bc.model_shape(args), **{k: getattr(args, k) for k in RUN_ARGS}},
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
        table = []
        for label, r in (("1", r1), (str(args.world), rn)):
            s = r1["seconds"] / r["seconds"]
            table.append(
                (
                    label,
                    f"{r['seconds']:.2f}",
                    f"{r['tokens'] / r['seconds']:,.0f}",
                    f"{s:.3f}",
                    f"{s / r['world']:.3f}",
                )
            )
        bc.print_table(
            ("ranks", "seconds", "tok/s", "speed-up", "efficiency"),
            table,
            title=f"data-parallel profiling, {result['device']}, {result['mode']}, {args.dtype}, "
            f"{r1['tokens']:,} tokens",
        )
        print(f"same model on every rank: {same_model}; max rel diff {result['max_rel_diff']:.2e}")
        bc.write_json(args.out, result)
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
        vars(args).update(bc.SMOKE_SHAPE, device="cpu", dtype="fp32", batch=2, seq=32, batches=6)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.worker:
        return worker(args)
    passthrough = [f"--device={args.device}", f"--dtype={args.dtype}", f"--metrics={args.metrics}"]
    passthrough += [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in (*bc.SHAPE_KEYS, *RUN_ARGS)
        if getattr(args, k) is not None  # (--kv-heads unset: the worker's default rule)
    ]
    if args.sequential:
        passthrough.append("--sequential")
    return driver(args, passthrough)


if __name__ == "__main__":
    sys.exit(main())
