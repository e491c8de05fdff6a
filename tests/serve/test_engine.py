"""The engine in process: every request is decoded with its own pattern's experts, a failing
request fails alone, a full queue refuses with 429, shutdown answers what is left."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from premoe.serve import Engine, EngineConfig, RequestError, RouteInfo, SamplingParams
from premoe.serve.app import _error_response
from premoe.serve.continuous import ContinuousDecoder
from premoe.serve.engine import GenRequest
from tests.serve.conftest import KEEP, ServeWorld


def router(prompt: str) -> RouteInfo:
    """Routes by the first character; a prompt starting with '!' makes routing fail."""
    if prompt.startswith("!"):
        raise RuntimeError("router exploded")
    task = "math" if prompt[0].isdigit() else "code" if prompt[0].islower() else "__global__"
    return RouteInfo(task, 1.0, False, True)


MODES = {
    "mixed": {},  # continuous batching, the patterns' union resident, per-row router masks
    "swap": {"mixed": "off"},  # continuous batching, one pattern resident, swaps between them
    "batch": {"scheduler": "batch"},  # one batch per pattern at a time
}


def cpu_config(serve_world: ServeWorld, **kw: Any) -> EngineConfig:
    """The serve world's model and store on the CPU in fp32, with `kw`."""
    return EngineConfig(
        model=str(serve_world.model),
        store=str(serve_world.store),
        keep=KEEP,
        device="cpu",
        dtype="fp32",
        **kw,
    )


@pytest.fixture(scope="module", params=list(MODES))
def engine(serve_world: ServeWorld, request: pytest.FixtureRequest) -> Iterator[Engine]:
    cfg = cpu_config(serve_world, **MODES[request.param], max_batch=3, max_wait_ms=10, max_queue=64)
    eng = Engine(cfg, router=router)
    eng.start()
    yield eng
    eng.stop()


async def collect(req: GenRequest) -> tuple[str, str | RequestError]:
    text = ""
    while True:
        kind, value = await asyncio.wait_for(req.next_event(), 60)
        if kind == "delta":
            text += value
        elif kind in ("finish", "error"):
            return text, value


def submit(engine: Engine, prompt: str, task: str | None = None, n: int = 6) -> GenRequest:
    ids = engine.encode_prompt(prompt)
    return engine.submit(ids, prompt, SamplingParams(max_tokens=n), task=task)


def test_every_request_decoded_with_its_own_pattern(
    engine: Engine, serve_world: ServeWorld
) -> None:
    prompts = ["12+3=", "abc>", "QDK:", "7+70=", "zz>", "AB:", "1+1=", "q>"]

    async def run() -> list[tuple[GenRequest, Any]]:
        reqs = []
        for i, p in enumerate(prompts * 2):
            reqs.append(submit(engine, p, task=None if i % 3 else "__global__"))
        outs = await asyncio.gather(*(collect(r) for r in reqs))
        return list(zip(reqs, outs, strict=True))

    swaps = engine.metrics.swaps.value()
    steps = engine.metrics.step_seconds.count()
    done = asyncio.run(run())
    for req, (_, reason) in done:
        assert reason in ("stop", "length"), reason
        assert req.served_keep is not None
        assert req.served_keep == engine.patterns[req.task]  # the invariant
        if req.route.routed:
            assert req.task == router(req.prompt_text).task
    mixed = engine.info["patterns_mode"] == "mixed"
    assert (engine.metrics.swaps.value() > swaps) != mixed
    if engine.cont is not None:
        assert engine.metrics.steps.value(mode="mixed" if mixed else "single") > 0
    assert engine.metrics.step_seconds.count() > steps  # decode steps are timed
    for req, (text, _) in done[:3]:
        assert text == serve_world.greedy(req.task, req.prompt_text, 6)
    assert engine.alive and engine.health()["queue_depth"] == 0


def test_a_failing_request_fails_alone(engine: Engine) -> None:
    async def run() -> list[Any]:
        reqs = [submit(engine, p) for p in ("12+3=", "!boom", "abc>")]
        return list(await asyncio.gather(*(collect(r) for r in reqs)))

    (_, a), (_, b), (_, c) = asyncio.run(run())
    assert a in ("stop", "length") and c in ("stop", "length")
    assert isinstance(b, RequestError) and b.status == 500 and "router exploded" in b.message
    assert engine.alive


def test_full_queue_refuses_with_429(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.config, "max_queue", 4)

    async def run() -> tuple[list[GenRequest], list[RequestError]]:
        accepted, refused = [], []
        for i in range(40):
            try:
                accepted.append(submit(engine, f"{i}+1=", task="math"))
            except RequestError as err:
                refused.append(err)
        await asyncio.gather(*(collect(r) for r in accepted))
        return accepted, refused

    accepted, refused = asyncio.run(run())
    assert refused and all(e.status == 429 and e.code == "queue_full" for e in refused)
    assert len(accepted) >= engine.config.max_queue
    assert engine.health()["queue_depth"] == 0


def test_unknown_pattern_and_context_window(engine: Engine) -> None:
    async def run() -> None:
        with pytest.raises(RequestError) as info:
            submit(engine, "1+1=", task="poetry")
        assert info.value.code == "unknown_pattern" and info.value.status == 400

    asyncio.run(run())
    with pytest.raises(RequestError) as info:
        engine.resolve_max_tokens(10, engine.max_model_len, None)
    assert info.value.code == "context_length_exceeded"
    assert engine.resolve_max_tokens(10, None, None) == engine.max_model_len - 10
    assert engine.resolve_max_tokens(10, None, 16) == 16


def test_health_is_not_ready_during_warm_up(
    serve_world: ServeWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    run = ContinuousDecoder.run

    def slow_run(self: ContinuousDecoder, rows: Any) -> None:
        gate.wait(10)
        run(self, rows)

    monkeypatch.setattr(ContinuousDecoder, "run", slow_run)
    eng = Engine(cpu_config(serve_world, warmup=True), router=router)
    eng.start()
    try:
        assert eng.health()["status"] == "warming_up"
        gate.set()
        assert eng.warm.wait(30)
        assert eng.health()["status"] == "ok"
    finally:
        gate.set()
        eng.stop()


def test_backpressure_answers_carry_retry_after() -> None:
    busy = _error_response(RequestError("busy", 429, "rate_limit_error", code="queue_full"))
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert _error_response(RequestError("bye", 503, "server_error")).headers["retry-after"]
    assert "retry-after" not in _error_response(RequestError("bad", 400)).headers


@pytest.mark.parametrize("freeze", [True, False])
def test_start_up_objects_leave_the_collectors_full_passes(
    serve_world: ServeWorld, freeze: bool
) -> None:
    import gc

    before = gc.get_freeze_count()  # another engine of this process may hold some
    eng = Engine(cpu_config(serve_world, freeze_gc=freeze), router=router)
    eng.start()
    try:
        assert eng.warm.wait(60)
        model = eng.cont.model if eng.cont is not None else None
        frozen = gc.get_freeze_count()
        if freeze:  # the model's modules are in the permanent generation
            assert frozen > before + 1000 and model is not None
            assert not any(o is model for o in gc.get_objects(generation=2))
        else:
            assert frozen == before
    finally:
        eng.stop()
    if freeze:
        assert gc.get_freeze_count() == 0  # stop() gives them back
