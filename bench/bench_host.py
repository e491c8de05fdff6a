"""Benchmark: the serving host's work per generated token (issue #17), on this machine's CPU.

Under load the server's Python time per token decides how many rows a decode step can carry
before the host, not the device, sets its pace (the engine thread and the HTTP event loop share
one GIL). Three pieces of it, each measured both ways side by side:

- incremental detokenization (`premoe.serve.decode.TextStream.push`): `tokenizers`' Rust
  DecodeStream against the Python prefix window (two `decode` calls per token), for the bundled
  demo tokenizer and two hub-style tokenizers built locally (a GPT-2/Qwen-style byte-level BPE, a
  Llama/Mistral-style SentencePiece BPE with byte fallback);
- one streamed SSE chunk (`premoe.serve.app`): the chunk serialized once as a template and its
  text filled in, against building and JSON-encoding the whole chunk;
- a stream's wait for its next events on the event loop: a plain await (the server listens for
  the client's disconnect itself), against `asyncio.wait_for` with the disconnect-poll timeout
  (on Python 3.11 a task and a timer per chunk).

The whole server's CPU per token (event loop and engine threads) under concurrent clients is
`bench_serve_cpu.py`'s.

    python bench/bench_host.py --out bench/results/host_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import time
from functools import partial
from typing import Any

import _common as bc

from premoe.demo.tasks import build_tokenizer
from premoe.serve.app import DISCONNECT_POLL_S, _sse, _sse_template
from premoe.serve.decode import TextStream
from premoe.serve.schemas import completion_chunk
from tests.hub_tokenizers import CORPUS, hub_tokenizer


def per_call_us(fn: Any, calls: int, repeats: int) -> float:
    """Median over `repeats` of the microseconds per call of `fn()`, which makes `calls` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) / calls)
    return 1e6 * sorted(times)[len(times) // 2]


def detokenize(tok: Any, ids: list[int], rust: bool) -> str:
    s = TextStream(tok, [], eos_ids=set())
    if not rust:
        s._stream = None
    return "".join(s.push(i) for i in ids) + s.finish("length")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512, help="Tokens per detokenized stream.")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    rows, results = [], []
    tokenizers = {
        "demo (chars)": build_tokenizer(1 << 20),
        "byte-level BPE": hub_tokenizer("byte_level_bpe"),
        "SentencePiece BPE, byte fallback": hub_tokenizer("metaspace_byte_fallback"),
    }
    text = " ".join(CORPUS)
    for name, tok in tokenizers.items():
        ids = tok(text, add_special_tokens=False)["input_ids"][: args.tokens]
        assert (
            detokenize(tok, ids, True)
            == detokenize(tok, ids, False)
            == tok.decode(ids, skip_special_tokens=True)
        )
        rust, window = (
            per_call_us(partial(detokenize, tok, ids, r), len(ids), args.repeats)
            for r in (True, False)
        )
        results.append(
            {"tokenizer": name, "tokens": len(ids), "rust_us": rust, "window_us": window}
        )
        rows.append([f"detokenize, {name}", f"{window:.2f}", f"{rust:.2f}", f"{window / rust:.1f}"])

    premoe = {"task": "math", "similarity": 0.93, "routers": "calibrated"}
    chunk = partial(completion_chunk, "cmpl-0123456789abcdef", "bench-model", premoe=premoe)
    texts = [w + " " for w in text.split()][:1000]

    def full() -> None:
        for t in texts:
            _sse(chunk(t, None, created=1_700_000_000))

    def filled() -> None:
        fill = _sse_template(lambda t: chunk(t, None, created=1_700_000_000))
        for t in texts:
            fill(t)

    whole, template = (per_call_us(f, len(texts), args.repeats) for f in (full, filled))
    results.append({"sse_chunk": True, "whole_us": whole, "template_us": template})
    rows.append(
        ["SSE chunk (completions)", f"{whole:.2f}", f"{template:.2f}", f"{whole / template:.1f}"]
    )

    async def waits(timeout: float | None) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(texts)):
            queue.put_nowait(i)
        for _ in range(len(texts)):
            await (asyncio.wait_for(queue.get(), timeout) if timeout else queue.get())

    polled, plain = (
        per_call_us(lambda t=t: asyncio.run(waits(t)), len(texts), args.repeats)
        for t in (DISCONNECT_POLL_S, None)
    )
    results.append({"next_events_wait": True, "wait_for_us": polled, "await_us": plain})
    rows.append(
        [
            "wait for a stream's next events",
            f"{polled:.2f}",
            f"{plain:.2f}",
            f"{polled / plain:.1f}",
        ]
    )

    bc.print_table(
        ["per token", "before µs", "now µs", "ratio"],
        rows,
        title="serving host work per token (CPU; before: Python window, whole chunk, wait_for)",
    )
    bc.write_json(args.out, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
