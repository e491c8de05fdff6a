"""The real `premoe serve` in a subprocess, over HTTP (httpx and the openai client).

Every generated text is checked against `generate(do_sample=False)` of the pruned checkpoint
that `premoe export` writes for the pattern that served the request.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from premoe.demo.tasks import generate
from tests.serve.conftest import API_KEY, MAX_LEN, PATTERNS, TASKS, Server, ServeWorld

MAX_NEW = 12


def prompts_for(world: ServeWorld, n: int = 3) -> list[str]:
    """Eval prompts of both tasks; asserts that the patterns disagree on some of them, so that a
    request decoded with the wrong experts would be caught."""
    prompts = [r["prompt"] for demo in TASKS.values() for r in generate(demo, n, 1, "eval")]
    differ = [p for p in prompts if len({world.greedy(t, p, MAX_NEW) for t in PATTERNS}) > 1]
    assert len(differ) >= 2, "the tiny patterns give identical text: the test could not fail"
    return prompts


def sse_events(lines: list[str]) -> list[Any]:
    out: list[Any] = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def stream(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[str, list[Any], str]:
    """(joined text, events, X-Premoe-Task header) of a streamed request."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        task = r.headers["x-premoe-task"]
        events = sse_events(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    if path.endswith("chat/completions"):
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        text = "".join(d.get("content") or "" for d in deltas)
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    return text, chunks, task


def test_health_and_models(server: Server) -> None:
    r = httpx.get(server.url + "/health")  # no key needed for probes
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert set(r.json()["patterns"]) == set(PATTERNS)
    with server.client() as c:
        models = c.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "model"
    assert set(models["data"][0]["premoe"]["patterns"]) == set(PATTERNS)


def test_mixed_concurrent_requests_match_exported_checkpoints(
    server: Server, serve_world: ServeWorld
) -> None:
    prompts = prompts_for(serve_world)
    swaps_before = server.metrics().get("premoe_swaps_total", 0.0)
    jobs: list[tuple[str, str | None]] = []
    for i, p in enumerate(prompts):
        jobs.append((p, PATTERNS[i % len(PATTERNS)]))  # named patterns, interleaved
        jobs.append((p, None))  # routed by the prompt

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers(), timeout=60.0
        ) as c:
            reqs = []
            for prompt, task in jobs:
                body: dict[str, Any] = {"prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0}
                if task is not None:
                    body["premoe"] = {"task": task}
                reqs.append(c.post("/v1/completions", json=body))
            return list(await asyncio.gather(*reqs))

    responses = asyncio.run(run())
    served = set()
    for (prompt, task), r in zip(jobs, responses, strict=True):
        assert r.status_code == 200, r.text
        data = r.json()
        info = data["premoe"]
        assert r.headers["x-premoe-task"] == info["task"]
        assert info["dropped_mass"] is not None and info["switches"] == []  # metered
        if task is not None:
            route = {k: info[k] for k in ("task", "similarity", "fallback", "routed", "routers")}
            assert route == {
                "task": task,
                "similarity": None,
                "fallback": False,
                "routed": False,
                "routers": "source",  # the store has no calibrated routers
            }
        else:
            assert info["routed"] is True and info["task"] in PATTERNS
            assert isinstance(info["similarity"], float)
        served.add(info["task"])
        expected = serve_world.greedy(info["task"], prompt, MAX_NEW)
        assert data["choices"][0]["text"] == expected, (prompt, info)
        assert data["usage"]["prompt_tokens"] == len(serve_world.tokenizer(prompt)["input_ids"])
    assert served >= {"math", "code", "__global__"}
    m = server.metrics()
    # the patterns' union is resident: rows of different patterns share decode steps, no swaps
    assert m["premoe_swaps_total"] == swaps_before
    assert m['premoe_steps_total{mode="mixed"}'] > 0
    for t in ("math", "code", "__global__"):
        assert m[f'premoe_requests_total{{task="{t}",endpoint="completions",status="ok"}}'] >= 1
        assert m[f'premoe_generated_tokens_total{{task="{t}"}}'] > 0
    assert m["premoe_running_requests"] == 0 and m["premoe_queue_depth"] == 0
    assert "premoe_request_latency_seconds_bucket" in "".join(m)


def test_streaming_equals_non_streaming(server: Server, serve_world: ServeWorld) -> None:
    prompts = prompts_for(serve_world)[:3]
    with server.client() as c:
        for prompt, task in zip(prompts, PATTERNS, strict=False):
            body = {"prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0}
            body["premoe"] = {"task": task}
            whole = c.post("/v1/completions", json=body).json()
            text, chunks, header = stream(c, "/v1/completions", body)
            assert header == task
            assert text == whole["choices"][0]["text"] == serve_world.greedy(task, prompt, MAX_NEW)
            assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
            assert all(ch["premoe"]["task"] == task for ch in chunks)
            assert all(ch["id"] == chunks[0]["id"] for ch in chunks)

            messages = [{"role": "user", "content": prompt}]
            chat_body = {"messages": messages, "max_tokens": MAX_NEW, "temperature": 0}
            chat_body["premoe"] = {"task": task}
            chat = c.post("/v1/chat/completions", json=chat_body).json()
            ctext, cchunks, _ = stream(c, "/v1/chat/completions", chat_body)
            assert cchunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert ctext == chat["choices"][0]["message"]["content"]
            assert ctext == serve_world.greedy_chat(task, messages, MAX_NEW)
            assert chat["object"] == "chat.completion"
            assert cchunks[-1]["object"] == "chat.completion.chunk"


def test_stream_usage_option(server: Server) -> None:
    body = {"prompt": "12+3=", "max_tokens": 5, "temperature": 0, "premoe": {"task": "math"}}
    body["stream_options"] = {"include_usage": True}
    with server.client() as c:
        _, chunks, _ = stream(c, "/v1/completions", body)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 6


def test_stop_strings_and_sampling(server: Server, serve_world: ServeWorld) -> None:
    prompt = prompts_for(serve_world)[0]
    ref = serve_world.greedy("code", prompt, MAX_NEW)
    stop = next(ref[i : i + 2] for i in range(2, len(ref) - 2) if ref.find(ref[i : i + 2]) == i)
    want = ref[: ref.find(stop)]
    body = {"prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "stop": [stop, "\x00z"]}
    body["premoe"] = {"task": "code"}
    with server.client() as c:
        r = c.post("/v1/completions", json=body).json()
        assert r["choices"][0]["text"] == want and r["choices"][0]["finish_reason"] == "stop"
        text, chunks, _ = stream(c, "/v1/completions", body)
        assert text == want and chunks[-1]["choices"][0]["finish_reason"] == "stop"
        # seeded sampling is reproducible; different seeds explore
        sample = {"prompt": prompt, "max_tokens": 16, "temperature": 1.5, "top_p": 0.95}
        sample["premoe"] = {"task": "math"}
        a = [c.post("/v1/completions", json={**sample, "seed": 7}).json() for _ in range(2)]
        assert a[0]["choices"][0]["text"] == a[1]["choices"][0]["text"]
        others = {
            c.post("/v1/completions", json={**sample, "seed": s}).json()["choices"][0]["text"]
            for s in range(5)
        }
        assert len(others) > 1


def test_openai_client(server: Server, serve_world: ServeWorld) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    prompt = prompts_for(serve_world)[1]
    for task in ("math", "code"):
        extra = {"premoe": {"task": task}}
        raw = client.completions.with_raw_response.create(
            model="model", prompt=prompt, max_tokens=MAX_NEW, temperature=0, extra_body=extra
        )
        assert raw.headers["x-premoe-task"] == task
        resp = raw.parse()
        assert resp.choices[0].text == serve_world.greedy(task, prompt, MAX_NEW)
        assert resp.model_extra["premoe"]["task"] == task
        chunks = client.completions.create(
            model="model",
            prompt=prompt,
            max_tokens=MAX_NEW,
            temperature=0,
            stream=True,
            extra_body=extra,
        )
        assert "".join(ch.choices[0].text for ch in chunks) == resp.choices[0].text
        messages = [{"role": "user", "content": prompt}]
        chat = client.chat.completions.create(
            model="model", messages=messages, max_tokens=MAX_NEW, temperature=0, extra_body=extra
        )
        want = serve_world.greedy_chat(task, messages, MAX_NEW)
        assert chat.choices[0].message.content == want
        parts = client.chat.completions.create(
            model="model",
            messages=messages,
            max_tokens=MAX_NEW,
            temperature=0,
            stream=True,
            extra_body=extra,
        )
        assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="model", prompt="hi", max_tokens=2)


# ---- bad input and abuse -------------------------------------------------------------------------

OK = {"prompt": "12+3=", "max_tokens": 4, "temperature": 0}
CHAT_OK = {"messages": [{"role": "user", "content": "ab>"}], "max_tokens": 4}
BAD_BODIES: list[tuple[str, dict[str, Any], int, str | None, str | None]] = [
    # path, body, status, param, code
    ("/v1/completions", {"prompt": 5}, 400, "prompt", None),
    ("/v1/completions", {**OK, "max_tokens": "10"}, 400, "max_tokens", None),
    ("/v1/completions", {**OK, "max_tokens": 2.5}, 400, "max_tokens", None),
    ("/v1/completions", {**OK, "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {**OK, "temperature": "hot"}, 400, "temperature", None),
    ("/v1/completions", {**OK, "temperature": 5}, 400, "temperature", None),
    ("/v1/completions", {**OK, "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {**OK, "stream": "yes"}, 400, "stream", None),
    ("/v1/completions", {**OK, "seed": 2**70}, 400, "seed", None),
    ("/v1/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("/v1/completions", {**OK, "n": 17}, 400, "n", None),
    ("/v1/completions", {**OK, "frequency_penalty": 3.0}, 400, "frequency_penalty", None),
    ("/v1/completions", {**OK, "logprobs": 21}, 400, "logprobs", None),
    ("/v1/completions", {**OK, "top_k": -2}, 400, "top_k", None),
    ("/v1/completions", {**OK, "min_p": 1.5}, 400, "min_p", None),
    ("/v1/completions", {**OK, "repetition_penalty": 0}, 400, "repetition_penalty", None),
    ("/v1/completions", {**OK, "stop_token_ids": [-1]}, 400, "stop_token_ids.0", None),
    ("/v1/completions", {**OK, "logit_bias": {"1": 5}}, 400, "logit_bias", None),
    ("/v1/chat/completions", {**CHAT_OK, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("/v1/completions", {**OK, "best_of": 2}, 400, "best_of", None),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", None),
    ("/v1/completions", {**OK, "premoe": {"task": 3}}, 400, "premoe.task", None),
    ("/v1/completions", {**OK, "premoe": {"task": "nope"}}, 400, "premoe.task", "unknown_pattern"),
    (
        "/v1/completions",
        {**OK, "max_tokens": 10**9},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    ("/v1/completions", {**OK, "prompt": "x" * (MAX_LEN + 40)}, 400, "prompt", None),
    ("/v1/completions", {**OK, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None, None),
    ("/v1/chat/completions", {**CHAT_OK, "max_completion_tokens": -1}, 400, None, None),
]


def assert_openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


def test_bad_input_gets_4xx_and_server_keeps_serving(server: Server) -> None:
    with server.client() as c:
        for path, body, status, param, code in BAD_BODIES:
            err = assert_openai_error(c.post(path, json=body), status)
            if param is not None:
                assert err["param"] == param, (body, err)
            if code is not None:
                assert err["code"] == code, (body, err)
        # malformed JSON, a JSON array, NaN, a body over the limit, an unknown route
        for raw in (b'{"prompt": "x",', b"[1, 2]", b'{"prompt": "x", "temperature": NaN}', b"\xff"):
            assert_openai_error(c.post("/v1/completions", content=raw), 400)
        big = json.dumps({**OK, "prompt": "y" * 70_000}).encode()
        assert_openai_error(c.post("/v1/completions", content=big), 413)
        assert_openai_error(c.get("/v1/nothing"), 404)
        assert_openai_error(c.get("/v1/completions"), 405)
        r = c.post("/v1/completions", json=OK)
        assert r.status_code == 200
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    m = server.metrics()
    assert m['premoe_request_errors_total{code="400",type="invalid_request_error"}'] >= 20


def test_api_key(server: Server) -> None:
    r = httpx.post(server.url + "/v1/completions", json=OK)
    assert assert_openai_error(r, 401)["code"] == "missing_api_key"
    r = httpx.post(
        server.url + "/v1/completions", json=OK, headers={"Authorization": "Bearer nope"}
    )
    assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/metrics", headers={"Authorization": "Basic abc"})
    assert_openai_error(r, 401)
    assert httpx.get(server.url + "/health").status_code == 200


def long_prompt(server: Server, serve_world: ServeWorld, task: str) -> tuple[str, int]:
    """A prompt whose greedy answer runs to max_tokens without an end-of-sequence."""
    with server.client() as c:
        for r in generate("reverse", 8, 3, "eval"):
            prompt = r["prompt"]
            n = MAX_LEN - len(serve_world.tokenizer(prompt)["input_ids"])
            body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "premoe": {"task": task}}
            out = c.post("/v1/completions", json=body).json()
            if out["usage"]["completion_tokens"] == n:
                return prompt, n
    pytest.fail("no prompt decodes to max_tokens")


def test_client_disconnect_mid_stream_frees_its_slot(
    server: Server, serve_world: ServeWorld
) -> None:
    task = "math"
    prompt, n = long_prompt(server, serve_world, task)
    key = f'premoe_requests_total{{task="{task}",endpoint="completions",status="cancelled"}}'
    before = server.metrics()
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "premoe": {"task": task}}
    body["stream"] = True
    with server.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one token arrived; leave
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = server.metrics()
        if after.get(key, 0) > before.get(key, 0) and after["premoe_running_requests"] == 0:
            break
        time.sleep(0.05)
    assert after.get(key, 0) == before.get(key, 0) + 1, server.log_text()[-2000:]
    tokens = f'premoe_generated_tokens_total{{task="{task}"}}'
    assert after[tokens] - before[tokens] < n  # decoding stopped early
    assert after["premoe_running_requests"] == 0 and after["premoe_queue_depth"] == 0
    with server.client() as c:  # and the server keeps serving
        assert c.post("/v1/completions", json=OK).status_code == 200
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_openapi_describes_request_bodies(server: Server) -> None:
    with server.client() as c:
        doc = c.get("/openapi.json").json()
    assert httpx.get(server.url + "/openapi.json").status_code == 401  # behind the key
    schemas = doc["components"]["schemas"]
    for path, model in (
        ("/v1/completions", "CompletionRequest"),
        ("/v1/chat/completions", "ChatCompletionRequest"),
    ):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"] == f"#/components/schemas/{model}"
        props = schemas[model]["properties"]
        for field in ("max_tokens", "top_k", "min_p", "repetition_penalty", "logprobs", "n"):
            assert field in props, (model, field)
    assert "ChatMessage" in schemas
