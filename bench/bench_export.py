"""Benchmark: pruned export throughput versus `cp`, and peak host memory during export.

Figures (issue 4):

(a) throughput: bytes written per second by `premoe.export` / bytes per second of `cp` copying a
    file of the same size (the kept bytes) on the same disk. Target >= 0.5.
(b) memory: peak host RSS of the exporting process / (largest source shard + kept bytes).
    Target <= 1.2. Also given without the interpreter's baseline (torch + transformers imports).

With ``--quantize fp8|int4`` the export quantizes the kept experts as it writes (``premoe export
--quantize``): it writes fewer bytes than it reads, so two ratios are given. ``throughput_ratio``
is (a): bytes *written* per second / cp's bytes per second; ``time_ratio`` is cp's seconds /
the export's seconds for the same kept source bytes (source bytes processed per second / cp's),
the one that says how much slower than copying the kept bytes the quantizing export is.
``--profile`` adds one more export run under cProfile (not in the timings) and prints where its
time goes, grouped by library (compressed-tensors, pack: premoe's quantizers, safetensors,
torch, premoe, other): self time per group and the top cumulative entries.

Both timings include an fsync of everything written, so neither is flattered by dirty pages
left in the page cache. Each run is done twice: "cold" (the source files' pages are dropped
from the page cache first with posix_fadvise(DONTNEED) after a sync; no root needed, other
files are untouched) and "warm" (the source files are read once first, so they come from the
page cache); cp and export always run in the same state. The export runs in a child process;
Python imports count in its RSS (reported separately as the baseline) but not in its time,
which runs from `export_from_store` to the fsync of the output. Its peak RSS is the child's own
high-water mark (VmHWM; getrusage's ru_maxrss would include the parent's RSS, which Linux
carries through fork + exec), cross-checked by sampling with psutil from the parent.

    python bench/bench_export.py --gb 4 --workdir /tmp/bench-export --out bench/export.json
    python bench/bench_export.py --checkpoint /data/q8 --keep 16 --out bench/export.json
    python bench/bench_export.py --smoke --out /tmp/export_smoke.json      # tiny, seconds
    python bench/bench_export.py --gb 4 --quant fp8 --out bench/results/export_cpu_fp8.json
    python bench/bench_export.py --gb 1.5 --quantize int4 --profile \
        --out bench/results/export_cpu_int4.json

CPU only: export does not use an accelerator (`--device` only picks where make_checkpoint
generates its random pool).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK = 64 * 2**20


# ---- page cache and files ------------------------------------------------------------------------


def drop_cache(paths: list[Path]) -> None:
    """Evict the clean page-cache pages of `paths` (after a sync, so all pages are clean)."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(CHUNK):
                pass


def fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_copy_source(shards: list[Path], size: int, dest: Path) -> None:
    """A file of `size` bytes of real checkpoint data (the shards' bytes, concatenated)."""
    left = size
    with open(dest, "wb") as out:
        for shard in shards:
            with open(shard, "rb") as f:
                while left and (block := f.read(min(CHUNK, left))):
                    out.write(block)
                    left -= len(block)
            if not left:
                break
    if left:
        raise SystemExit(f"checkpoint smaller than the {size} bytes to copy")


def shard_files(checkpoint: Path) -> list[Path]:
    return sorted(p for p in checkpoint.glob("*.safetensors") if not p.name.startswith("."))


# ---- one cp and one export -----------------------------------------------------------------------


def time_cp(src: Path, dst: Path) -> float:
    if dst.exists():
        dst.unlink()
    start = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - start
    dst.unlink()
    return seconds


def child(args: argparse.Namespace) -> None:
    """Run in the child process: export, fsync, print one JSON line."""
    import psutil

    from premoe.export import export_from_store
    from premoe.source import resolve_model

    # load the Python modules that resolving a model imports (transformers' config classes:
    # ~3 s here) before the clock starts; this reads config.json only, no shard
    resolve_model(args.checkpoint).close()
    quantizer = quantizer_of(args)
    baseline = psutil.Process().memory_info().rss
    profiler = cProfile.Profile() if args.profile_to else None
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    result = export_from_store(
        args.checkpoint,
        None,
        [],
        args.dest,
        keep=args.keep,
        policy="random",
        seed=args.seed,
        max_shard_bytes=args.max_shard_bytes,
        quantize=quantizer,
    )
    fsync_tree(Path(args.dest))
    seconds = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile_to)
    peak = vm_hwm()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "export_seconds": result.seconds,
                "tensor_bytes": result.tensor_bytes,
                "file_bytes": result.file_bytes,
                "bytes_read": result.bytes_read,
                "source_bytes": result.source_bytes,
                "shards": result.shards,
                "keep": result.keep_count,
                "baseline_rss": baseline,
                "peak_rss": peak,
            }
        )
    )


def quantizer_of(args: argparse.Namespace) -> Any:
    """The `ExpertQuantizer` of ``--quantize`` (None for none), as `premoe export` builds it."""
    if args.quantize == "none":
        return None
    from premoe.quant.export import ExpertQuantizer

    block = (args.block, args.block)
    return ExpertQuantizer(args.quantize, block=block, group_size=args.group_size, symmetric=True)


