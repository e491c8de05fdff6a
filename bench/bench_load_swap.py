"""Benchmark: pruned load and expert swaps of a large Qwen3-MoE-shaped random model.

Figures (issue 5):

(a) load: peak device memory during `load_pruned` (ResidentModel) / exact bytes of the kept
    parameters (target <= 1.02), and the full model's size for comparison;
(b) swap: bytes moved / seconds / the pinned host-to-device bandwidth of a plain pinned copy
    measured in the same run (target >= 0.8), from the pinned host cache; the page-cache
    (checkpoint) path too;
(c) switching between two patterns that share half their experts moves only the other half.

The model (default: hidden 2048, moe_intermediate 768, 128 experts, top-8, 24 layers, ~15 B
parameters, bf16, ~31 GB) is generated on the device layer by layer and written shard by shard
to disk in the hub's per-expert layout, so the loader reads a real checkpoint (from the page
cache, as it is fresh). Patterns keep 32 experts per layer.

    python bench/bench_load_swap.py --device cuda --out bench/load_swap.json
    python bench/bench_load_swap.py --smoke --out /tmp/load_swap_smoke.json   # tiny, CPU
    python bench/bench_load_swap.py --device cuda --layers 8 --experts 64     # smaller

Use `--checkpoint DIR` to reuse a checkpoint written earlier (`--keep-checkpoint` keeps it).
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as bc
import torch

from premoe.load import HostExpertCache, ResidentModel, load_pruned, size_model
from premoe.prune import KeepSets
from premoe.source import resolve_model

log = logging.getLogger("bench_load_swap")


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


def patterns(layers: list[int], experts: int, keep: int, seed: int = 0) -> dict[str, KeepSets]:
    """A and B disjoint; H shares half of A (and takes its other half from B)."""
    rng = random.Random(seed)
    a: dict[int, list[int]] = {}
    b: dict[int, list[int]] = {}
    h: dict[int, list[int]] = {}
    for layer in layers:
        perm = rng.sample(range(experts), 2 * keep)
        a[layer], b[layer] = perm[:keep], perm[keep:]
        h[layer] = a[layer][: keep // 2] + b[layer][: keep - keep // 2]
    return {n: KeepSets.from_mapping(v) for n, v in (("A", a), ("B", b), ("H", h))}


def _rss() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def swap_row(name: str, stats: Any, bw: float) -> dict[str, Any]:
    return {
        "swap": name,
        "experts_moved": stats.experts_moved,
        "bytes": stats.bytes,
        "seconds": stats.seconds,
        "bytes_per_second": stats.bytes_per_second,
        "ratio_to_pinned": stats.bytes_per_second / bw if bw else None,
        "from_cache": stats.per_source["cache"].experts,
        "from_disk": stats.per_source["disk"].experts,
        "device_moves": stats.device_moves,
        "router_bytes": stats.router_bytes,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device if args.device != "auto" else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available; use --device cpu or --smoke")
    cuda = device.type == "cuda"
    config = bc.qwen3_config(args)
    result: dict[str, Any] = {
        **bc.environment(device),
        "options": {k: v for k, v in vars(args).items() if k not in ("out",)},
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
            log.info(
                "wrote %.1f GB in %.1f s",
                result["write"]["bytes"] / 1e9,
                result["write"]["seconds"],
            )
        if cuda:
            torch.cuda.empty_cache()
        src = resolve_model(folder)
        full_bytes = sum(src.reader.nbytes(k) for k in src.reader.keys())
        pats = patterns(src.moe_layers, src.num_experts, args.keep)
        dtype = torch.bfloat16

        # (a) load
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        one = size_model(src, dtype).expert_bytes
        cache = HostExpertCache(
            args.cache_budget or int(2.2 * args.keep * len(src.moe_layers) * one)
        )
        with bc.DeviceTimer(device) as t:
            resident = ResidentModel(src, pats["A"], device=device, dtype=dtype, host_cache=cache)
        load_s = t.seconds
        kept = resident.resident_bytes
        peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
        info = resident.load_info
        result["load"] = {
            "seconds": load_s,
            "kept_param_bytes": kept,
            "full_model_bytes": full_bytes,
            "bytes_read": info.bytes_read if info else None,
            "read_gb_per_s": (info.bytes_read / load_s / 1e9) if info else None,
            "peak_device_bytes": peak,
            "peak_over_kept": peak / kept if peak is not None else None,
            "target_peak_over_kept": 1.02,
            "peak_below_full_model": peak < full_bytes if peak is not None else None,
            "host_rss_after_load": _rss(),
        }
        ptrs = {n: t.data_ptr() for n, t in resident.model.state_dict(keep_vars=True).items()}

        # pinned bandwidth, in the same run
        probe = min(2 << 30, max(64 << 20, args.keep * len(src.moe_layers) * resident.expert_bytes))
        bw = pinned_bandwidth(device, probe)
        result["pinned_h2d_bytes_per_second"] = bw

        # fill the host cache with A and B (page cache -> pinned)
        t0 = time.perf_counter()
        filled = resident.prefetch(pats["B"]) + resident.prefetch(pats["A"])
        result["cache_fill"] = {"bytes": filled, "seconds": time.perf_counter() - t0}

        # (b) full swaps from the pinned cache (A <-> B: every expert changes)
        swaps = []
        for rep in range(args.reps):
            for target in ("B", "A"):
                st = resident.swap_to(pats[target])
                swaps.append(swap_row(f"cache {'AB'[target == 'A']}->{target} #{rep}", st, bw))
        # (b') page-cache path: no host cache
        resident.host_cache = None
        for rep in range(args.reps):
            for target in ("B", "A"):
                st = resident.swap_to(pats[target])
                swaps.append(swap_row(f"disk {'AB'[target == 'A']}->{target} #{rep}", st, bw))
        # (c) half-shared: A -> H -> A moves only the half H does not share
        resident.host_cache = cache
        half = []
        for target in ("H", "A"):
            st = resident.swap_to(pats[target])
            row = swap_row(f"cache half {target}", st, bw)
            row["expected_experts"] = (args.keep - args.keep // 2) * len(src.moe_layers)
            half.append(row)
            swaps.append(row)
        cache_rows = [r for r in swaps if r["swap"].startswith("cache") and "half" not in r["swap"]]
        disk_rows = [r for r in swaps if r["swap"].startswith("disk")]
        best_cache = max(r["bytes_per_second"] for r in cache_rows)
        best_disk = max(r["bytes_per_second"] for r in disk_rows)
        result["swaps"] = swaps
        result["swap"] = {
            "cache_bytes_per_second": best_cache,
            "cache_ratio_to_pinned": best_cache / bw,
            "target_cache_ratio": 0.8,
            "disk_bytes_per_second": best_disk,
            "disk_ratio_to_pinned": best_disk / bw,
            "half_shared_moves_only_half": all(
                r["experts_moved"] == r["expected_experts"] for r in half
            ),
            "half_shared_bytes": half[0]["bytes"],
        }
        now = {n: t.data_ptr() for n, t in resident.model.state_dict(keep_vars=True).items()}
        result["swap"]["data_ptrs_unchanged"] = now == ptrs

        # the swapped model equals a fresh load of its pattern
        if not args.no_check:
            ids = torch.randint(0, config.vocab_size, (1, 32), generator=torch.Generator())
            ids = ids.to(device)
            resident.swap_to(pats["H"])
            with torch.no_grad():
                a = resident.model(ids, use_cache=False).logits.float()
            fresh = load_pruned(src, pats["H"], device=device, dtype=dtype)
            with torch.no_grad():
                b = fresh(ids, use_cache=False).logits.float()
            same = all(
                torch.equal(x, y)
                for x, y in zip(
                    resident.model.state_dict().values(), fresh.state_dict().values(), strict=True
                )
            )
            result["check"] = {
                "weights_equal_fresh_load": same,
                "logits_max_abs_diff": (a - b).abs().max().item(),
            }
            del fresh
        resident.close()
        src.close()
    finally:
        if tmp is not None and not args.keep_checkpoint:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            log.info("checkpoint kept at %s", folder)
    return result


def print_table(result: dict[str, Any]) -> None:
    def gb(x: float | None) -> str:
        return "-" if x is None else f"{x / 1e9:.3f} GB"

    print(
        f"device: {result['device']}  torch {result['torch']}  transformers "
        f"{result['transformers']}  premoe {result['premoe_version']}"
    )
    if "write" in result:
        w = result["write"]
        print(f"checkpoint written: {gb(w['bytes'])} in {w['seconds']:.1f} s")
    ld = result["load"]
    ratio = ld["peak_over_kept"]
    print(
        f"load: {ld['seconds']:.2f} s, read {gb(ld['bytes_read'])} "
        f"({ld['read_gb_per_s']:.2f} GB/s), kept params {gb(ld['kept_param_bytes'])}, "
        f"full model {gb(ld['full_model_bytes'])}"
    )
    print(
        f"(a) peak device memory / kept bytes: "
        f"{'-' if ratio is None else f'{ratio:.4f}'} (target <= 1.02)"
    )
    bw = result["pinned_h2d_bytes_per_second"]
    print(
        f"pinned host->device bandwidth: {bw / 1e9:.2f} GB/s; cache fill "
        f"{gb(result['cache_fill']['bytes'])} in {result['cache_fill']['seconds']:.2f} s"
    )
    head = ("swap", "experts", "bytes", "seconds", "GB/s", "/pinned", "cache", "disk", "d2d")
    rows = [
        (
            r["swap"],
            r["experts_moved"],
            gb(r["bytes"]),
            f"{r['seconds']:.4f}",
            f"{r['bytes_per_second'] / 1e9:.2f}",
            f"{r['ratio_to_pinned']:.3f}",
            r["from_cache"],
            r["from_disk"],
            r["device_moves"],
        )
        for r in result["swaps"]
    ]
    bc.print_table(head, rows)
    s = result["swap"]
    print(
        f"(b) swap from pinned cache / pinned bandwidth: {s['cache_ratio_to_pinned']:.3f} "
        f"(target >= 0.8); page-cache path: {s['disk_ratio_to_pinned']:.3f}"
    )
    print(
        f"(c) half-shared switch moves only the other half: "
        f"{s['half_shared_moves_only_half']} ({gb(s['half_shared_bytes'])})"
    )
    print(f"data_ptrs unchanged across swaps: {s['data_ptrs_unchanged']}")
    if "check" in result:
        c = result["check"]
        print(
            f"swapped == fresh load: weights {c['weights_equal_fresh_load']}, "
            f"logits max |diff| {c['logits_max_abs_diff']:.3g}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    bc.add_model_args(ap)
    ap.add_argument("--keep", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2, help="repetitions of each full swap")
    ap.add_argument("--cache-budget", default=None, help="host cache bytes (default: 3 patterns)")
    ap.add_argument("--checkpoint", default=None, help="reuse (or write to) this folder")
    ap.add_argument("--keep-checkpoint", action="store_true", help="do not delete the checkpoint")
    ap.add_argument("--workdir", default=None, help="where the temporary checkpoint goes")
    ap.add_argument("--no-check", action="store_true", help="skip the swapped == fresh check")
    ap.add_argument("--out", default=None, help="write the JSON results here")
    args = ap.parse_args()
    if args.smoke:
        args.device = "cpu" if args.device == "auto" else args.device
        vars(args).update(bc.SMOKE_SHAPE, layers=2, experts=16, top_k=2, vocab=256, keep=4)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("premoe").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    result = run(args)
    result["total_seconds"] = time.perf_counter() - t0
    print_table(result)
    print(f"total {result['total_seconds']:.1f} s")
    bc.write_json(args.out, result)


if __name__ == "__main__":
    main()
