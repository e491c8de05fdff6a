"""Benchmark: `premoe serve` on a Qwen3-MoE-shaped random model that does not fit the GPU budget.

Figures (issue 6):

(a) mixed workload: requests over 2-4 patterns sent over HTTP to the real server (uvicorn in this
    process, the client in another unless `--client thread`; requests naming their pattern,
    round-robin so that the scheduler must batch by pattern and swap): tokens/s, p50/p99
    latency, swaps. Versus the same model under
    accelerate's CPU offload with the same GPU budget (`device_map="auto"`,
    `max_memory={0: budget, "cpu": ...}`), batch 1 and batch max_batch.
(b) decode tokens/s at batch 1 for one pattern / the memory-bandwidth bound (active bytes per
    token / device bandwidth measured with a large device-to-device copy), with where the time
    goes (host issue time, device wait, host work per token).
(c) the full model resident in the same engine (all experts, when it fits): pruned decode
    tokens/s / full decode tokens/s at batch 1.

Memory: the premoe engine gets `--budget` (default 10GiB) for everything it allocates, weights +
KV cache + activations; K is the largest that fits beside `--min-kv-slots` KV slots, the patterns'
union is resident (mixed mode) only if it fits too, else one pattern is (swap mode), and the KV
cache gets what the weights leave (at most `--max-batch` slots). Each workload reports the mode,
resident GiB and KV GiB. TTFT is the client's: request sent to the first streamed chunk with text
(`_common.stream_completion`); the checkpoint's tokenizer covers the whole vocabulary so that
every generated token streams as text.

The model (hidden 2048, 24 layers, 128 experts, moe_intermediate 768, top-8, 32 heads, 4 KV
heads, vocab 151936: about 16 B parameters, 32 GB in bf16) is generated on the device layer by
layer and written to disk in the hub's per-expert layout (one shard per layer), so that premoe
and accelerate both load a real checkpoint. A character tokenizer is saved with it (prompts are
random printable text). The patterns are random keep sets (seeded); routing by prompt is not
exercised (a random model has no tasks).

    python bench/bench_serve.py --device cuda --out bench/serve.json
    python bench/bench_serve.py --device cuda --checkpoint /data/q15 --keep-checkpoint ...
    python bench/bench_serve.py --smoke --out /tmp/serve_smoke.json   # tiny, CPU, ~1 min

Defaults aim at one full run in about 8 minutes on an H100/H200 (`--skip-full`,
`--skip-baseline` shorten it; `--checkpoint` reuses a checkpoint written earlier).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import multiprocessing
import random
import shutil
import string
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import _common as bc
import torch

from premoe.policy import human_bytes
from premoe.prune import KeepSets

log = logging.getLogger("bench_serve")


def say(msg: str) -> None:
    print(f"[bench_serve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the model -----------------------------------------------------------------------------------


def write_checkpoint(config: Any, folder: Path, device: torch.device) -> dict[str, Any]:
    """`_common.write_layered_checkpoint` and a character tokenizer beside it."""
    info = bc.write_layered_checkpoint(config, folder, device)
    write_tokenizer(folder, config.vocab_size)
    return info


def write_tokenizer(folder: Path, vocab_size: int) -> Any:
    """The demo's character tokenizer with its vocabulary filled up to the model's by tokens
    "<id>": every id the random model emits decodes to text, so that each generated token is a
    streamed chunk and the client sees its first token (the character tokenizer alone decodes
    ids past its ~100 characters to "", the server streamed no chunk and TTFT was not measured).
    Prompts still encode one token per character."""
    from tokenizers import models

    from premoe.demo.tasks import UNK_TOKEN, build_tokenizer

    tok = build_tokenizer(model_max_length=4096)
    backend = tok.backend_tokenizer
    vocab = dict(backend.get_vocab())
    vocab.update({f"<{i}>": i for i in range(len(vocab), vocab_size)})
    backend.model = models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN)
    tok.save_pretrained(folder)
    return tok


def active_bytes_per_token(config: Any, itemsize: int = 2) -> dict[str, int]:
    """Bytes one decode token must read at batch 1: every non-expert weight except the
    embedding table (one row), plus top-k experts in every MoE layer."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    dense = experts = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            experts += p.numel() * itemsize
        elif "embed_tokens" in name:
            dense += p.shape[-1] * itemsize
        else:
            dense += p.numel() * itemsize
    per_expert = experts // (config.num_experts * config.num_hidden_layers)
    routed = config.num_experts_per_tok * per_expert * config.num_hidden_layers
    return {"dense": dense, "routed_experts": routed, "total": dense + routed}


def measure_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device memory bandwidth (bytes/s) from a large copy: reads + writes."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    a.fill_(1)
    b.copy_(a)
    iters = 10
    with bc.DeviceTimer(device) as t:
        for _ in range(iters):
            b.copy_(a)
    del a, b
    return 2 * nbytes * iters / t.seconds


def free_memory() -> None:
    torch._dynamo.reset()  # compiled graphs hold the model they were traced with
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_host_emptyCache", None)
        if empty_host is not None:
            empty_host()


