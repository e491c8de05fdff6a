"""Benchmark: miss-aware retrieval (issue 18) on a Qwen3-MoE-shaped random model.

A quarter of the experts is resident (K = E/4 slots per MoE layer). Tasks are synthetic: task i's
prompts draw their tokens from its own small slice of the vocabulary (`--task-vocab` ids), so
each task routes to its own experts. The profiled tasks (`--tasks`, TCESS measured with premoe's
`RoutingRecorder` on the full model) give one pattern each and a pooled pattern; one more slice is
never profiled (the out-of-task prompts). Figures, decode tokens/s at batch 1 (`premoe.load.decode`,
eager, KV cache), each the median of `--reps` runs over `--prompts` prompts:

(a) fetch / mask on in-task prompts (target >= 0.8): the price of exact mode when the pattern
    is right;
(b) fetch (pooled pattern, pattern experts evicted last, unpinned after the prompt in layers
    where the prompt shows it does not fit, `FetchingModel.adapt`) / a plain LRU expert cache
    with the same K slots and no pattern retrieval (MoE-Infinity-style: every expert in pinned
    host memory, least recently used slot replaced) on out-of-task prompts (target >= 1.5);
(c) measuring the dropped mass: mask tokens/s with the meter / without (target >= 0.97);
(d) accuracy: agreement of each policy's greedy tokens with the full model's (fetch must be
    1.0), and the dropped mass of in-task and out-of-task prompts.

Every policy fetches from the same pinned host cache, filled with every expert beforehand (the
host-memory tier of an offloading system), so fetch costs are host-to-device copies; one more
row fetches without it (checkpoint reads per miss) to show what that prefetch buys.

    python bench/bench_miss.py --device cuda --out bench/results/miss.json
    python bench/bench_miss.py --smoke --out /tmp/miss_smoke.json   # tiny, CPU
    python bench/bench_miss.py --demo --out /tmp/miss_demo.json     # bundled demo model, CPU

`--demo` measures, on the bundled demo model and its shipped store, the dropped mass of held-out
prompts of every task under every task's pattern (mean over the prompt's tokens and layers) at
several keep counts: the in-task diagonal against the out-of-task rest.

`--checkpoint DIR` reuses (or writes) the random checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as bc
import torch

from premoe.demo.tasks import generate as demo_rows
from premoe.demo.tasks import task_names
from premoe.load import HostExpertCache, ResidentModel, load_pruned, size_model
from premoe.load.decode import Decoded, decode
from premoe.load.fetch import FetchingModel
from premoe.load.miss import MissMeter, shadow_meter
from premoe.patterns import PatternStore
from premoe.policy import select_experts
from premoe.profile.hooks import RoutingRecorder
from premoe.prune import KeepSets
from premoe.source import ModelSource, load_tokenizer, resolve_model

log = logging.getLogger("bench_miss")


def task_prompts(task: int, n: int, length: int, width: int, seed: int) -> list[list[int]]:
    """`n` prompts of `length` ids from task `task`'s vocabulary slice [10 + task·width, +width)."""
    g = torch.Generator().manual_seed(seed * 1000 + task)
    lo = 10 + task * width
    return torch.randint(lo, lo + width, (n, length), generator=g).tolist()


def profile_tasks(
    model: Any, src: ModelSource, corpora: dict[str, list[list[int]]]
) -> dict[str, torch.Tensor]:
    """TCESS [L, E] per task, measured on the full model."""
    out = {}
    device = next(model.parameters()).device
    with RoutingRecorder(model, src.arch, ("tcess",), keys=()) as rec, torch.inference_mode():
        for name, rows in corpora.items():
            ids = torch.tensor(rows, device=device)  # [B, S]
            rec.start_batch(torch.ones_like(ids))
            model(input_ids=ids, use_cache=False)
            sums = rec.collect().sums["tcess"]  # [L, E]
            out[name] = sums / sums.sum(-1, keepdim=True).clamp(min=1e-12)
    return out


def top_keep(src: ModelSource, scores: torch.Tensor, k: int) -> KeepSets:
    return KeepSets.from_mapping(
        {n: scores[i].topk(k).indices.tolist() for i, n in enumerate(src.moe_layers)}
    )


