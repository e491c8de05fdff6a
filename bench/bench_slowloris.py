"""Benchmark: `premoe serve` under a slowloris attack (issue #13, item 4), on 127.0.0.1.

The real server (a subprocess: the bundled demo model, the shipped store patterns/demo) is
attacked by N connections (default 1,000) that each send half a request header and then nothing;
whenever the server closes one, the attacker opens another (bounded by --duration and
--max-connects). Meanwhile a prober, in another thread, sends `GET /health` (no key) and
authenticated completions, each on a new connection, and records latency and status.

Two server settings are measured: the defaults (at most 1,024 pending connections per client
address: all N are held until the 5 s header timeout closes them) and
`--max-pending-per-client 256` (past 256, each new connection closes the client's oldest pending
one, and the attacker's reconnections churn). Targets: /health p99 < 1 s and every
authenticated request answered 200.

    python bench/bench_slowloris.py --out bench/results/slowloris_cpu.json
    python bench/bench_slowloris.py --connections 200 --duration 5   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import _common as bc
import httpx

ROOT = bc.ROOT
API_KEY = "sk-bench"


def start_server(port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    return bc.start_demo_server(port, ["--api-key", API_KEY, *extra], timeout=120)


class Attacker:
    """Holds up to `n` half-open connections; reopens closed ones (bounded)."""

    def __init__(self, port: int, n: int, duration: float, max_connects: int) -> None:
        self.port, self.n, self.duration, self.max_connects = port, n, duration, max_connects
        self.connects = 0
        self.closed_by_server = 0
        self.open_now = 0
        self.max_open = 0
        self.ready = threading.Event()
        self.stop = threading.Event()

    async def _one(self) -> None:
        while not self.stop.is_set() and self.connects < self.max_connects:
            self.connects += 1
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            self.open_now += 1
            self.max_open = max(self.max_open, self.open_now)
            try:
                while not self.stop.is_set():
                    try:
                        data = await asyncio.wait_for(reader.read(1024), 0.5)
                    except asyncio.TimeoutError:
                        continue
                    if not data:
                        self.closed_by_server += 1
                        break
            finally:
                self.open_now -= 1
                writer.close()
            await asyncio.sleep(0.01)

    async def _main(self) -> None:
        tasks = []
        for _ in range(self.n):
            tasks.append(asyncio.create_task(self._one()))
            await asyncio.sleep(0)
        await asyncio.sleep(0.5)
        self.ready.set()
        await asyncio.get_running_loop().run_in_executor(None, self.stop.wait, self.duration + 30)
        self.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    def run(self) -> None:
        asyncio.run(self._main())


def probe(url: str, duration: float) -> dict[str, Any]:
    health: list[float] = []
    health_status: list[int] = []
    gen: list[float] = []
    gen_status: list[int | str] = []
    end = time.monotonic() + duration
    i = 0
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            r = httpx.get(url + "/health", timeout=10)
            health_status.append(r.status_code)
        except httpx.HTTPError as exc:
            health_status.append(type(exc).__name__)  # type: ignore[arg-type]
        health.append(time.perf_counter() - t0)
        if i % 4 == 0:
            t0 = time.perf_counter()
            try:
                r = httpx.post(
                    url + "/v1/completions",
                    json={"prompt": "12+30=", "max_tokens": 4, "temperature": 0},
                    headers={"Authorization": f"Bearer {API_KEY}"},
                    timeout=10,
                )
                gen_status.append(r.status_code)
            except httpx.HTTPError as exc:
                gen_status.append(type(exc).__name__)
            gen.append(time.perf_counter() - t0)
        i += 1
        time.sleep(0.02)

    def q(xs: list[float], p: float) -> float:
        return statistics.quantiles(xs, n=100)[int(p) - 1] if len(xs) > 1 else xs[0]

    return {
        "health_requests": len(health),
        "health_ok": sum(1 for s in health_status if s == 200),
        "health_p50_s": q(health, 50),
        "health_p99_s": q(health, 99),
        "health_max_s": max(health),
        "auth_requests": len(gen),
        "auth_ok": sum(1 for s in gen_status if s == 200),
        "auth_success_rate": sum(1 for s in gen_status if s == 200) / max(1, len(gen)),
        "auth_p99_s": q(gen, 99),
        "statuses": sorted({str(s) for s in health_status + gen_status}),
    }


def run_case(name: str, extra: list[str], args: argparse.Namespace) -> dict[str, Any]:
    port = bc.free_port()
    proc = start_server(port, extra)
    url = f"http://127.0.0.1:{port}"
    try:
        baseline = probe(url, 2.0)
        attacker = Attacker(port, args.connections, args.duration, args.max_connects)
        thread = threading.Thread(target=attacker.run, daemon=True)
        thread.start()
        attacker.ready.wait(60)
        under = probe(url, args.duration)
        held = attacker.open_now
        attacker.stop.set()
        thread.join(60)
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "case": name,
        "server_options": extra,
        "connections": args.connections,
        "held_at_end": held,
        "max_held": attacker.max_open,
        "connects": attacker.connects,
        "closed_by_server": attacker.closed_by_server,
        "baseline": baseline,
        "under_attack": under,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds under attack")
    ap.add_argument("--max-connects", type=int, default=20000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.connections + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    cases = [
        ("defaults (1024 pending per client, 5 s header timeout)", []),
        ("--max-pending-per-client 256", ["--max-pending-per-client", "256"]),
    ]
    results = [run_case(name, extra, args) for name, extra in cases]
    rows = []
    for r in results:
        u = r["under_attack"]
        rows.append(
            [
                r["case"],
                f"{r['max_held']}",
                f"{r['closed_by_server']}",
                f"{r['baseline']['health_p99_s'] * 1e3:.1f}",
                f"{u['health_p50_s'] * 1e3:.1f}",
                f"{u['health_p99_s'] * 1e3:.1f}",
                f"{u['health_ok']}/{u['health_requests']}",
                f"{u['auth_ok']}/{u['auth_requests']} ({u['auth_success_rate']:.0%})",
            ]
        )
    bc.print_table(
        [
            "server",
            "held (max)",
            "closed by server",
            "/health p99 ms, idle",
            "/health p50 ms",
            "/health p99 ms",
            "/health 200",
            "auth 200",
        ],
        rows,
    )
    if args.out is not None:
        bc.write_json(args.out, {"results": results})


if __name__ == "__main__":
    main()