def dynamo_counters() -> dict[str, Any]:
    """torch.compile's counters: graph breaks, recompiles, CUDA graph skips (where time goes)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {k: {str(a): b for a, b in v.items()} for k, v in counters.items() if v}


def late_graphs(premoe: dict[str, Any]) -> int:
    """Graphs dynamo compiled after warm-up (during the decode and load runs)."""

    def graphs(key: str) -> int:
        return int(premoe.get(key, {}).get("stats", {}).get("unique_graphs", 0))

    return graphs("compile_counters_after_workload") - graphs("compile_counters_after_warmup")


def random_patterns(layers: list[int], experts: int, keep: int, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        out[f"task{i}"] = KeepSets.from_mapping(
            {layer: rng.sample(range(experts), keep) for layer in layers}
        )
    return out


def random_prompt(rng: random.Random, chars: int) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + " ") for _ in range(chars))


# ---- premoe: engine + HTTP server ----------------------------------------------------------------


class HttpServer:
    """`create_app` served as `premoe serve` serves it (connection guard, keep-alive) in a
    background thread of this process."""

    def __init__(self, engine: Any) -> None:
        from premoe.serve import ServerOptions, create_app
        from premoe.serve.server import make_server

        self.port = bc.free_port()
        app = create_app(engine.config, engine=engine)
        self.server = make_server(app, engine, ServerOptions(port=self.port))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def full_gc_passes(engine: Any) -> tuple[int, float]:
    """The garbage collector's full passes in this process so far, and their seconds (the
    engine times them for /metrics: premoe_gc_pause_seconds)."""
    m = engine.metrics
    m.gc_pauses.drain()
    return m.gc_pause.count(generation="2"), m.gc_pause.sum(generation="2")


def guard_counts(server: HttpServer) -> dict[str, int]:
    """Connections the server's guard has closed so far (none should be real requests)."""
    state = server.server.guard_state
    return {"evicted": state.evicted, "timed_out": state.timed_out}


CLIENTS_PER_PROCESS = 64  # one client process streams ~10^4 chunks/s at most (httpx: ~100 µs each)


def run_clients(
    url: str, jobs: list[tuple[str, str]], max_tokens: int, concurrency: int
) -> dict[str, Any]:
    """`concurrency` clients (each its own connection) stream `jobs` in this process, each
    sending its next job as its last one ends; returns their answers and the wall-clock span."""
    return asyncio.run(_run_clients(url, jobs, max_tokens, concurrency))


async def _run_clients(
    url: str, jobs: list[tuple[str, str]], max_tokens: int, concurrency: int
) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    queue = list(reversed(jobs))

    async def client_loop() -> None:
        async with bc.http_client(url) as client:
            while queue:
                prompt, task = queue.pop()
                body = {
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "premoe": {"task": task},
                }
                res = await bc.stream_completion(client, body)
                if res["status"] != 200:
                    log.warning("request failed: %s %s", res["status"], res["error"][:200])
                results.append(res)

    start = time.time()
    await asyncio.gather(*(client_loop() for _ in range(min(concurrency, len(jobs)))))
    return {"results": results, "start": start, "end": time.time()}


def warm_clients(url: str, jobs: list[tuple[str, str]], max_tokens: int) -> int:
    """A client process's first work, before any workload's clock starts: its imports, event loop
    and a few real streamed requests (a process's first ones ran ~0.4 s slower on the GPU bench:
    the first c64 workload waited on its clients, a repeat did not). Returns how many answered."""
    time.sleep(0.5)  # each process of the pool takes one call
    done = run_clients(url, jobs, max_tokens, len(jobs))["results"]
    return sum(r["status"] == 200 for r in done)


def run_workload(
    url: str,
    jobs: list[tuple[str, str]],
    max_tokens: int,
    concurrency: int,
    pool: ProcessPoolExecutor | None,
    procs: int,
) -> dict[str, Any]:
    """The workload's figures: in this process (`pool` None), or its clients split over `procs`
    processes of `pool` (job i to process i % procs), the span from the first start to the last
    end (wall clock, one host)."""
    if pool is None:
        parts = [run_clients(url, jobs, max_tokens, concurrency)]
    else:
        procs = max(1, min(procs, concurrency))
        futures = [
            pool.submit(
                run_clients, url, jobs[i::procs], max_tokens, len(range(i, concurrency, procs))
            )
            for i in range(procs)
        ]
        parts = [f.result() for f in futures]
    results = [r for part in parts for r in part["results"]]
    wall = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    summary = bc.latency_summary(results)
    kinds = Counter(f"{r['status']} {r['error'][:80]}" for r in results if r["status"] != 200)
    return {
        "requests": len(jobs),
        "client_processes": len(parts) if pool is not None else 0,
        "errors": len(results) - len(ok),
        "error_kinds": dict(kinds),
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "p50_s": summary["latency_p50_s"],
        "p99_s": summary["latency_p99_s"],
        **summary,
        "mean_s": sum(r["latency"] for r in ok) / len(ok) if ok else None,
    }


def decode_b1(engine: Any, task: str, prompt: str, tokens: int) -> dict[str, Any]:
    """Batch-1 greedy decode of `tokens` tokens for `task`, in the worker thread."""
    from premoe.serve.decode import DecodeRow, DecodeStats, NullSink, SamplingParams

    if engine.cont is not None:
        return decode_b1_continuous(engine, task, prompt, tokens)

    def run() -> dict[str, Any]:
        dec = engine.decoder
        engine._swap(task)
        ids = engine.encode_prompt(prompt)
        # decode exactly `tokens` tokens (ignore_eos); first settle: compiles (after an
        # implementation switch) and records the CUDA graph
        dec.generate([DecodeRow(ids, SamplingParams(max_tokens=4), NullSink())], ignore_eos=True)
        dec.stats = DecodeStats()
        with bc.DeviceTimer(dec.device) as t:
            row = DecodeRow(ids, SamplingParams(max_tokens=tokens), NullSink())
            dec.generate([row], ignore_eos=True)
        wall = t.seconds
        s = dec.stats
        decode_s = wall - s.prefill_s
        steps = s.decode_steps
        return {
            "task": task,
            "prompt_tokens": len(ids),
            "tokens": tokens,
            "prefill_s": s.prefill_s,
            "decode_s": decode_s,
            "decode_tokens_per_s": steps / decode_s if decode_s > 0 else 0.0,
            "per_token_ms": {
                "total": 1e3 * decode_s / max(steps, 1),
                "issue (host, launch/replay)": 1e3 * s.step_launch_s / max(steps, 1),
                "wait (device + sampling sync)": 1e3 * s.step_wait_s / max(steps, 1),
                "host (detokenize, stop, emit)": 1e3 * s.host_s / max(steps, 1),
            },
        }

    return engine.call(run)


