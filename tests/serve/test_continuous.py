"""Continuous batching in process: rows of several patterns join at random steps, share decode
steps through per-row router masks over the resident union, and each row's greedy text equals
its pattern's own pruned model (`premoe.load.load_pruned`); penalties and logprobs equal a
reference computed here from full-vocabulary logits; seeded sampling is reproducible."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from premoe.demo.tasks import generate
from premoe.load import ResidentModel, load_pruned
from premoe.serve import topk
from premoe.serve.continuous import ContinuousDecoder, StepReport, decoder_layers
from premoe.serve.decode import SamplingParams
from premoe.serve.fused_router import FusedRouters
from premoe.serve.graphs import DecodeGraphs, Regions, buckets_up_to
from premoe.serve.patterns import build_patterns
from premoe.serve.rowmask import RowRouting, union_keep
from premoe.serve.sampling import TokenLogprobs
from premoe.source import resolve_model
from tests.helpers import GPU, greedy_text
from tests.serve.conftest import KEEP, MAX_LEN, ServeWorld, mixed_on_cuda, reference_route


@dataclass
class Sink:
    cancelled: bool = False
    text: str = ""
    reason: str | None = None
    tokens: list[TokenLogprobs] = field(default_factory=list)
    leave_after: int | None = None

    def on_token(self, info: TokenLogprobs) -> None:
        self.tokens.append(info)

    def on_delta(self, text: str, completion_tokens: int) -> None:
        self.text += text
        if self.leave_after is not None and completion_tokens >= self.leave_after:
            self.cancelled = True

    def on_finish(self, reason: str, completion_tokens: int) -> None:
        self.reason = reason


Row = tuple[Sink, list[int], str, int]  # sink, prompt ids, pattern, max tokens


def run_joining(
    dec: ContinuousDecoder, jobs: list[tuple[list[int], str, int]], rng: random.Random
) -> tuple[list[Row], list[StepReport]]:
    """Decode `jobs` (prompt ids, pattern, max tokens) to the end, 0-2 of them joining at each
    step as slots allow (taken from the end of the list): the rows and every step's report."""
    waiting, rows, reports = list(jobs), [], []
    while waiting or dec.active():
        for _ in range(rng.randint(0, 2)):
            if waiting and dec.free():
                ids, pattern, n = waiting.pop()
                sink = Sink()
                dec.add(sink, ids, SamplingParams(max_tokens=n), pattern)
                rows.append((sink, ids, pattern, n))
        reports.append(dec.step())
    return rows, reports


@dataclass
class World:
    source: Any
    tokenizer: Any
    patterns: dict[str, Any]
    model: Any
    routing: RowRouting
    refs: dict[str, Any] = field(default_factory=dict)

    def ref(self, pattern: str) -> Any:
        if pattern not in self.refs:
            self.refs[pattern] = load_pruned(
                self.source, self.patterns[pattern], device="cpu", dtype=torch.float32
            ).eval()
        return self.refs[pattern]

    def greedy(self, pattern: str, ids: list[int], n: int) -> str:
        return greedy_text(self.ref(pattern), self.tokenizer, ids, n)

    def decoder(self, slots: int = 4, **kw: Any) -> ContinuousDecoder:
        """A decoder of mixed patterns over the union on the CPU."""
        return ContinuousDecoder(
            self.model, self.tokenizer, slots=slots, max_len=MAX_LEN, routing=self.routing, **kw
        )


@pytest.fixture(scope="module")
def world(serve_world: ServeWorld) -> Iterator[World]:
    src = resolve_model(str(serve_world.model))
    _, patterns, _ = build_patterns(
        serve_world.store, src, keep=KEEP, budget=None, dtype=torch.float32
    )
    union = union_keep(patterns, src.num_experts)
    assert union.count > KEEP  # the patterns differ: the union holds more than one of them
    resident = ResidentModel(src, union, device="cpu", dtype=torch.float32)
    model = resident.model.eval()
    routing = RowRouting(model, src.arch, union, patterns)
    assert routing.verify(model) is None
    yield World(src, serve_world.tokenizer, patterns, model, routing)
    src.close()