def timed_decode(
    model: Any, prompts: list[list[int]], new: int, device: torch.device, **kw: Any
) -> tuple[float, list[Decoded]]:
    """Decode tokens/s over all prompts (prefill excluded) and the decodes."""
    got = [
        decode(model, p, max_new_tokens=new, synchronize=lambda: bc.sync(device), **kw)
        for p in prompts
    ]
    tokens = sum(len(d.tokens) - 1 for d in got)  # decode steps after the prompt's forward
    seconds = sum(d.seconds - d.prefill_seconds for d in got)
    return tokens / seconds if seconds > 0 else 0.0, got


def agreement(got: list[Decoded], ref: list[list[int]]) -> float:
    """Share of generated tokens equal to the full model's (up to the first difference)."""
    same = total = 0
    for d, r in zip(got, ref, strict=True):
        total += len(r)
        for a, b in zip(d.tokens, r, strict=False):
            if a != b:
                break
            same += 1
    return same / total if total else float("nan")


def measure(
    name: str,
    model: Any,
    prompts: list[list[int]],
    args: argparse.Namespace,
    device: torch.device,
    ref: list[list[int]],
    meter: MissMeter | None = None,
    after_prompt: Any = None,
) -> dict[str, Any]:
    kw = {"meter": meter, "after_prompt": after_prompt}
    timed_decode(model, prompts[:1], min(8, args.new_tokens), device, **kw)  # warm-up
    speeds = []
    got: list[Decoded] = []
    for _ in range(args.reps):
        tps, got = timed_decode(model, prompts, args.new_tokens, device, **kw)
        speeds.append(tps)
    row: dict[str, Any] = {
        "policy": name,
        "tokens_per_second": statistics.median(speeds),
        "runs": speeds,
        "agreement": agreement(got, ref),
    }
    if meter is not None:
        masses = [d.mass.mean for d in got if d.mass is not None]
        row["dropped_mass"] = sum(masses) / max(1, len(masses))
        row["dropped_mass_prompt"] = sum(
            d.prompt_mass.mean for d in got if d.prompt_mass is not None
        ) / max(1, len(got))
    log.info("%s: %.1f tokens/s, agreement %.3f", name, row["tokens_per_second"], row["agreement"])
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device if args.device != "auto" else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available; use --device cpu or --smoke")
    config = bc.qwen3_config(args)
    result: dict[str, Any] = {
        **bc.environment(device),
        "options": {k: v for k, v in vars(args).items() if k != "out"},
    }
    tmp = None
    if args.checkpoint:
        folder = Path(args.checkpoint)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="premoe-bench-", dir=args.workdir))
        folder = tmp / "model"
    try:
        if not (folder / "config.json").is_file():
            log.info("writing the random checkpoint to %s", folder)
            result["write"] = bc.write_layered_checkpoint(config, folder, device)
        src = resolve_model(folder)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        e, k = src.num_experts, src.num_experts // 4
        tasks = [f"t{i}" for i in range(args.tasks)]
        unseen = args.tasks  # the slice never profiled
        corpora = {
            t: task_prompts(i, args.profile_rows, args.prompt_len, args.task_vocab, seed=1)
            for i, t in enumerate(tasks)
        }
        in_prompts = task_prompts(0, args.prompts, args.prompt_len, args.task_vocab, seed=2)
        out_prompts = task_prompts(unseen, args.prompts, args.prompt_len, args.task_vocab, 2)

        # the full model: profiles, and the reference tokens
        full = load_pruned(
            src, KeepSets.uniform(src.moe_layers, range(e)), device=device, dtype=dtype
        )
        scores = profile_tasks(full, src, corpora)
        ref_in = [decode(full, p, max_new_tokens=args.new_tokens).tokens for p in in_prompts]
        ref_out = [decode(full, p, max_new_tokens=args.new_tokens).tokens for p in out_prompts]
        full_tps, _ = timed_decode(full, in_prompts, args.new_tokens, device)
        del full
        if device.type == "cuda":
            torch.cuda.empty_cache()
        task_keep = top_keep(src, scores[tasks[0]], k)
        pooled = top_keep(src, sum(scores.values()) / len(scores), k)
        first_k = KeepSets.uniform(src.moe_layers, range(k))

        every = size_model(src, dtype).expert_bytes * e * len(src.moe_layers)
        cache = HostExpertCache(args.cache_budget or int(every * 1.05) + (1 << 20))
        rows: list[dict[str, Any]] = []
        with bc.DeviceTimer(device) as t:
            resident = ResidentModel(src, task_keep, device=device, dtype=dtype)
        result["load_seconds"] = t.seconds
        net = resident.model
        rows.append(measure("mask (in-task)", net, in_prompts, args, device, ref_in))
        meter = shadow_meter(net, src, task_keep.layers)
        with meter:
            rows.append(
                measure("mask+meter (in-task)", net, in_prompts, args, device, ref_in, meter)
            )
            resident.swap_to(pooled)
            meter.set_resident(pooled.layers)
            rows.append(
                measure("mask+meter (out-of-task)", net, out_prompts, args, device, ref_out, meter)
            )
        del net, resident, meter
        if device.type == "cuda":
            torch.cuda.empty_cache()

        def fetching(
            name: str, keep: KeepSets, pinned: Any, prompts: list, ref: list, host: bool = True
        ) -> None:
            fm = FetchingModel(
                src,
                keep,
                pinned=pinned,
                device=device,
                dtype=dtype,
                host_cache=cache if host else None,
            )
            if host:
                with bc.DeviceTimer(device) as t:
                    nbytes = fm.prefetch_host()
                result.setdefault("host_cache_fill", {"bytes": nbytes, "seconds": t.seconds})
            # pattern-based rows check the pattern against the prompt (adapt); the LRU one has none
            adapt = fm.adapt if pinned is None else None
            row = measure(name, fm.model, prompts, args, device, ref, after_prompt=adapt)
            row["fetch"] = fm.stats.to_json()
            rows.append(row)
            fm.close()
            del fm
            if device.type == "cuda":
                torch.cuda.empty_cache()

        fetching("fetch (in-task)", task_keep, None, in_prompts, ref_in)
        fetching("fetch (out-of-task, pooled)", pooled, None, out_prompts, ref_out)
        fetching("LRU cache (out-of-task)", first_k, {}, out_prompts, ref_out)
        # without the host tier: every miss is read from the checkpoint (page cache)
        fetching("fetch (out-of-task, no host cache)", pooled, None, out_prompts, ref_out, False)

        by = {r["policy"]: r for r in rows}

        def ratio(a: str, b: str) -> float:
            return by[a]["tokens_per_second"] / max(by[b]["tokens_per_second"], 1e-12)

        result["rows"] = rows
        result["full_model_tokens_per_second"] = full_tps
        result["slots"] = {"experts": e, "resident": k}
        result["figures"] = {
            "fetch_in_task_over_mask": ratio("fetch (in-task)", "mask (in-task)"),
            "fetch_out_of_task_over_lru": ratio(
                "fetch (out-of-task, pooled)", "LRU cache (out-of-task)"
            ),
            "meter_on_over_off": ratio("mask+meter (in-task)", "mask (in-task)"),
            "host_prefetch_speedup": ratio(
                "fetch (out-of-task, pooled)", "fetch (out-of-task, no host cache)"
            ),
            "fetch_agreement_in_task": by["fetch (in-task)"]["agreement"],
            "fetch_agreement_out_of_task": by["fetch (out-of-task, pooled)"]["agreement"],
            "dropped_mass_in_task": by["mask+meter (in-task)"]["dropped_mass_prompt"],
            "dropped_mass_out_of_task": by["mask+meter (out-of-task)"]["dropped_mass_prompt"],
        }
        result["targets"] = {
            "fetch_in_task_over_mask": 0.8,
            "fetch_out_of_task_over_lru": 1.5,
            "meter_on_over_off": 0.97,
            "fetch_agreement_in_task": 1.0,
            "fetch_agreement_out_of_task": 1.0,
        }
        src.close()
        return result
    finally:
        if tmp is not None and not args.keep_checkpoint:
            shutil.rmtree(tmp, ignore_errors=True)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Dropped mass of each demo task's prompts under each task's pattern, per keep count."""
    root = Path(__file__).resolve().parents[1]
    src = resolve_model(root / "premoe" / "demo" / "model")
    store = PatternStore.load(root / "patterns" / "demo")
    tok = load_tokenizer(src.path)
    tasks = task_names()
    result: dict[str, Any] = {**bc.environment("cpu"), "keeps": {}}
    net = None
    resident = None
    for k in args.demo_keeps:
        table: dict[str, dict[str, float]] = {}
        for pattern in tasks:
            keep = select_experts(
                store.scores(pattern, "tcess"),
                src.moe_layers,
                num_experts=src.num_experts,
                routed=src.top_k,
                keep=k,
            ).keep
            if resident is None or resident.slots != k:
                net = load_pruned(src, keep, dtype=torch.float32)
                resident = ResidentModel.wrap(net, src, keep)
            else:
                resident.swap_to(keep)
            meter = shadow_meter(resident.model, src, keep.layers)
            with meter:
                for task in tasks:
                    got = []
                    for row in demo_rows(task, args.prompts, seed=11):
                        ids = tok(row["prompt"])["input_ids"]
                        d = decode(resident.model, ids, max_new_tokens=1, meter=meter)
                        assert d.prompt_mass is not None
                        got.append(d.prompt_mass.mean)
                    table.setdefault(pattern, {})[task] = sum(got) / len(got)
        diag = [table[t][t] for t in tasks]
        off = [table[p][t] for p in tasks for t in tasks if p != t]
        result["keeps"][str(k)] = {
            "table": table,
            "in_task_mean": sum(diag) / len(diag),
            "in_task_max": max(diag),
            "out_of_task_mean": sum(off) / len(off),
            "out_of_task_min": min(off),
        }
    src.close()
    del net
    return result


def print_demo(result: dict[str, Any]) -> None:
    for k, v in result["keeps"].items():
        tasks = list(v["table"])
        rows = [[p, *[f"{v['table'][p][t]:.3f}" for t in tasks]] for p in tasks]
        bc.print_table(["pattern \\ prompts", *tasks], rows, title=f"keep {k} of 64")
        print(
            f"in-task mean {v['in_task_mean']:.3f} (max {v['in_task_max']:.3f}); out-of-task "
            f"mean {v['out_of_task_mean']:.3f} (min {v['out_of_task_min']:.3f})"
        )


def print_table(result: dict[str, Any]) -> None:
    head = ["policy", "tokens/s", "agreement", "dropped mass", "fetched experts"]
    rows = []
    for r in result["rows"]:
        mass = r.get("dropped_mass_prompt")
        rows.append(
            [
                r["policy"],
                f"{r['tokens_per_second']:.1f}",
                f"{r['agreement']:.3f}",
                "-" if mass is None else f"{mass:.3f} / {r['dropped_mass']:.3f}",
                "-" if "fetch" not in r else str(r["fetch"]["experts"]),
            ]
        )
    print(
        f"{result['slots']['resident']} of {result['slots']['experts']} experts resident; "
        f"full model {result['full_model_tokens_per_second']:.1f} tokens/s"
    )
    bc.print_table(head, rows)
    print("dropped mass: prompt / generated tokens")
    fig = result["figures"]
    bc.print_table(
        ["figure", "measured", "target"],
        [
            [name, f"{value:.3f}", str(result["targets"].get(name, "-"))]
            for name, value in fig.items()
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--demo", action="store_true", help="dropped mass on the demo model (CPU)")
    ap.add_argument(
        "--demo-keeps", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 48]
    )
    bc.add_model_args(ap)
    ap.add_argument("--tasks", type=int, default=3, help="profiled tasks")
    ap.add_argument("--task-vocab", type=int, default=24, help="token ids per task")
    ap.add_argument("--profile-rows", type=int, default=32, help="profiling rows per task")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cache-budget", default=None, help="host cache bytes (default: all experts)")
    ap.add_argument("--checkpoint", default=None, help="reuse (or write to) this folder")
    ap.add_argument("--keep-checkpoint", action="store_true", help="do not delete the checkpoint")
    ap.add_argument("--workdir", default=None, help="where the temporary checkpoint goes")
    ap.add_argument("--out", default=None, help="write the JSON results here")
    args = ap.parse_args()
    if args.smoke:
        args.device = "cpu" if args.device == "auto" else args.device
        vars(args).update(bc.SMOKE_SHAPE, layers=2, experts=16, top_k=2, vocab=256)
        vars(args).update(prompts=2, prompt_len=16, new_tokens=12, reps=1, profile_rows=8)
        vars(args).update(task_vocab=8)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("premoe").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    if args.demo:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        demo = run_demo(argparse.Namespace(**{**vars(args), "prompts": 10}))
        demo["total_seconds"] = time.perf_counter() - t0
        print_demo(demo)
        bc.write_json(args.out, demo)
        return
    result = run(args)
    result["total_seconds"] = time.perf_counter() - t0
    print_table(result)
    print(f"total {result['total_seconds']:.1f} s")
    bc.write_json(args.out, result)


if __name__ == "__main__":
    main()
