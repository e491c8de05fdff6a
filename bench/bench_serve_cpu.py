"""Benchmark: `premoe serve` with continuous batching on a CPU (issue #17), over HTTP.

The real server (a subprocess, one torch thread) serves the bundled demo model with the shipped
store `patterns/demo` (5 task patterns + `__global__`, `--keep 16` of 64 experts). Clients send
streamed completions that name their pattern, round-robin over the 5 tasks (a mixed workload),
each `--max-tokens` tokens (`ignore_eos`, greedy), from `concurrency` parallel clients, each
sending its next request when the previous ends. Reported per setting and concurrency: generated
tokens/s, request latency p50/p99, time to first token p50/p99, and the server's step modes from
/metrics. The figure of merit: tokens/s at concurrency 16 / tokens/s at concurrency 1 (target
>= 6). TTFT is the client's: request sent to the first streamed chunk with text
(`_common.stream_completion`); "TTFT n" counts the requests where it was measured. Each run also
records what /health says (mode, resident bytes, KV slots) and the 1-minute load average, and
the server's CPU time per generated token: its main thread (the HTTP event loop: parsing,
streaming) and its other threads (the engine's decode loop and torch), from /proc.

    python bench/bench_serve_cpu.py --out bench/results/serve_cpu.json
    python bench/bench_serve_cpu.py --concurrency 1 16 64 --requests-per-client 4
    python bench/bench_serve_cpu.py --settings mixed mixed-nometer  # the dropped-mass meter's cost
    python bench/bench_serve_cpu.py --settings mixed mixed-nofreeze --concurrency 64  # gc.freeze
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as bc
import httpx

from premoe.demo.tasks import generate

ROOT = bc.ROOT
TASKS = ("add", "reverse", "sort", "count", "close")


def start_server(port: int, extra: list[str], max_batch: int) -> subprocess.Popen[bytes]:
    opts = ["--max-batch", str(max_batch), "--max-queue", "4096", *extra]
    return bc.start_demo_server(port, opts, timeout=180)


async def workload(url: str, concurrency: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    prompts = {t: [r["prompt"] for r in generate(t, 16, 7, "eval")] for t in TASKS}
    results: list[dict[str, Any]] = []

    async def client_loop(c: int) -> None:
        async with bc.http_client(url) as client:  # each client its own connection
            for k in range(per_client):
                task = TASKS[(c + k) % len(TASKS)]
                body = {
                    "prompt": prompts[task][(c * per_client + k) % 16],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "premoe": {"task": task},
                }
                results.append(await bc.stream_completion(client, body))

    async with bc.http_client(url) as client:
        await bc.stream_completion(client, {"prompt": "1+1=", "max_tokens": 2, "stream": True})
    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(c) for c in range(concurrency)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        **bc.latency_summary(results),
    }


FULL_GC = (
    'premoe_gc_pause_seconds_count{generation="2"}',
    'premoe_gc_pause_seconds_sum{generation="2"}',
)


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) so far of each thread of process `pid`, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def cpu_per_token(pid: int, before: dict[int, float], tokens: int) -> dict[str, float]:
    """Microseconds of server CPU per generated token since `before`: the main thread (uvicorn's
    event loop: HTTP parsing and streaming) and every other thread (engine, torch)."""
    after = thread_cpu_s(pid)
    spent = {tid: s - before.get(tid, 0.0) for tid, s in after.items()}
    loop = spent.pop(pid, 0.0)
    scale = 1e6 / max(tokens, 1)
    return {"loop_us_per_token": loop * scale, "other_us_per_token": sum(spent.values()) * scale}


def step_modes(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith(("premoe_steps_total", "premoe_swaps_total", *FULL_GC)):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def served(url: str) -> dict[str, Any]:
    """What /health says about memory: mode, resident bytes, KV slots and bytes."""
    h = httpx.get(url + "/health", timeout=10).json()
    keys = ("patterns_mode", "resident_experts_per_layer", "resident_bytes", "kv_slots", "kv_bytes")
    return {k: h.get(k) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests-per-client", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    extra = {
        "mixed": [],
        "swap": ["--mixed", "off"],
        "batch": ["--scheduler", "batch"],
        "mixed-nometer": ["--no-meter"],  # dropped mass not measured (issue #18's cost)
        "swap-nometer": ["--mixed", "off", "--no-meter"],
        "mixed-nofreeze": ["--no-gc-freeze"],  # start-up objects left in the GC's full passes
    }
    ap.add_argument("--settings", nargs="+", default=["mixed", "swap"], choices=list(extra))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    max_batch = max(args.concurrency)
    runs = []
    for setting in args.settings:
        port = bc.free_port()
        proc = start_server(port, extra[setting], max_batch)
        url = f"http://127.0.0.1:{port}"
        try:
            for conc in args.concurrency:
                before = step_modes(url)
                load0 = os.getloadavg()[0]
                cpu0 = thread_cpu_s(proc.pid)
                res = asyncio.run(workload(url, conc, args.requests_per_client, args.max_tokens))
                res["server_cpu"] = cpu_per_token(proc.pid, cpu0, res["tokens"])
                after = step_modes(url)
                res["setting"] = setting
                res["server"] = served(url)
                res["load_avg_1min"] = [load0, os.getloadavg()[0]]  # before, after
                res["metrics_delta"] = {k: after[k] - before.get(k, 0.0) for k in after}
                runs.append(res)
                print(f"{setting} c={conc}: {res['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(30)
    base = {r["setting"]: r["tokens_per_s"] for r in runs if r["concurrency"] == 1}
    rows = []
    for r in runs:
        d = r["metrics_delta"]
        rows.append(
            [
                r["setting"],
                r["concurrency"],
                f"{r['ok']}/{r['requests']}",
                f"{r['server']['resident_bytes'] / 2**20:.1f}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['tokens_per_s'] / base[r['setting']]:.2f}" if r["setting"] in base else "",
                bc.ms(r["latency_p50_s"]),
                bc.ms(r["latency_p99_s"]),
                bc.ms(r["ttft_p50_s"]),
                bc.ms(r["ttft_p99_s"]),
                f"{r['ttft_measured']}/{r['ok']}",
                int(d.get('premoe_steps_total{mode="mixed"}', 0)),
                int(d.get('premoe_steps_total{mode="single"}', 0)),
                int(d.get("premoe_swaps_total", 0)),
                f"{r['server_cpu']['loop_us_per_token']:.0f}",
                f"{r['server_cpu']['other_us_per_token']:.0f}",
                f"{d.get(FULL_GC[0], 0):.0f} ({1e3 * d.get(FULL_GC[1], 0):.0f} ms)",
            ]
        )
    bc.print_table(
        [
            "setting",
            "conc",
            "ok",
            "resident MiB",
            "tokens/s",
            "/ conc 1",
            "p50 ms",
            "p99 ms",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "TTFT n",
            "mixed steps",
            "single steps",
            "swaps",
            "HTTP loop CPU µs/token",
            "engine CPU µs/token",
            "full GC passes",
        ],
        rows,
    )
    if args.out is not None:
        bc.write_json(args.out, {"runs": runs, "args": vars(args) | {"out": str(args.out)}})


if __name__ == "__main__":
    main()