# ---- the profile, by library ---------------------------------------------------------------------

LIBRARIES: tuple[tuple[str, str], ...] = (  # (path fragment, group), first match wins
    ("compressed_tensors", "compressed-tensors"),
    ("premoe/quant/", "pack"),
    ("safetensors", "safetensors"),
    ("torch", "torch"),
    ("premoe/", "premoe"),
)


def library_of(filename: str) -> str:
    for fragment, group in LIBRARIES:
        if fragment in filename:
            return group
    return "other"


def profile_by_library(path: str, top: int = 6) -> dict[str, Any]:
    """Self time per library and each library's top entries by cumulative time."""
    stats = pstats.Stats(path, stream=io.StringIO())
    total = stats.total_tt  # type: ignore[attr-defined]
    groups: dict[str, dict[str, Any]] = {}
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        g = groups.setdefault(library_of(filename), {"self_seconds": 0.0, "entries": []})
        g["self_seconds"] += tottime
        where = f"{Path(filename).name}:{line}" if line else filename
        g["entries"].append(
            {"function": f"{func} ({where})", "calls": ncalls, "cumulative": cumtime}
        )
    for g in groups.values():
        g["entries"] = sorted(g["entries"], key=lambda e: -e["cumulative"])[:top]
    order = sorted(groups, key=lambda n: -groups[n]["self_seconds"])
    return {"total_seconds": total, "libraries": {n: groups[n] for n in order}}


def print_profile(prof: dict[str, Any]) -> None:
    total = prof["total_seconds"]
    print(f"\nprofile of one export ({total:.1f} s under cProfile), self time by library:")
    for name, g in prof["libraries"].items():
        print(f"  {name:<19} {g['self_seconds']:7.2f} s  {100 * g['self_seconds'] / total:5.1f} %")
        for e in g["entries"][:4]:
            print(f"      {e['cumulative']:7.2f} s cum  {e['calls']:>7}x  {e['function'][:90]}")


