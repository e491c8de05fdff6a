"""Miss-aware serving over HTTP: the real `premoe serve` of the bundled demo model (a
subprocess) hit by a real client. Every response's `premoe` object carries the request's
dropped mass (near 0 in-task, many times higher out of task); with `--miss-policy reroute` a
prompt that changes topic is switched to the new topic's pattern and then decodes exactly as a
request that named that pattern; /metrics has the histogram and the switch counter; bad values
are one-line errors. Mixed (per-row masks) and swap (one pattern resident) modes both."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from premoe.demo.tasks import generate as task_rows
from tests.helpers import assert_one_line_error, run_cli
from tests.load.test_reroute import conversation
from tests.serve.conftest import Server, ServeWorld, free_port, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "premoe" / "demo" / "model"
DEMO_STORE = ROOT / "patterns" / "demo"
TASKS = ("add", "sort", "count")  # of the demo's five; their pairs differ clearly at 32 of 64
REROUTE = ["--miss-policy", "reroute", "--miss-window", "4", "--miss-threshold", "0.1"]


@pytest.fixture(scope="module", params=["mixed", "swap"])
def demo_server(request: pytest.FixtureRequest, serve_world: ServeWorld) -> Iterator[Server]:
    mixed = "on" if request.param == "mixed" else "off"
    srv = start_server(
        serve_world,
        *REROUTE,
        "--mixed",
        mixed,
        "--max-batch",
        "4",
        model=DEMO,
        store=DEMO_STORE,
        keep=32,
    )
    with srv.client() as c:
        assert c.get("/health").json()["patterns_mode"] == request.param
    yield srv
    stop_server(srv)


def complete(server: Server, prompt: str, task: str | None = None, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}
    if task is not None:
        body["premoe"] = {"task": task}
    with server.client() as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_dropped_mass_near_zero_in_task_high_out_of_task(demo_server: Server) -> None:
    means: dict[tuple[str, str], float] = {}
    for pattern in TASKS:
        for task in TASKS:
            got = []
            for row in task_rows(task, 2, seed=11):
                mass = complete(demo_server, row["prompt"], pattern)["premoe"]["dropped_mass"]
                assert set(mass) == {"mean", "max", "tokens"} and mass["tokens"] >= 1
                assert 0.0 <= mass["mean"] <= mass["max"] + 1e-6 <= 1.0 + 1e-6
                got.append(mass["mean"])
            means[(pattern, task)] = sum(got) / len(got)
    in_task = [means[(t, t)] for t in TASKS]
    out_task = [means[(p, t)] for p in TASKS for t in TASKS if p != t]
    assert max(in_task) < 0.02, means
    assert sum(out_task) / len(out_task) > 5 * max(sum(in_task) / len(in_task), 0.01), means


def test_streaming_final_chunk_carries_the_same_dropped_mass(demo_server: Server) -> None:
    prompt = task_rows("sort", 1, seed=3)[0]["prompt"]
    plain = complete(demo_server, prompt, "add")["premoe"]
    chunks = []
    with demo_server.client() as c:
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
        body["premoe"] = {"task": "add"}
        with c.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
    last = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["finish_reason"]]
    assert len(last) == 1
    got = last[0]["premoe"]["dropped_mass"]
    assert got["tokens"] == plain["dropped_mass"]["tokens"]
    assert got["mean"] == pytest.approx(plain["dropped_mass"]["mean"], abs=1e-5)
    assert all("dropped_mass" not in ch["premoe"] for ch in chunks if ch not in last)


@pytest.mark.parametrize("first", ["reverse", "close"])
def test_reroute_follows_a_topic_change(demo_server: Server, first: str) -> None:
    prompt = conversation(first, "add")
    got = complete(demo_server, prompt, max_tokens=4)  # 3 tokens fed: no check mid-decode
    premoe = got["premoe"]
    assert premoe["task"] == first  # the whole prompt routes to the old topic
    (switch,) = premoe["switches"]
    assert (switch["at_token"], switch["from"], switch["to"]) == (0, first, "add")
    assert switch["mass"] > 0.1 and switch["reason"] == "retrieval"
    # switched on the prompt, before any token: the rest is exactly the add pattern's
    named = complete(demo_server, prompt, "add", max_tokens=4)
    assert named["premoe"]["switches"] == []  # a named pattern is kept
    assert got["choices"][0]["text"] == named["choices"][0]["text"]
    assert premoe["dropped_mass"]["tokens"] == named["premoe"]["dropped_mass"]["tokens"]
    assert premoe["dropped_mass"]["mean"] == pytest.approx(
        named["premoe"]["dropped_mass"]["mean"], abs=1e-5
    )
    metrics = demo_server.metrics()
    assert metrics[f'premoe_reroutes_total{{from="{first}",to="add"}}'] >= 1
    assert metrics['premoe_dropped_mass_count{task="add"}'] >= 2
    assert 'premoe_dropped_mass_bucket{task="add",le="0.01"}' in metrics
    assert 'premoe_dropped_mass_bucket{task="add",le="+Inf"}' in metrics


def test_no_meter_leaves_dropped_mass_out(serve_world: ServeWorld) -> None:
    srv = start_server(serve_world, "--no-meter")
    try:
        got = complete(srv, "1+2=", "math")["premoe"]
        assert got["dropped_mass"] is None and got["switches"] == []
        with srv.client() as c:
            assert c.get("/health").json()["dropped_mass_metered"] is False
    finally:
        stop_server(srv)


def test_bad_miss_options_are_one_line_errors(
    serve_world: ServeWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["serve", str(serve_world.model), "--store", str(serve_world.store), "--keep", "4"]
    base += ["--device", "cpu", "--dtype", "fp32", "--port", str(free_port())]
    cases = [
        (["--miss-threshold", "1.5"], "--miss-threshold"),
        (["--miss-threshold", "-0.1"], "--miss-threshold"),
        (["--miss-window", "0"], "--miss-window"),
        (["--miss-policy", "sometimes"], "sometimes"),
        (["--miss-policy", "fetch"], "premoe generate"),
        (["--miss-policy", "reroute", "--scheduler", "batch"], "continuous scheduler"),
    ]
    for extra, needle in cases:
        code, _, err = run_cli([*base, *extra], capsys)
        assert_one_line_error(code, err, needle)


def test_a_pattern_that_fails_again_gets_the_pooled_fallback(demo_server: Server) -> None:
    """After the switch to add, the text's windowed dropped mass stays above the threshold and
    retrieval insists on add: the request goes to the pooled pattern, once."""
    got = complete(demo_server, conversation("close", "add"), max_tokens=8)["premoe"]
    steps = [(s["at_token"], s["from"], s["to"], s["reason"]) for s in got["switches"]]
    assert steps == [(0, "close", "add", "retrieval"), (4, "add", "__global__", "fallback")]
    assert 4 <= got["dropped_mass"]["tokens"] <= 7  # 4 under add (carried over), then __global__


def test_chat_responses_carry_dropped_mass_by_default(server: Server) -> None:
    """The default server (meter on, mask): chat completions, plain and streamed."""
    body = {
        "messages": [{"role": "user", "content": "12+34="}],
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
    }
    with server.client() as c:
        plain = c.post("/v1/chat/completions", json=body).json()["premoe"]
        assert plain["dropped_mass"]["tokens"] == 5 and plain["switches"] == []
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            chunks = [
                json.loads(line[6:])
                for line in r.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"
            ]
    (last,) = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["finish_reason"]]
    assert last["premoe"]["dropped_mass"] == plain["dropped_mass"]