def prompts(world: World) -> list[list[int]]:
    texts = [r["prompt"] for t in ("add", "reverse") for r in generate(t, 6, 5, "eval")]
    return [world.tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("pipeline", [False, True])
def test_rows_joining_at_random_steps_equal_their_patterns_pruned_model(
    world: World, pipeline: bool
) -> None:
    """`pipeline`: each decode step is launched before the last one's samples are read, the
    rows' tokens fed from the device (serve's default on CUDA)."""
    rng = random.Random(0)
    names = list(world.patterns)
    dec = world.decoder(prefill_tokens=7, pipeline=pipeline)
    jobs = [
        (ids, names[i % len(names)], rng.randint(3, 16)) for i, ids in enumerate(prompts(world))
    ]
    rng.shuffle(jobs)
    sinks, reports = run_joining(dec, jobs, rng)
    mixed_steps = sum(len(report.patterns) > 1 for report in reports)
    # the decode stall bound (--prefill-tokens): the padded forward [B, S], not only its tokens
    assert all(report.prefill_positions <= 7 for report in reports)
    assert max(report.prefill_rows for report in reports) > 1, "no prefill had several rows"
    interleaved = sum(r.prefill_tokens > 0 and r.decode_rows > 0 for r in reports)
    assert mixed_steps > 0, "no step mixed patterns: the test could not fail"
    assert interleaved > 0, "prefill never shared a step with decoding rows"
    assert bool(sum(r.in_flight for r in reports)) == pipeline
    differ = 0
    for sink, ids, pattern, n in sinks:
        assert sink.reason in ("stop", "length")
        assert sink.text == world.greedy(pattern, ids, n), (pattern, ids)
        differ += len({world.greedy(p, ids, n) for p in world.patterns}) > 1
    assert differ >= 2, "the patterns agree on every prompt: the test could not fail"


@pytest.mark.parametrize(
    ("lengths", "budget", "chunks"),
    [
        ([3, 10, 10], 32, [3, 10, 10]),  # whole prompts: S grows to 10, 3 x 10 <= 32
        ([10, 10, 10, 10], 32, [10, 10, 10]),  # a fourth row would make 40 positions
        ([10, 20], 32, [10, 10]),  # 2 x 20 > 32: the second row gets what the width allows
        ([40, 3], 32, [32]),  # the oldest row's chunk fills the budget alone
    ],
)
def test_a_prefill_forward_takes_whole_prompts_within_its_positions(
    world: World, lengths: list[int], budget: int, chunks: list[int]
) -> None:
    """The chunker's rule: oldest first, a row's whole prompt while the padded [B, S] stays
    within `prefill_tokens`, else the part the width allows (cutting every row to the oldest
    one's chunk cost the CPU bench 14-20 % of its tokens/s at concurrency 64 and 256)."""
    dec = world.decoder(prefill_tokens=budget)
    ids = prompts(world)[0] * 10
    task = next(iter(world.patterns))
    for n in lengths:
        dec.add(Sink(), ids[:n], SamplingParams(max_tokens=1), task)
    report = dec.step()
    assert (report.prefill_rows, report.prefill_tokens) == (len(chunks), sum(chunks))
    assert report.prefill_positions == len(chunks) * max(chunks) <= budget


def test_traced_step_equals_eager_forward_in_one_graph(world: World) -> None:
    """The step the decode graphs trace (per-row routing set as state, the hook patched around
    it) gives the eager forward's logits, and torch.compile traces it whole: no graph break
    (a break per router call made the compiled step slower and hit dynamo's recompile limit)."""
    dec = ContinuousDecoder(
        world.model, world.tokenizer, slots=3, max_len=MAX_LEN, routing=world.routing
    )
    names = list(world.patterns)
    ids = torch.tensor([[5], [7], [9]])  # [B, 1]
    pos = torch.tensor([[0], [0], [0]])
    kv = 4
    mask = torch.where(torch.arange(kv)[None, :] <= pos, 0.0, torch.finfo(torch.float32).min)
    mask = mask[:, None, None, :]  # [B, 1, 1, K]
    rows = world.routing.rows([names[0], names[1], None])
    with torch.no_grad():
        dec.cache.plan(None, pos, kv)
        want = dec._forward(ids, pos, mask, rows)
        with dec._patched(False):
            dec.cache.plan(None, pos, kv)
            got = dec._graph_step(ids, 0 * ids, pos, mask, rows)
            torch._dynamo.reset()
            dec.cache.plan(None, pos, kv)
            explained = torch._dynamo.explain(dec._graph_step)(ids, 0 * ids, pos, mask, rows)
        dec.cache.plan(None, pos, kv)
        unrouted = dec._forward(ids, pos, mask, None)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(want[:2], unrouted[:2])  # the masks mattered: could fail
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]