def vm_hwm() -> int:
    """Peak RSS of this process image (VmHWM). Unlike getrusage's ru_maxrss, which Linux carries
    over from the parent through fork + exec, it covers only this process's own memory."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_export(
    checkpoint: Path,
    dest: Path,
    keep: int,
    max_shard: int,
    args: argparse.Namespace,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    import psutil

    if dest.exists():
        shutil.rmtree(dest)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--checkpoint",
        str(checkpoint),
        "--dest",
        str(dest),
        "--keep",
        str(keep),
        "--max-shard-bytes",
        str(max_shard),
        "--quantize",
        args.quantize,
        "--block",
        str(args.block),
        "--group-size",
        str(args.group_size),
        *(["--profile-to", str(profile_to)] if profile_to else []),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampled = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal sampled
        try:
            p = psutil.Process(proc.pid)
            while not stop.is_set():
                sampled = max(sampled, p.memory_info().rss)
                time.sleep(0.005)
        except psutil.NoSuchProcess:
            pass

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"export child failed:\n{err}")
    data = json.loads(out.strip().splitlines()[-1])
    data["sampled_peak_rss"] = sampled
    shutil.rmtree(dest)
    return data


# ---- the benchmark -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", help="Write the results as JSON here.")
    p.add_argument("--checkpoint", type=Path, help="Use this checkpoint (else one is built).")
    p.add_argument("--gb", type=float, default=4.0, help="Size of the built checkpoint (GB).")
    p.add_argument("--shard", default="1GB", help="Shard size of the built checkpoint.")
    p.add_argument("--workdir", type=Path, default=None, help="Where to build and write.")
    p.add_argument("--keep", type=int, default=None, help="Experts kept per layer (default E/4).")
    p.add_argument("--repeat", type=int, default=3, help="Runs per mode (median reported).")
    p.add_argument("--modes", default="cold,warm", help="cold, warm or both.")
    p.add_argument("--max-shard-bytes", type=int, default=5 * 2**30, help="Export shard size.")
    p.add_argument("--keep-checkpoint", action="store_true", help="Do not delete a built one.")
    p.add_argument("--device", default="cpu", help="Where make_checkpoint generates (cpu/cuda).")
    p.add_argument("--smoke", action="store_true", help="Tiny checkpoint, one run: a quick check.")
    p.add_argument(
        "--quant", choices=["fp8"], default=None, help="Build an fp8-block (DeepSeek layout) one."
    )
    p.add_argument(
        "--quantize",
        choices=["none", "fp8", "int4"],
        default="none",
        help="Quantize the kept experts while exporting (premoe export --quantize).",
    )
    p.add_argument("--block", type=int, default=128, help="fp8 block size (with --quantize fp8).")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size.")
    p.add_argument(
        "--profile", action="store_true", help="One more export under cProfile, by library."
    )
    p.add_argument("--profile-to", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dest", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    import _common as bc
    import make_checkpoint

    from premoe.plan import SizeModel
    from premoe.policy import parse_bytes
    from premoe.source import resolve_model

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-export-"))
    workdir.mkdir(parents=True, exist_ok=True)
    built = None
    if args.checkpoint is None:
        ns = make_checkpoint.parse_args(
            ["--out", str(workdir / "src"), "--gb", str(args.gb)]
            + ["--smoke"] * args.smoke
            + (["--quant", args.quant] if args.quant else [])
        )
        config = make_checkpoint.config_for(ns)
        shard = parse_bytes("1MB") if args.smoke else parse_bytes(args.shard)
        built = make_checkpoint.write_checkpoint(
            config, workdir / "src", shard_bytes=shard, device=args.device, quant=args.quant
        )
        print(f"built {built['bytes'] / 1e9:.2f} GB in {built['shards']} shards, "
              f"{built['seconds']:.0f} s", file=sys.stderr)  # fmt: skip
        args.checkpoint = workdir / "src"
    repeat = 1 if args.smoke else args.repeat

    src = resolve_model(args.checkpoint)
    sizes = SizeModel.from_source(src)
    keep = args.keep or max(src.top_k, src.num_experts // 4)
    kept_bytes = sizes.resident(keep)
    shards = shard_files(args.checkpoint)
    largest = max(p.stat().st_size for p in shards)
    src.close()

    cp_src, cp_dst = workdir / "cp_src.bin", workdir / "cp_dst.bin"
    make_copy_source(shards, kept_bytes, cp_src)
    dest = workdir / "exported"
    runs: dict[str, dict[str, Any]] = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        prepare = drop_cache if mode == "cold" else warm_cache
        cps, exports = [], []
        for _ in range(repeat):
            prepare([cp_src])
            cps.append(time_cp(cp_src, cp_dst))
            prepare(shards)
            exports.append(run_export(args.checkpoint, dest, keep, args.max_shard_bytes, args))
        cp_s = statistics.median(cps)
        ex_s = statistics.median(e["seconds"] for e in exports)
        written = exports[0]["file_bytes"]
        peak = max(e["peak_rss"] for e in exports)
        base = min(e["baseline_rss"] for e in exports)
        runs[mode] = {
            "cp_seconds": cps,
            "export_seconds": [e["seconds"] for e in exports],
            "cp_bytes_per_s": kept_bytes / cp_s,
            "export_bytes_per_s": written / ex_s,
            "throughput_ratio": (written / ex_s) / (kept_bytes / cp_s),
            "time_ratio": cp_s / ex_s,
            "peak_rss": peak,
            "sampled_peak_rss": max(e["sampled_peak_rss"] for e in exports),
            "baseline_rss": base,
            "rss_ratio": peak / (largest + kept_bytes),
            "rss_ratio_above_baseline": (peak - base) / (largest + kept_bytes),
            "bytes_read": exports[0]["bytes_read"],
            "runs": exports,
        }
    profile = None
    if args.profile:
        prof_path = workdir / "export.prof"
        run_export(args.checkpoint, dest, keep, args.max_shard_bytes, args, prof_path)
        profile = profile_by_library(str(prof_path))
        prof_path.unlink()
    results = {
        "benchmark": "export",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "checkpoint": {
            "path": str(args.checkpoint),
            "bytes": sizes.source_bytes,
            "shards": len(shards),
            "largest_shard": largest,
            "experts": sizes.num_experts,
            "built": built,
        },
        "format": built["format"] if built else None,
        "keep": keep,
        "quantize": None
        if args.quantize == "none"
        else {"scheme": args.quantize, "block": args.block, "group_size": args.group_size},
        "kept_bytes": kept_bytes,
        "predicted_file_bytes": sizes.file_bytes(keep, max_shard_bytes=args.max_shard_bytes),
        "modes": runs,
        "targets": {"throughput_ratio": ">= 0.5", "rss_ratio": "<= 1.2"},
        "ratios": {
            "throughput_ratio": "(bytes written / export s) / (kept source bytes / cp s)",
            "time_ratio": "cp s / export s, same kept source bytes",
        },
        "profile": profile,
    }
    gb = 1e9
    print(
        f"checkpoint {sizes.source_bytes / gb:.2f} GB in {len(shards)} shards (largest "
        f"{largest / gb:.2f} GB); keep {keep}/{sizes.num_experts}: {kept_bytes / gb:.2f} GB"
    )
    bc.print_table(
        (
            "mode",
            "cp MB/s",
            "export MB/s",
            "ratio",
            "cp s / export s",
            "peak RSS GB",
            "RSS ratio",
            "w/o base",
        ),
        [
            (
                mode,
                f"{r['cp_bytes_per_s'] / 1e6:.0f}",
                f"{r['export_bytes_per_s'] / 1e6:.0f}",
                f"{r['throughput_ratio']:.2f}",
                f"{r['time_ratio']:.2f}",
                f"{r['peak_rss'] / gb:.2f}",
                f"{r['rss_ratio']:.2f}",
                f"{r['rss_ratio_above_baseline']:.2f}",
            )
            for mode, r in runs.items()
        ],
    )
    if profile is not None:
        print_profile(profile)
    bc.write_json(args.out, results)
    cp_src.unlink(missing_ok=True)
    if built is not None and not args.keep_checkpoint:
        shutil.rmtree(args.checkpoint, ignore_errors=True)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
