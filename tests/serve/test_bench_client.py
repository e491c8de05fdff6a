"""The serving benches' HTTP client (bench/_common.py) against the real demo server: time to first
token is measured on a real stream (issue #17: the H200 run reported it as NaN), and the GPU
bench's tokenizer streams every generated token as text."""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))
    try:
        import _common

        yield _common
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def demo_url(bench: ModuleType) -> Iterator[str]:
    port = bench.free_port()
    proc = bench.start_demo_server(port, ["--max-batch", "4"], timeout=120)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def test_ttft_is_measured_on_a_real_stream(bench: ModuleType, demo_url: str) -> None:
    body: dict[str, Any] = {
        "prompt": "12+30=",
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "premoe": {"task": "add"},
    }

    async def run() -> list[dict[str, Any]]:
        async with bench.http_client(demo_url) as client:  # one connection: streams queue
            first = await bench.stream_completion(client, body)
            rest = await asyncio.gather(*(bench.stream_completion(client, body) for _ in range(3)))
            bad = await bench.stream_completion(client, {**body, "premoe": {"task": "nope"}})
            return [first, *rest, bad]

    *ok, bad = asyncio.run(run())
    for r in ok:
        assert r["status"] == 200 and r["tokens"] == 8 and r["chunks"] >= 1
        assert isinstance(r["ttft"], float) and 0 < r["ttft"] <= r["latency"]
    assert bad["status"] == 400 and "nope" in bad["error"]

    summary = bench.latency_summary([*ok, bad, {**ok[0], "ttft": None}])
    assert summary["ttft_measured"] == 4 and summary["ttft_missing"] == 1
    for key in ("latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s"):
        assert isinstance(summary[key], float) and not math.isnan(summary[key])
    ttfts = sorted(r["ttft"] for r in ok)
    assert ttfts[0] <= summary["ttft_p50_s"] <= summary["ttft_p99_s"] <= ttfts[-1]
    nothing = bench.latency_summary([bad])
    assert nothing["ttft_p50_s"] is None and bench.ms(nothing["ttft_p50_s"]) == "-"


def test_a_lost_connection_is_an_error_not_a_crash(bench: ModuleType) -> None:
    async def run() -> dict[str, Any]:
        url = f"http://127.0.0.1:{bench.free_port()}"  # nothing listens there
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            return await bench.stream_completion(client, {"prompt": "1", "stream": True})

    lost = asyncio.run(run())
    assert lost["status"] == 0 and lost["error"].startswith("ConnectError")
    assert bench.latency_summary([lost])["latency_p50_s"] is None


def test_gpu_bench_tokenizer_streams_every_token(bench: ModuleType, tmp_path: Path) -> None:
    """Ids past the character vocabulary decode to text (they decoded to "", so no chunk was
    streamed), and prompts still encode one token per character."""
    import bench_serve

    from premoe.demo.tasks import build_tokenizer

    tok = bench_serve.write_tokenizer(tmp_path, 1000)
    assert len(tok) == 1000
    chars = build_tokenizer()
    for i in (len(chars), 500, 999):
        assert tok.decode([i], skip_special_tokens=True) == f"<{i}>"
    assert tok("abc <12>")["input_ids"] == chars("abc <12>")["input_ids"]