def test_rows_repeat_the_last_answer_only_for_the_same_names(world: World) -> None:
    """`RowRouting.rows` returns its last `Rows` again for the same names (decode steps copy
    nothing then), and fresh, right masks for any other names."""
    routing, names = world.routing, list(world.patterns)
    first = routing.rows([names[0], None, names[1]])
    assert routing.rows([names[0], None, names[1]]) is first
    other = routing.rows([names[1], names[0]])
    assert other is not first
    again = routing.rows([names[0], None, names[1]])
    assert again is not first  # only the last answer is kept
    for rows, row_names in ((first, [names[0], None, names[1]]), (other, names[1::-1])):
        for b, name in enumerate(row_names):
            want = routing.masks[names.index(name)] if name else torch.zeros_like(rows.masks[b])
            torch.testing.assert_close(rows.masks[b], want)
            assert int(rows.index[b]) == (names.index(name) if name else 0)
    torch.testing.assert_close(again.masks, first.masks)


class GraphLog:
    """A torch.compile backend (AOT, no codegen) that keeps the code of every graph traced."""

    def __init__(self) -> None:
        from torch._dynamo.backends.common import aot_autograd

        self.codes: list[str] = []
        self.backend = aot_autograd(fw_compiler=self._compile)

    def _compile(self, gm: Any, example: Any) -> Any:
        self.codes.append(gm.code)
        return gm.forward

    def view_writes(self) -> list[str]:
        """Writes through a view of an input: a compiled step copies the whole input for each."""
        return [ln for c in self.codes for ln in c.splitlines() if "_scatter" in ln]


SHAPES = tuple((b, kv) for b in (1, 2, 4, 8) for kv in (16, 32, 64))  # 4 batch x 3 KV buckets


def decode_shapes(
    world: Any,
    dec: ContinuousDecoder,
    regions: Regions | None,
    routed: bool,
    fuse: bool = False,
    steps: Sequence[tuple[int, int]] = SHAPES,
) -> Any:
    """Decode steps of (rows, KV columns) `steps`; per step the eager forward's logits and the
    step's through `regions` (None: eager too), entered as `DecodeGraphs` does."""
    names = list(world.patterns)
    low = torch.finfo(torch.float32).min
    with torch.no_grad():
        for b, kv in steps:
            ids = torch.arange(5, 5 + b)[:, None]  # [B, 1]
            pos = torch.full((b, 1), 3)
            mask = torch.where(torch.arange(kv)[None, :] <= pos, 0.0, low)[:, None, None, :]
            rows = world.routing.rows([names[i % len(names)] for i in range(b)]) if routed else None
            dec.cache.plan(None, pos, kv)
            want = dec._forward(ids, pos, mask, rows)
            with dec._patched(fuse), regions.active(b == 1) if regions else nullcontext():
                dec.cache.plan(None, pos, kv)
                yield want, dec._graph_step(ids, 0 * ids, pos, mask, rows)