def decode_b1_continuous(engine: Any, task: str, prompt: str, tokens: int) -> dict[str, Any]:
    """Batch-1 greedy decode of `tokens` tokens with the continuous decoder."""
    return decode_rows_continuous(engine, [(task, prompt)], tokens)


def decode_rows_continuous(
    engine: Any, rows: list[tuple[str, str]], tokens: int, profile: int = 0
) -> dict[str, Any]:
    """Greedy decode of `tokens` tokens for every (pattern, prompt) row at once, through the
    engine's continuous decoder in its worker thread (no HTTP): prefill, then the decode steps
    timed (tokens/s counts every row)."""
    from premoe.serve.decode import NullSink, SamplingParams

    def run() -> dict[str, Any]:
        cont = engine.cont
        if not engine.mixed:
            engine._swap(rows[0][0])
        ids = [engine.encode_prompt(prompt) for _, prompt in rows]
        cont.run([(NullSink(), ids[0], SamplingParams(max_tokens=4, ignore_eos=True), rows[0][0])])
        for (task, _), row_ids in zip(rows, ids, strict=True):
            cont.add(NullSink(), row_ids, SamplingParams(max_tokens=tokens, ignore_eos=True), task)
        with bc.DeviceTimer(cont.device) as t:
            while any(s.prefilling for s in cont.active()):
                cont.step()  # prefill (+ the first decode steps)
        prefill_s = t.seconds
        steps = 0
        with bc.DeviceTimer(cont.device) as t:
            while cont.active():
                steps += cont.step().decode_rows
        decode_s = t.seconds
        kv_len = max(len(i) for i in ids) + tokens
        device_ms = replay_ms(cont.graphs, len(rows), kv_len) if cont.graphs is not None else None
        kernels = None
        if profile:  # `profile` more steps of the same rows, by kernel
            for (task, _), row_ids in zip(rows, ids, strict=True):
                params = SamplingParams(max_tokens=profile + 2, ignore_eos=True)
                cont.add(NullSink(), row_ids, params, task)
            while any(s.prefilling for s in cont.active()):
                cont.step()
            kernels = bc.kernel_profile(lambda: [cont.step() for _ in range(profile)], profile)
            while cont.active():
                cont.step()
        return {
            "kernels": kernels,
            "rows": len(rows),
            "tasks": sorted({task for task, _ in rows}),
            "prompt_tokens": len(ids[0]),
            "tokens": tokens,
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "decode_tokens_per_s": steps / decode_s if decode_s > 0 else 0.0,
            "per_token_ms": {"total": 1e3 * decode_s / max(steps, 1)},
            "device_ms_per_step": device_ms,
        }

    return engine.call(run)


def replay_ms(graphs: Any, rows: int, kv_len: int, reps: int = 20) -> float | None:
    """Device milliseconds of one captured decode step of `rows` rows over `kv_len` columns:
    the graph replayed `reps` times back to back, no host work between (the step's own time,
    against which a step's wall time shows what the host adds). Only once no row is active: a
    replay writes the KV columns and the samples of the slots it covers."""
    key = (graphs.bucket(graphs.batch_buckets, rows), graphs.bucket(graphs.kv_buckets, kv_len))
    entry = graphs.graphs.get(key)
    if entry is None:
        return None
    graph = entry[0]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def make_engine(args: argparse.Namespace, ckpt: Path, patterns: dict, full: bool) -> Any:
    """The engine of the bench; pruned (not `full`), it gets --budget: its weights, KV cache and
    activations (and in mixed mode the union of the patterns) must fit the same memory."""
    from premoe.serve import Engine, EngineConfig

    cuda = args.device.startswith("cuda")
    batch = args.scheduler == "batch"
    cfg = EngineConfig(
        model=str(ckpt),
        patterns=patterns,
        budget=None if full else args.budget,
        min_kv_slots=args.min_kv_slots,
        default_task=next(iter(patterns)),
        device=args.device,
        dtype="bf16" if cuda else "fp32",
        max_batch=1 if full else args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_model_len=args.max_model_len,
        scheduler=args.scheduler,
        mixed=args.mixed,
        prefill_tokens=args.prefill_tokens,
        pipeline=not args.no_pipeline,
        freeze_gc=not args.no_gc_freeze,
        cache=(args.cache if args.cache != "auto" else ("static" if cuda else "dynamic"))
        if batch
        else "auto",
        compile=(args.compile if (cuda or args.cache == "static") else "none") if batch else "auto",
        decode_buckets=(1,) if full else tuple(args.buckets),
        host_cache=None if (full or not cuda) else args.host_cache,
        experts_implementation=args.experts_impl,
        served_model_name="bench",
        max_queue=4096,
        meter=not args.no_meter,
    )
    engine = Engine(cfg)
    engine.load()
    if engine.cont is not None and args.eager_prefill:
        engine.cont.compile_prefill = False
    return engine


