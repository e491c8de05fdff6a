"""Abuse without a key (issue #13): half-open connections, slow bodies, hostile JSON, and a
graceful SIGTERM, against the real server in a subprocess on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.serve.conftest import API_KEY, Server, ServeWorld, start_server, stop_server

OK = {"prompt": "12+3=", "max_tokens": 4, "temperature": 0}
HALF_OPEN = 150  # > uvicorn's old limit_concurrency of max(64, 4 * --max-queue 16)
PER_CLIENT = 200
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def guarded(serve_world: ServeWorld) -> Iterator[Server]:
    srv = start_server(
        serve_world,
        "--api-key",
        API_KEY,
        "--max-queue",
        "16",
        "--header-timeout",
        "3",
        "--body-timeout",
        "1",
        "--max-pending-per-client",
        str(PER_CLIENT),
        "--max-batch",
        "1",
        "--shutdown-timeout",
        "1",
    )
    yield srv
    stop_server(srv)


def _port(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _half_open(port: int, n: int, payload: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(payload)
        socks.append(s)
    return socks


def _closed_by_server(s: socket.socket, within: float) -> bool:
    """True when the server closes `s` (EOF or reset) within `within` seconds."""
    deadline = time.monotonic() + within
    try:
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            if s.recv(4096) == b"":
                return True
    except TimeoutError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    return False


def _answers_within(server: Server, seconds: float) -> None:
    t0 = time.monotonic()
    r = httpx.get(server.url + "/health", timeout=seconds)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok"
    with server.client(timeout=seconds) as c:
        r = c.post("/v1/completions", json=OK)
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < seconds + 1.0


def test_half_open_connections_do_not_block_health_or_requests(guarded: Server) -> None:
    socks = _half_open(_port(guarded), HALF_OPEN, b"GET /health HTTP/1.1\r\nHost: x\r\n")
    try:
        _answers_within(guarded, 1.0)
        # the header timeout (3 s) closes them
        assert all(_closed_by_server(s, 5.0) for s in socks[:5])
    finally:
        for s in socks:
            s.close()


def test_slow_body_is_cut_and_does_not_block(guarded: Server) -> None:
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    socks = _half_open(_port(guarded), 40, head + b'{"prompt": "')
    try:
        _answers_within(guarded, 1.0)
        t0 = time.monotonic()
        assert _closed_by_server(socks[0], 4.0)
        assert time.monotonic() - t0 < 4.0
    finally:
        for s in socks:
            s.close()


def test_pending_connections_per_client_are_capped(guarded: Server) -> None:
    port = _port(guarded)
    t0 = time.monotonic()
    socks = _half_open(port, PER_CLIENT + 20, b"GET /health HTTP/1.1\r\n")
    try:
        # a burst over the cap is not cut while young (a real client's burst survives) ...
        assert not any(_closed_by_server(s, 0.05) for s in socks[:3])
        time.sleep(max(0.0, t0 + 1.2 - time.monotonic()))
        # ... but once they are older than a second, each newcomer closes the oldest
        socks += _half_open(port, 1, b"GET /health HTTP/1.1\r\n")
        left = t0 + 2.8 - time.monotonic()  # before the 3 s header timeout
        assert all(_closed_by_server(s, max(0.01, left)) for s in socks[:21])
        assert not any(_closed_by_server(s, 0.05) for s in socks[-4:])
        _answers_within(guarded, 1.0)
    finally:
        for s in socks:
            s.close()


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def _answer(s: socket.socket) -> bytes:
    """The status line of one response on the kept-alive socket `s` (reads the whole response);
    ConnectionError when the server closed it."""
    s.settimeout(5)
    data = b""

    def more() -> bytes:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    while b"\r\n\r\n" not in data:
        data += more()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = int(next(h for h in lines if h.lower().startswith(b"content-length:"))[15:])
    while len(body) < length:
        body += more()
    return lines[0]


def test_an_idle_kept_alive_connection_outlives_the_header_timeout(guarded: Server) -> None:
    # a client pool reuses a connection after idling up to its own expiry (httpx: 5 s); closing
    # it at the header timeout (3 s here) instead lost requests to resets under load
    with socket.create_connection(("127.0.0.1", _port(guarded)), timeout=5) as s:
        s.sendall(HEALTH)
        assert _answer(s).endswith(b"200 OK")
        time.sleep(3.5)
        s.sendall(HEALTH)
        assert _answer(s).endswith(b"200 OK")


def test_a_slow_head_on_a_kept_alive_connection_is_cut(guarded: Server) -> None:
    with socket.create_connection(("127.0.0.1", _port(guarded)), timeout=5) as s:
        s.sendall(HEALTH)
        assert _answer(s).endswith(b"200 OK")
        time.sleep(0.5)
        t0 = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\n")  # and nothing more: the header clock runs
        assert _closed_by_server(s, 5.0)
        assert 2.5 < time.monotonic() - t0 < 4.5


def test_health_without_key_hides_paths(guarded: Server, serve_world: ServeWorld) -> None:
    public = httpx.get(guarded.url + "/health").json()
    assert public["status"] == "ok" and "patterns" in public
    assert str(serve_world.root) not in json.dumps(public)
    full = httpx.get(guarded.url + "/health", headers=guarded.headers()).json()
    assert str(serve_world.model) in json.dumps(full)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"prompt": "\\ud800", "max_tokens": 2}',
        b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
    ],
    ids=["nested", "lone-surrogate", "lone-surrogate-chat"],
)
def test_hostile_json_is_400_and_keeps_the_connection(guarded: Server, raw: bytes) -> None:
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    with guarded.client() as c:
        r = c.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert r.headers.get("connection", "").lower() != "close"
        assert c.post("/v1/completions", json=OK).status_code == 200


# ---- graceful shutdown --------------------------------------------------------------------------


async def _stream(url: str, body: dict[str, Any], started: asyncio.Event) -> list[Any]:
    events: list[Any] = []
    async with (
        httpx.AsyncClient(base_url=url, timeout=60, headers=AUTH) as c,
        c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200
        started.set()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_sigterm_ends_every_stream_and_exits_zero(guarded: Server) -> None:
    """Runs last: it stops the module's server (--max-batch 1 --shutdown-timeout 1)."""
    srv = guarded
    body = {"prompt": "ab>", "max_tokens": 200, "temperature": 0.7, "seed": 1}

    async def run() -> list[list[Any]]:
        flags = [asyncio.Event() for _ in range(12)]
        tasks = [asyncio.create_task(_stream(srv.url, body, f)) for f in flags]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 30)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        out = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert time.monotonic() - t0 < 1 + 5
        return out

    results = asyncio.run(run())
    code = srv.proc.wait(15)
    assert code == 0, srv.log_text()[-2000:]
    cut = 0
    for events in results:
        assert events and events[-1] == "[DONE]", events[-3:]
        last = events[-2]
        if "error" in last:
            assert last["error"]["code"] == "shutting_down"
            cut += 1
        else:
            assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert cut >= 1  # one row at a time: most were still waiting when the timeout ran out