@pytest.mark.parametrize("fused", [False, True])
def test_layers_compile_once_for_every_layer_and_bucket(
    world: World, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regional compilation (graphs.Regions): the decoder layers' compiled forwards share one
    dynamo cache, so decode steps over every batch and KV bucket trace a handful of one-layer
    graphs, not one per layer and bucket (the layer index and shapes go symbolic), and no graph
    writes the KV cache through a view; every step equals the eager one, and the layers get their
    own forwards back afterwards. `fused`: with the fused routers' forward in place, as on CUDA
    (its kernel replaced by the torch reference here), and no graph break."""
    layers = decoder_layers(world.model)
    assert len(layers) >= 2
    dec = ContinuousDecoder(
        world.model, world.tokenizer, slots=8, max_len=MAX_LEN, routing=world.routing
    )
    if fused:
        monkeypatch.setattr(topk, "route_topk", reference_route)
        dec.fused_routers = FusedRouters(world.model, world.source.arch)
        assert dec.fused_routers.routers, dec.fused_routers.why
    log = GraphLog()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    regions = Regions(layers, backend=log.backend)
    for want, got in decode_shapes(world, dec, regions, True, fused):
        torch.testing.assert_close(got, want)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert not breaks, breaks
    assert all("forward" not in layer.__dict__ for layer in layers)
    # the first layer's graph, then the layer index, B (> 1) and K going symbolic: 4 (with the
    # layer index guarded, every one of them again per layer: 6 with two layers, 24 with 12)
    assert 0 < len(log.codes) <= 5, len(log.codes)
    assert not log.view_writes(), log.view_writes()


def test_one_row_steps_run_graphs_compiled_with_combo_kernels_others_without(
    world: World,
) -> None:
    """`Regions.active(one_row)` compiles with inductor's combo kernels only the steps of one row
    (1.010x at batch 1, 0.85x at batch 64 on an H100): whatever the order of the steps, every
    step runs a graph compiled with the setting of its own row count (dynamo gives one-row
    batches graphs of their own), and the steps still equal the eager ones."""
    from torch._inductor import config as inductor_config

    ran: list[bool] = []  # per layer forward run: compiled with combo kernels

    def backend(gm: Any, example: Any) -> Any:
        combo = bool(inductor_config.combo_kernels)

        def run(*args: Any) -> Any:
            ran.append(combo)
            return gm.forward(*args)

        return run

    dec = ContinuousDecoder(
        world.model, world.tokenizer, slots=8, max_len=MAX_LEN, routing=world.routing
    )
    torch._dynamo.reset()
    regions = Regions(decoder_layers(world.model), backend=backend)
    assert Regions.COMBO_KERNELS
    steps = [(2, 16), (1, 16), (4, 32), (1, 32), (2, 32)]
    seen = 0
    for (b, _), (want, got) in zip(
        steps, decode_shapes(world, dec, regions, True, steps=steps), strict=True
    ):
        torch.testing.assert_close(got, want)
        assert all(combo == (b == 1) for combo in ran[seen:]), (b, ran)
        seen = len(ran)
    assert set(ran) == {True, False}, ran


def test_prefill_chunks_through_compiled_layers_equal_their_patterns_pruned_model(
    world: World,
) -> None:
    """Prefill forwards run the decode step's compiled layers (`prefill_regions`; on CUDA the
    step's own): chunks of every batch and length, rows of mixed patterns, give each pattern's
    greedy text, and their shapes trace a handful of graphs, not one per chunk shape."""
    rng = random.Random(2)
    names = list(world.patterns)
    dec = world.decoder(prefill_tokens=9)
    log = GraphLog()
    torch._dynamo.reset()
    dec.prefill_regions = Regions(decoder_layers(world.model), backend=log.backend)
    jobs = [(ids, names[i % len(names)], 6) for i, ids in enumerate(prompts(world)[:8])]
    rows, reports = run_joining(dec, jobs, rng)
    shapes = {(r.prefill_rows, r.prefill_tokens) for r in reports if r.prefill_rows}
    assert len(shapes) >= 4, shapes  # could fail: chunk shapes vary
    for sink, ids, pattern, n in rows:
        assert sink.text == world.greedy(pattern, ids, n), (pattern, ids)
    assert 0 < len(log.codes) <= 6, len(log.codes)
    assert not log.view_writes(), log.view_writes()


def test_after_the_prefill_warm_up_no_chunk_shape_compiles(world: World) -> None:
    """`warm_prefill` traces every family of chunk shapes (one row / several, short / long):
    the chunks of later requests, of any row count and length, reuse those graphs (a compile
    under a request stalls it for seconds; on the H200 two were left to the first requests)."""
    dec = world.decoder(slots=16, prefill_tokens=2048)
    log = GraphLog()
    torch._dynamo.reset()
    dec.prefill_regions = Regions(decoder_layers(world.model), backend=log.backend)
    ids = prompts(world)[0]
    task = next(iter(world.patterns))
    dec.warm_prefill(ids[:8], task)
    warmed = len(log.codes)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    cases = [(1, 3, 2048), (1, 17, 2048), (4, 10, 2048), (16, 12, 2048), (3, 30, 2048),
             (2, 2, 2048), (16, 5, 2048), (16, 128, 2048), (1, 30, 7), (3, 30, 40),
             (2, 9, 5)]  # fmt: skip
    for rows, length, budget in cases:  # budget < prompt: later chunks follow a cached prefix
        dec.prefill_tokens = budget
        prompt = (ids * 10)[:length]
        dec.run([(Sink(), prompt, params, task) for _ in range(rows)])
        assert len(log.codes) == warmed, (rows, length, budget)  # could fail: a new family


@GPU[0]
@GPU[1]
def test_after_the_prefill_warm_up_no_chunk_shape_compiles_with_inductor(world: World) -> None:
    """The same with inductor on CUDA (bf16, the premoe_gemv experts, as serve runs), where a
    guard of inductor's own splits the forward's positions at 2048 (padded matmuls): after
    `warm_prefill`, forwards up to `prefill_tokens` positions of any row count compile
    nothing (an H100 load run compiled one under its first burst of 32 rows)."""
    union = world.routing.union
    model, routing = mixed_on_cuda(world.source, union, world.patterns, torch.bfloat16)
    budget = 3000
    dec = ContinuousDecoder(
        model, world.tokenizer, slots=16, max_len=MAX_LEN, prefill_tokens=budget,
        routing=routing, graphs=True, compile=True,
    )  # fmt: skip
    torch._dynamo.reset()
    assert dec.graphs is not None
    with torch.no_grad():
        dec.graphs.warmup()
    ids = prompts(world)[0]
    task = next(iter(world.patterns))
    dec.warm_prefill(ids[:8], task)
    stats = torch._dynamo.utils.counters["stats"]
    warmed = stats["unique_graphs"]
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for rows, length in [(16, 180), (12, 250), (16, 140), (3, 252), (5, 60), (1, 200), (2, 2)]:
        for _ in range(rows):
            dec.add(Sink(), (ids * 100)[:length], params, task)
        widest = 0
        while dec.active():
            widest = max(widest, dec.step().prefill_positions)
        assert widest <= budget
        assert stats["unique_graphs"] == warmed, (rows, length, widest)  # could fail: a family


def test_a_compiled_prefill_that_fails_falls_back_to_eager_prefill(world: World) -> None:
    def broken(gm: Any, example: Any) -> Any:
        raise RuntimeError("no compiler here")

    dec = ContinuousDecoder(world.model, world.tokenizer, slots=2, max_len=MAX_LEN)
    torch._dynamo.reset()
    dec.prefill_regions = Regions(decoder_layers(world.model), backend=broken)
    ids = prompts(world)[0]
    sink = Sink()
    dec.run([(sink, ids, SamplingParams(max_tokens=5), None)])
    assert not dec.compile_prefill  # could fail: the first chunk went through the backend
    assert sink.reason in ("stop", "length") and sink.text == greedy_text(
        world.model, world.tokenizer, ids, 5
    )


@GPU[0]
@GPU[1]
@pytest.mark.parametrize(
    ("quantize", "compile", "launch_pdl"),
    [(None, False, False), (None, True, False), ("fp8", True, False), (None, True, True),
     ("fp8", True, True)],
)  # fmt: skip
def test_cuda_graph_steps_equal_eager_steps(
    world: World,
    quantize: str | None,
    compile: bool,
    launch_pdl: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decode steps replayed from CUDA graphs (of eager or torch.compile'd steps; mixed patterns,
    rows joining at random steps, experts through the premoe_gemv kernel or fp8 slots; premoe's
    kernels launched with programmatic dependent launch or not) give the eager steps' greedy
    text."""
    from premoe.load.loader import ExpertQuantization
    from premoe.quant import pdl

    monkeypatch.setattr(pdl, "ENABLED", launch_pdl)

    q = ExpertQuantization(quantize, block=(16, 16)) if quantize else None
    union = world.routing.union
    model, routing = mixed_on_cuda(world.source, union, world.patterns, torch.float32, q)
    names = list(world.patterns)
    jobs = [(ids, names[i % len(names)], 12) for i, ids in enumerate(prompts(world))]
    texts = {}
    for graphs in (False, True):
        rng = random.Random(1)
        dec = ContinuousDecoder(
            model,
            world.tokenizer,
            slots=4,
            max_len=MAX_LEN,
            routing=routing,
            graphs=graphs,
            compile=compile and graphs,
        )
        assert (dec.graphs is not None) == graphs
        rows, _ = run_joining(dec, jobs, rng)
        texts[graphs] = [sink.text for sink, *_ in rows]
        if graphs:
            assert dec.graphs is not None and len(dec.graphs.graphs) >= 2  # several buckets
    assert texts[True] == texts[False]
    if quantize is None:  # fp32 weights: also each pattern's own pruned model on the CPU
        want = [world.greedy(p, ids, n) for ids, p, n in reversed(jobs)]
        assert texts[True] == want


class EagerReplay:
    """A captured CUDA graph as `DecodeGraphs.run` relies on it, on the CPU: every replay runs the
    step again over the same input buffers, into the same output tensor."""

    def __init__(self, step: Any) -> None:
        self.step = step
        self.out = step()

    def replay(self) -> None:
        self.out.copy_(self.step())


def test_graph_inputs_staged_as_eager_steps(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `DecodeGraphs.run` copies into the graphs' buffers (the inputs in one upload, the
    rows' masks only when they changed, again after a capture idles them) gives the eager
    steps' greedy text: mixed patterns, rows joining at random steps, several buckets captured
    mid-run, the next step queued before the last is read. The graph itself is replayed eagerly
    (CUDA graphs need a GPU: test_cuda_graph_steps_equal_eager_steps)."""

    def record(self: DecodeGraphs, b: int, kv: int) -> tuple[EagerReplay, torch.Tensor]:
        graph = EagerReplay(lambda: self._body(b, kv))
        return graph, graph.out

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(DecodeGraphs, "_record", record)
    names = list(world.patterns)
    jobs = [(ids, names[i % len(names)], 12) for i, ids in enumerate(prompts(world))]
    texts = {}
    for graphs in (False, True):
        dec = ContinuousDecoder(
            world.model, world.tokenizer, slots=4, max_len=MAX_LEN, routing=world.routing
        )
        if graphs:
            dec.graphs, dec.pipeline = dec._decode_graphs(False, False), True
            # KV buckets of 8, 16, ...: rows cross them mid-answer, so a capture idles the
            # buffers between two steps of the same rows
            dec.graphs.kv_buckets = buckets_up_to(MAX_LEN + 1, 8)
        rows, reports = run_joining(dec, jobs, random.Random(1))
        texts[graphs] = [sink.text for sink, *_ in rows]
    assert dec.graphs is not None and len({kv for _, kv in dec.graphs.graphs}) >= 2
    assert any(r.in_flight for r in reports)
    assert texts[True] == texts[False]


def reference_penalized(
    model: Any, ids: list[int], n: int, p: SamplingParams, eos: int
) -> list[tuple[int, float, list[int]]]:
    """Greedy with penalties from full-vocabulary logits, no KV cache: (token, raw logprob,
    top ids) per step, written independently of premoe.serve.sampling."""
    seq, out = list(ids), []
    counts: dict[int, int] = {}
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()  # [V]
        raw = torch.log_softmax(logits, -1)
        x = logits.clone()
        for t in set(ids) | set(counts):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        for t, c in counts.items():
            x[t] -= p.frequency_penalty * c + p.presence_penalty
        token = int(x.argmax())
        top = torch.topk(raw, p.logprobs or 0).indices.tolist()
        out.append((token, float(raw[token]), top))
        if token == eos:
            break
        counts[token] = counts.get(token, 0) + 1
        seq.append(token)
    return out


def test_penalties_and_logprobs_match_full_vocab_reference(world: World) -> None:
    params = SamplingParams(
        max_tokens=12,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        presence_penalty=0.3,
        logprobs=3,
        ignore_eos=True,
    )
    names = list(world.patterns)
    dec = ContinuousDecoder(
        world.model, world.tokenizer, slots=4, max_len=MAX_LEN, routing=world.routing
    )
    rows = [
        (Sink(), ids, params, names[i % len(names)]) for i, ids in enumerate(prompts(world)[:6])
    ]
    dec.run(rows)
    for sink, ids, p, pattern in rows:
        want = reference_penalized(world.ref(pattern), ids, 12, p, eos=-1)
        got = [(t.token, t.logprob, [i for i, _ in t.top]) for t in sink.tokens]
        assert [w[0] for w in want] == [g[0] for g in got], pattern
        for (_, lw, tw), (_, lg, tg) in zip(want, got, strict=True):
            assert abs(lw - lg) < 1e-4 and tw == tg


def test_seeded_sampling_is_reproducible(world: World) -> None:
    names = list(world.patterns)

    def sample(seed: int) -> list[str]:
        dec = ContinuousDecoder(
            world.model, world.tokenizer, slots=3, max_len=MAX_LEN, routing=world.routing
        )
        p = SamplingParams(
            max_tokens=16, temperature=1.2, top_k=20, min_p=0.02, top_p=0.95, seed=seed
        )
        rows = [(Sink(), ids, p, names[i % 3]) for i, ids in enumerate(prompts(world)[:5])]
        dec.run(rows)
        return [s.text for s, _, _, _ in rows]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_pipelined_steps_equal_unpipelined_ones_for_every_kind_of_row(world: World) -> None:
    """Plain greedy rows (pipelined), rows ending on a stop string or token (seen only once the
    next step has fed their last token), seeded sampled and penalized rows with logprobs (their
    steps are read at once) and a client leaving mid-stream, all in one run: every row's tokens,
    text and finish reason are those of the same run unpipelined."""
    names = list(world.patterns)
    ids = prompts(world)
    stop_ids = world.tokenizer(";C", add_special_tokens=False)["input_ids"]
    kinds = [
        SamplingParams(max_tokens=9, ignore_eos=True),
        SamplingParams(max_tokens=14, stop=(":", "4"), ignore_eos=True),
        SamplingParams(max_tokens=14, stop_token_ids=tuple(stop_ids), ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.9, seed=3, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=8, repetition_penalty=1.4, ignore_eos=True),
        SamplingParams(max_tokens=11),
    ]

    def run(pipeline: bool) -> list[tuple[str, str | None, list[tuple[int, float]]]]:
        dec = world.decoder(3, pipeline=pipeline)
        rows = [
            (Sink(leave_after=4 if i == 6 else None), p_ids, kinds[i % len(kinds)], names[i % 3])
            for i, p_ids in enumerate(ids[:9])
        ]
        dec.run(rows)
        assert dec.free() == 3
        return [
            (s.text, s.reason, [(t.token, round(t.logprob, 4)) for t in s.tokens])
            for s, _, _, _ in rows
        ]

    want, got = run(False), run(True)
    assert got == want
    reasons = [r for _, r, _ in want]
    assert reasons.count("stop") >= 2 and "cancelled" in reasons and "length" in reasons, reasons


def test_a_row_that_leaves_frees_its_slot(world: World) -> None:
    dec = ContinuousDecoder(world.model, world.tokenizer, slots=2, max_len=MAX_LEN)
    ids = prompts(world)
    leaving = Sink(leave_after=2)
    rows = [
        (leaving, ids[0], SamplingParams(max_tokens=40, ignore_eos=True), None),
        (Sink(), ids[1], SamplingParams(max_tokens=5), None),
        (Sink(), ids[2], SamplingParams(max_tokens=5), None),
    ]
    dec.run(rows)
    assert leaving.reason == "cancelled" and len(leaving.text) < 40
    assert all(s.reason in ("stop", "length") for s, _, _, _ in rows[1:])
    assert dec.free() == 2


@pytest.mark.gpu
def test_mixed_rows_on_cuda_equal_their_patterns_pruned_model(serve_world: ServeWorld) -> None:
    """The same on a GPU (fp32; the union resident on the device, per-row masks there)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    src = resolve_model(str(serve_world.model))
    try:
        _, patterns, _ = build_patterns(
            serve_world.store, src, keep=KEEP, budget=None, dtype=torch.float32
        )
        union = union_keep(patterns, src.num_experts)
        model = ResidentModel(src, union, device="cuda", dtype=torch.float32).model.eval()
        routing = RowRouting(model, src.arch, union, patterns)
        assert routing.verify(model) is None
        tok = serve_world.tokenizer
        names = list(patterns)
        dec = ContinuousDecoder(
            model, tok, slots=4, max_len=MAX_LEN, prefill_tokens=7, routing=routing
        )
        texts = [r["prompt"] for t in ("add", "reverse") for r in generate(t, 6, 5, "eval")]
        rows = [
            (Sink(), tok(t)["input_ids"], SamplingParams(max_tokens=10), names[i % 3])
            for i, t in enumerate(texts)
        ]
        dec.run(rows)
        for sink, ids, params, pattern in rows:
            ref = load_pruned(src, patterns[pattern], device="cuda", dtype=torch.float32).eval()
            x = torch.tensor([ids], device="cuda")
            with torch.no_grad():
                out = ref.generate(
                    input_ids=x,
                    attention_mask=torch.ones_like(x),
                    do_sample=False,
                    max_new_tokens=params.max_tokens,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            assert sink.text == tok.decode(out[0, x.shape[1] :], skip_special_tokens=True)
    finally:
        src.close()