def memory_of(engine: Any) -> dict[str, Any]:
    """What the engine holds: mode, resident weights and KV cache (GiB), from its /health."""
    info = engine.info
    return {
        "patterns_mode": info["patterns_mode"],
        "patterns_mode_reason": info.get("patterns_mode_reason"),
        "budget_bytes": info["memory"]["allowed_bytes"] if engine.config.budget else None,
        "resident_experts_per_layer": info["resident_experts_per_layer"],
        "resident_gib": info["resident_bytes"] / 2**30,
        "kv_slots": info.get("kv_slots"),
        "kv_gib": info.get("kv_bytes", 0) / 2**30,
    }


def secs(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f} s"


def bench_premoe(
    args: argparse.Namespace, ckpt: Path, patterns: dict, rng: random.Random
) -> dict[str, Any]:
    device = torch.device(args.device)
    bc.reset_peak(device)
    t0 = time.perf_counter()
    engine = make_engine(args, ckpt, patterns, full=False)
    load_s = time.perf_counter() - t0
    say(f"premoe engine loaded in {load_s:.1f} s ({engine.info['experts_kept']} experts/layer)")
    server = HttpServer(engine)
    try:
        if not engine.warm.wait(900):
            raise RuntimeError("warm-up did not finish")
        say(f"warm-up {engine.warmup_seconds:.1f} s (compile: {engine.info['compile']})")
        compile_counters = dynamo_counters()
        task = next(iter(patterns))
        b1 = decode_b1(engine, task, random_prompt(rng, args.prompt_chars), args.decode_tokens)
        say(f"batch-1 decode: {b1['decode_tokens_per_s']:.1f} tokens/s")
        names = list(patterns)[: args.patterns]
        batched = None
        if engine.cont is not None and args.engine_batch:  # the engine alone, no HTTP
            rows = [
                (names[i % len(names)] if engine.mixed else task,
                 random_prompt(rng, args.prompt_chars))
                for i in range(min(args.engine_batch, engine.cont.slots))
            ]  # fmt: skip
            batched = decode_rows_continuous(engine, rows, args.max_tokens, args.profile_steps)
            say(f"batch-{batched['rows']} decode through the engine (no HTTP): "
                f"{batched['decode_tokens_per_s']:.1f} tokens/s")  # fmt: skip
        jobs = [
            (random_prompt(rng, args.prompt_chars), names[i % len(names)])
            for i in range(args.requests)
        ]
        m = engine.metrics
        before = {
            "swaps": m.swaps.value(),
            "bytes": m.swap_bytes.value(),
            "seconds": m.swap_seconds.value(),
            "experts": m.swap_experts.value(),
            "batches": m.batch_size.count(),
        }
        works = []
        # the clients in their own processes (as vLLM's serving benchmark): sharing this
        # process's GIL with the server and engine threads, their streams slowed both; and one
        # process of them caps what it can read (CLIENTS_PER_PROCESS)
        procs = -(-max(args.concurrency) // CLIENTS_PER_PROCESS)
        client = (
            ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"))
            if args.client == "process"
            else None
        )
        if client is not None:  # start and warm them all before any workload's clock starts
            few = jobs[:8]
            warm = list(client.map(warm_clients, [server.url] * procs, [few] * procs, [4] * procs))
            say(f"client processes warmed: {sum(warm)}/{len(few) * procs} requests answered")
        for conc in args.concurrency:
            for k in before:
                before[k] = {
                    "swaps": m.swaps.value(),
                    "bytes": m.swap_bytes.value(),
                    "seconds": m.swap_seconds.value(),
                    "experts": m.swap_experts.value(),
                    "batches": m.batch_size.count(),
                }[k]
            mixed0, single0 = m.steps.value(mode="mixed"), m.steps.value(mode="single")
            prefills0 = m.prefill_steps.value()
            busy0, prefill_s0 = m.busy_seconds.value(), m.prefill_seconds.sum()
            guard0 = guard_counts(server)
            n_req = max(args.requests, 2 * conc)
            conc_jobs = (jobs * (n_req // len(jobs) + 1))[:n_req]
            full_gc0 = full_gc_passes(engine)
            procs = -(-conc // CLIENTS_PER_PROCESS)
            work = run_workload(server.url, conc_jobs, args.max_tokens, conc, client, procs)
            full_gc = [b - a for a, b in zip(full_gc0, full_gc_passes(engine), strict=True)]
            batches = m.batch_size.count() - before["batches"]
            work.update(
                {
                    "patterns": len(names),
                    "max_tokens": args.max_tokens,
                    "concurrency": conc,
                    "swaps": m.swaps.value() - before["swaps"],
                    "swap_bytes": m.swap_bytes.value() - before["bytes"],
                    "swap_seconds": m.swap_seconds.value() - before["seconds"],
                    "experts_moved": m.swap_experts.value() - before["experts"],
                    "batches": batches,
                    "mean_batch": n_req / batches if batches and engine.cont is None else None,
                    "mixed_steps": m.steps.value(mode="mixed") - mixed0,
                    "single_steps": m.steps.value(mode="single") - single0,
                    "prefill_steps": m.prefill_steps.value() - prefills0,
                    # the engine thread's time in steps, and of it in prefill forwards; the
                    # rest of the wall it waited for requests (between waves, before the first)
                    "engine_busy_s": m.busy_seconds.value() - busy0,
                    "engine_prefill_s": m.prefill_seconds.sum() - prefill_s0,
                    "gc_full_passes": {"n": full_gc[0], "total_ms": 1e3 * full_gc[1]},
                    "connections_closed_by_guard": {
                        k: v - guard0[k] for k, v in guard_counts(server).items()
                    },
                    **memory_of(engine),
                }
            )
            say(
                f"mixed workload, concurrency {conc}: {work['tokens_per_s']:.1f} tokens/s, "
                f"p50 {secs(work['p50_s'])}, p99 {secs(work['p99_s'])}, TTFT p50 "
                f"{secs(work['ttft_p50_s'])} ({work['ttft_measured']}/{n_req}), "
                f"{work['swaps']:.0f} swaps, {work['patterns_mode']}, "
                f"{human_bytes(work['resident_gib'] * 2**30)} resident + "
                f"{human_bytes(work['kv_gib'] * 2**30)} KV"
            )
            works.append(work)
        if client is not None:
            client.shutdown()
        work = works[0]
        alternatives = {}
        model = engine.resident.model
        default_impl = getattr(model.config, "_experts_implementation", None)
        for impl in args.also_experts_impl:
            try:
                engine.call(lambda impl=impl: model.set_experts_implementation(impl))
                alt = decode_b1(
                    engine, task, random_prompt(rng, args.prompt_chars), args.decode_tokens
                )
                alternatives[impl] = alt
                say(f"batch-1 decode with {impl}: {alt['decode_tokens_per_s']:.1f} tokens/s")
            except Exception as exc:  # an implementation this setup cannot run
                alternatives[impl] = {"error": f"{type(exc).__name__}: {exc}"}
                say(f"{impl} failed: {exc}")
        if alternatives and default_impl is not None:
            engine.call(lambda: model.set_experts_implementation(default_impl))
        peak = bc.peak_bytes(device)
        return {
            "load_s": load_s,
            "warmup_s": engine.warmup_seconds,
            "info": engine.info,
            "compile": engine.info["compile"],
            "resident_bytes": engine.resident.resident_bytes,
            "peak_device_bytes": peak,
            "decode_b1": b1,
            "decode_engine_batch": batched,
            "decode_b1_other_experts_impl": alternatives,
            "workload": work,
            "workloads": works,
            "compile_counters_after_warmup": compile_counters,
            "compile_counters_after_workload": dynamo_counters(),
        }
    finally:
        server.close()
        del engine
        free_memory()


def bench_full(args: argparse.Namespace, ckpt: Path, config: Any, rng: random.Random) -> dict:
    layers = list(range(config.num_hidden_layers))
    everything = {"all": KeepSets.uniform(layers, range(config.num_experts))}
    t0 = time.perf_counter()
    engine = make_engine(args, ckpt, everything, full=True)
    load_s = time.perf_counter() - t0
    engine.start()
    try:
        if not engine.warm.wait(900):
            raise RuntimeError("warm-up did not finish")
        b1 = decode_b1(engine, "all", random_prompt(rng, args.prompt_chars), args.decode_tokens)
        say(
            f"full model batch-1 decode: {b1['decode_tokens_per_s']:.1f} tokens/s "
            f"(compile: {engine.info['compile']})"
        )
        return {
            "load_s": load_s,
            "warmup_s": engine.warmup_seconds,
            "compile": engine.info["compile"],
            "resident_bytes": engine.resident.resident_bytes,
            "decode_b1": b1,
        }
    finally:
        engine.stop()
        del engine
        free_memory()


# ---- baseline: accelerate CPU offload ------------------------------------------------------------


def bench_accelerate(args: argparse.Namespace, ckpt: Path, rng: random.Random) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = args.device.startswith("cuda")
    t0 = time.perf_counter()
    if cuda:
        dev = torch.device(args.device)
        index = dev.index if dev.index is not None else 0
        model = AutoModelForCausalLM.from_pretrained(
            ckpt,
            dtype=torch.bfloat16,
            device_map="auto",
            max_memory={index: args.budget, "cpu": args.host_memory},
        )
    else:  # smoke: no GPU to offload from; the same calls on the CPU
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(ckpt)
    placement: dict[str, int] = {}
    for where in (getattr(model, "hf_device_map", None) or {"": "cpu"}).values():
        placement[str(where)] = placement.get(str(where), 0) + 1
    say(f"accelerate model loaded in {load_s:.1f} s, placement {placement}")
    first = next(model.parameters()).device if not cuda else torch.device(args.device)

    def gen(model: Any, batch: int, new: int) -> float:
        prompts = [random_prompt(rng, args.prompt_chars) for _ in range(batch)]
        enc = tok(prompts, return_tensors="pt", padding=True).to(first)
        with bc.DeviceTimer(first) as t, torch.no_grad():
            model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=tok.pad_token_id,
            )
        return t.seconds

    out: dict[str, Any] = {"load_s": load_s, "placement": placement}
    n = args.baseline_tokens
    for batch in (1, args.baseline_batch):
        t1 = gen(model, batch, 1)
        tn = gen(model, batch, n)
        decode = (n - 1) / (tn - t1) if tn > t1 else float("nan")
        out[f"batch{batch}"] = {
            "prefill_s": t1,
            "request_s": tn,
            "tokens": n,
            "decode_tokens_per_s": batch * decode,
            "tokens_per_s": batch * n / tn,
        }
        say(f"accelerate batch {batch}: {batch * n / tn:.3f} tokens/s ({tn:.1f} s per request)")
    del model
    free_memory()
    return out


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=None, help="Write the results as JSON here.")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="Tiny model on the CPU, to prove it runs.")
    p.add_argument("--checkpoint", default=None, help="Reuse (or write) the checkpoint here.")
    p.add_argument("--keep-checkpoint", action="store_true", help="Do not delete it at the end.")
    bc.add_model_args(p, kv_heads=4)
    p.add_argument(
        "--budget",
        default="10GiB",
        help="Device memory of the premoe engine: weights + KV cache + activations (K is the "
        "largest that fits beside --min-kv-slots slots; mixed mode only if the patterns' union "
        "fits too). Also accelerate's GPU max_memory.",
    )
    p.add_argument("--min-kv-slots", type=int, default=4, help="KV slots kept beside weights.")
    p.add_argument("--keep", type=int, default=None, help="Experts kept (default: fit budget).")
    p.add_argument("--host-cache", default="48GiB", help="premoe's pinned host expert cache.")
    p.add_argument("--host-memory", default="200GiB", help="accelerate's CPU max_memory.")
    p.add_argument("--patterns", type=int, default=3, help="Patterns in the mixed workload (2-4).")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument(
        "--concurrency", type=int, nargs="+", default=[16, 64, 256], help="Workload sweep."
    )
    p.add_argument("--scheduler", default="continuous", choices=["continuous", "batch"])
    p.add_argument(
        "--client",
        default="process",
        choices=["process", "thread"],
        help="Where the HTTP clients of the workloads run: separate processes, one per "
        f"{CLIENTS_PER_PROCESS} clients (default), or this one (sharing the server's GIL; "
        "earlier runs of this bench).",
    )
    p.add_argument("--mixed", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument(
        "--no-pipeline", action="store_true", help="Read every decode step before the next."
    )
    p.add_argument(
        "--eager-prefill", action="store_true", help="Prefill without the compiled layers."
    )
    p.add_argument(
        "--no-gc-freeze", action="store_true", help="Leave start-up objects in the GC's passes."
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-chars", type=int, default=63, help="Prompt length (+1 BOS token).")
    p.add_argument("--max-batch", type=int, default=256, help="KV slots (continuous).")
    p.add_argument("--baseline-batch", type=int, default=8, help="accelerate's larger batch.")
    p.add_argument("--buckets", default="1,8", help="Static-cache batch sizes compiled.")
    p.add_argument("--max-wait-ms", type=float, default=200.0)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--compile", default="reduce-overhead", help="none|default|reduce-overhead")
    p.add_argument("--cache", default="auto", help="KV cache: auto (static on CUDA)|static|dynamic")
    p.add_argument("--experts-impl", default=None, help="grouped_mm (default on CUDA), ...")
    p.add_argument(
        "--also-experts-impl",
        default="",
        help="Also time batch-1 decode with these experts implementations (comma list, e.g. "
        "batched_mm); each recompiles the decode step once.",
    )
    p.add_argument(
        "--fused-experts",
        action="store_true",
        help="premoe_gemv experts through the two fused kernels (premoe.quant.gemv_experts.FUSE)",
    )
    p.add_argument(
        "--no-combo-kernels",
        action="store_true",
        help="without inductor's combo kernels in the compiled decoder layers "
        "of one-row steps (premoe.serve.graphs.Regions.COMBO_KERNELS, on by default)",
    )
    p.add_argument(
        "--no-meter",
        action="store_true",
        help="Serve without the dropped-mass meter (serve's --no-meter; on by default).",
    )
    p.add_argument("--decode-tokens", type=int, default=256, help="Batch-1 decode length.")
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="With --engine-batch on CUDA: this many more steps profiled, by kernel.",
    )
    p.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="sys.setswitchinterval for this process (server, engine; default Python's 5 ms).",
    )
    p.add_argument(
        "--engine-batch",
        type=int,
        default=64,
        help="Rows decoded together through the engine alone, no HTTP (0: skip).",
    )
    p.add_argument("--baseline-tokens", type=int, default=4, help="Tokens per baseline request.")
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
        vars(args).update(bc.SMOKE_SHAPE, experts=16, top_k=4, kv_heads=2, vocab=128)
        args.keep = args.keep or 8
        args.requests, args.concurrency, args.max_tokens = 12, [1, 4], 8
        args.max_batch, args.decode_tokens, args.baseline_tokens = 4, 32, 4
        args.baseline_batch = 4
        args.prompt_chars, args.max_model_len = 15, 128
    args.buckets = [int(b) for b in str(args.buckets).split(",") if b.strip()]
    args.also_experts_impl = [x for x in str(args.also_experts_impl).split(",") if x.strip()]
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    if args.fused_experts:
        from premoe.quant import gemv_experts

        gemv_experts.FUSE = True
    if args.no_combo_kernels:
        from premoe.serve.graphs import Regions

        Regions.COMBO_KERNELS = False
    if not 1 <= args.patterns:
        p.error("--patterns must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from premoe.load import keep_for_budget
    from premoe.serve import memory
    from premoe.source import resolve_model

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("premoe.serve.graphs").setLevel(logging.INFO)  # warm-up progress
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device)
    config = bc.qwen3_config(args)
    results: dict[str, Any] = {
        **bc.environment(device),
        "args": {k: v for k, v in vars(args).items()},
    }
    t_start = time.perf_counter()

    # checkpoint
    tmp: Path | None = None
    if args.checkpoint and (Path(args.checkpoint) / "config.json").is_file():
        ckpt = Path(args.checkpoint)
        say(f"reusing checkpoint {ckpt}")
    else:
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="premoe-bench-serve-"))
            ckpt = tmp / "model"
        say(f"writing the random checkpoint to {ckpt}")
        results["checkpoint"] = write_checkpoint(config, ckpt, device)
        say(f"checkpoint: {results['checkpoint']['bytes'] / 1e9:.1f} GB in "
            f"{results['checkpoint']['seconds']:.0f} s")  # fmt: skip
    src = resolve_model(ckpt)
    config = src.config
    if len(AutoTokenizer.from_pretrained(ckpt)) < config.vocab_size:  # written before the fix
        write_tokenizer(ckpt, config.vocab_size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    plan = memory.make_plan(
        src.config,
        budget=args.budget,
        device=device,
        dtype=dtype,
        fraction=0.9,
        max_batch=args.max_batch,
        min_kv_slots=args.min_kv_slots,
        prefill_tokens=args.prefill_tokens,
        max_len=min(args.max_model_len, int(src.config.max_position_embeddings)),
    )
    # the largest K whose weights fit the budget beside --min-kv-slots KV slots and the
    # activation headroom (what `premoe serve --budget` keeps)
    weights_budget = plan.weights_budget()
    assert weights_budget is not None
    keep = args.keep if args.keep is not None else keep_for_budget(src, weights_budget, dtype)
    layers = src.moe_layers
    patterns = random_patterns(layers, src.num_experts, keep, max(args.patterns, 1), args.seed)
    active = active_bytes_per_token(config, dtype.itemsize)
    bw = measure_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 27))
    bound = bw / active["total"]
    results.update(
        {
            "model": {
                "layers": config.num_hidden_layers,
                "experts": src.num_experts,
                "top_k": src.top_k,
                "hidden": config.hidden_size,
                "checkpoint_bytes": sum(src.reader.shard_sizes().values())
                if hasattr(src.reader, "shard_sizes")
                else None,
            },
            "keep": keep,
            "budget": args.budget,
            "memory_plan": {
                "budget_bytes": plan.allowed.nbytes,
                "weights_budget_bytes": weights_budget,
                "kv_bytes_per_slot": plan.per_slot,
                "activation_headroom_bytes": plan.headroom,
                "min_kv_slots": plan.min_slots,
            },
            "active_bytes_per_token": active,
            "device_bandwidth_bytes_per_s": bw,
            "bandwidth_bound_tokens_per_s": bound,
        }
    )
    src.close()
    say(f"keep {keep}/{config.num_experts} experts per layer; bandwidth {bw / 1e9:.0f} GB/s; "
        f"bound {bound:.0f} tokens/s at batch 1")  # fmt: skip

    def phase(name: str, fn: Any) -> dict[str, Any] | None:
        """Run one part; a failure is recorded and the other parts still run."""
        try:
            out = fn()
        except Exception as exc:  # record and go on: one broken part must not lose the rest
            import traceback

            say(f"{name} failed: {type(exc).__name__}: {exc}")
            results[name] = {"error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()}  # fmt: skip
            out = None
        else:
            results[name] = out
        free_memory()
        return out

    pruned = phase("premoe", lambda: bench_premoe(args, ckpt, patterns, rng))
    pr = pruned["decode_b1"]["decode_tokens_per_s"] if pruned else None
    if pruned:
        pruned["decode_b1"]["fraction_of_bound"] = pr / bound
    if not args.skip_full:
        full = phase("full", lambda: bench_full(args, ckpt, config, rng))
        if full and pr:
            fr = full["decode_b1"]["decode_tokens_per_s"]
            results["pruned_over_full"] = pr / fr if fr else None
    if not args.skip_baseline:
        base = phase("accelerate", lambda: bench_accelerate(args, ckpt, rng))
        if base and pruned:
            b = base["batch1"]["tokens_per_s"]
            results["workload_speedup_vs_accelerate_b1"] = (
                pruned["workload"]["tokens_per_s"] / b if b else None
            )
    results["total_s"] = time.perf_counter() - t_start
    bc.write_json(args.out, results)
    if tmp is not None and not args.keep_checkpoint:
        shutil.rmtree(tmp, ignore_errors=True)
    print(report(results, args, config, keep, bound, bw, active))
    return 0 if pruned else 1


def report(
    results: dict[str, Any],
    args: argparse.Namespace,
    config: Any,
    keep: int,
    bound: float,
    bw: float,
    active: dict[str, int],
) -> str:
    """The results as a two-column table."""
    if "error" in results["premoe"]:
        return f"premoe failed: {results['premoe']['error']}"
    w = results["premoe"]["workload"]
    b1 = results["premoe"]["decode_b1"]
    rows = [
        ("device", results["device"]),
        ("model", f"{config.num_hidden_layers} x {config.num_experts} experts, "
                  f"top-{config.num_experts_per_tok}"),
        ("kept per layer", f"{keep} " + (f"(fits {args.budget} with KV and activations)"
                                          if args.keep is None else "(--keep)")),
        ("budget (engine)", f"{args.budget}: weights + KV cache + activations; mixed only if "
                            "the union fits too"),
        ("resident bytes", f"{results['premoe']['resident_bytes'] / 2**30:.2f} GiB"),
        ("peak device bytes", "-" if results["premoe"]["peak_device_bytes"] is None
         else f"{results['premoe']['peak_device_bytes'] / 2**30:.2f} GiB"),
        ("load / warm-up", f"{results['premoe']['load_s']:.1f} s / "
                           f"{results['premoe']['warmup_s']:.1f} s"),
        ("graphs compiled after warm-up", f"{late_graphs(results['premoe'])} (each a compile "
                                          "under requests; 0 when the warm-up covers them)"),
        ("scheduler", f"{results['premoe']['info'].get('scheduler')}, patterns "
                      f"{results['premoe']['info'].get('patterns_mode')}, fused routers "
                      f"{'on' if results['premoe']['info'].get('fused_routers') else 'off'}"),
        ("decode b1 tokens/s", f"{b1['decode_tokens_per_s']:.1f}"),
        ("bandwidth bound", f"{bound:.0f} tokens/s ({active['total'] / 1e9:.2f} GB/token at "
                            f"{bw / 1e9:.0f} GB/s)"),
        ("  fraction of bound", f"{b1['fraction_of_bound']:.3f}"),
    ]  # fmt: skip
    if b1.get("device_ms_per_step") is not None:
        rows.append(("  device time a step (graph replays)", f"{b1['device_ms_per_step']:.2f} ms"))
    eb = results["premoe"].get("decode_engine_batch")
    if eb:
        rows.append((f"decode b{eb['rows']} tokens/s, engine only",
                     f"{eb['decode_tokens_per_s']:.1f} = "
                     f"{eb['decode_tokens_per_s'] / b1['decode_tokens_per_s']:.2f}x b1 "
                     f"({eb['per_token_ms']['total'] * eb['rows']:.1f} ms a step)"))  # fmt: skip
        if eb.get("device_ms_per_step") is not None:
            rows.append(("  device time a step (graph replays)",
                         f"{eb['device_ms_per_step']:.1f} ms"))  # fmt: skip
    for k in (eb or {}).get("kernels") or []:
        rows.append((f"  {k['us_per_step']:8.1f} us/step x{k['count']}", k["kernel"][:60]))
    for x in results["premoe"].get("workloads", [w]):
        rows += [
            (f"mixed workload, concurrency {x['concurrency']}",
             f"{x['requests']} req, {x['patterns']} patterns, {x['max_tokens']} tokens"),
            ("  tokens/s", f"{x['tokens_per_s']:.1f} = "
                           f"{x['tokens_per_s'] / b1['decode_tokens_per_s']:.2f}x b1"),
            ("  memory", f"{x.get('patterns_mode')}: "
                         f"{human_bytes(x.get('resident_gib', 0) * 2**30)} resident "
                         f"({x.get('resident_experts_per_layer')} experts/layer) + "
                         f"{human_bytes(x.get('kv_gib', 0) * 2**30)} KV ({x.get('kv_slots')} "
                         "slots)"),
            ("  latency p50 / p99", f"{secs(x['p50_s'])} / {secs(x['p99_s'])}"),
            ("  TTFT p50 / p99", f"{secs(x['ttft_p50_s'], 3)} / {secs(x['ttft_p99_s'], 3)} "
                                 f"({x.get('ttft_measured')} of {x['requests'] - x['errors']})"),
            ("  steps mixed / single / prefill", f"{x.get('mixed_steps', 0):.0f} / "
                                       f"{x.get('single_steps', 0):.0f} / "
                                       f"{x.get('prefill_steps', 0):.0f}"),
            ("  engine in steps (prefill) / wall", f"{x.get('engine_busy_s', 0):.2f} s "
                                                   f"({x.get('engine_prefill_s', 0):.2f} s) / "
                                                   f"{x['wall_s']:.2f} s"),
            ("  swaps (bytes, s)", f"{x['swaps']:.0f} ({x['swap_bytes'] / 1e9:.2f} GB, "
                                   f"{x['swap_seconds']:.2f} s)"),
            ("  errors", f"{x['errors']} {x.get('error_kinds') or ''}".strip()),
        ]  # fmt: skip
        if "gc_full_passes" in x:
            full = x["gc_full_passes"]
            rows.append(("  GC full passes", f"{full['n']} ({full['total_ms']:.1f} ms)"))
    for k, v in b1["per_token_ms"].items():
        rows.append((f"  ms/token {k}", f"{v:.3f}"))
    for impl, alt in results["premoe"].get("decode_b1_other_experts_impl", {}).items():
        value = alt.get("error") or f"{alt['decode_tokens_per_s']:.1f}"
        rows.append((f"decode b1 tokens/s ({impl})", value))
    if "decode_b1" in results.get("full", {}):
        fr = results["full"]["decode_b1"]["decode_tokens_per_s"]
        rows.append(("full model b1 tokens/s", f"{fr:.1f} (compile: {results['full']['compile']})"))
        ratio = f"{results['pruned_over_full']:.2f}"
        if results["full"]["compile"] != results["premoe"]["compile"]:
            ratio += " (not comparable: compiled differently)"
        rows.append(("  pruned / full", ratio))
    if "batch1" in results.get("accelerate", {}):
        a = results["accelerate"]
        rows.append(("accelerate b1 tokens/s", f"{a['batch1']['tokens_per_s']:.3f}"))
        rows.append((f"accelerate b{args.baseline_batch} tokens/s",
                     f"{a[f'batch{args.baseline_batch}']['tokens_per_s']:.3f}"))  # fmt: skip
        rows.append(("  premoe workload / accelerate b1",
                     f"{results['workload_speedup_vs_accelerate_b1']:.0f}x"))  # fmt: skip
    for part in ("full", "accelerate"):
        if "error" in results.get(part, {}):
            rows.append((f"{part}: failed", results[part]["error"][:120]))
    rows.append(("total", f"{results['total_s']:.0f} s"))
    return bc.format_table(None, rows, align="ll")


if __name__ == "__main__":
    raise SystemExit(main())
