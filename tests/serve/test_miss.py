"""Miss-aware serving in process (premoe.serve.miss): the dropped mass of every row of a mixed
continuous batch equals that row metered alone, and equals `premoe generate`'s definition (the
library decode loop on the pattern's own pruned model); rows taken out by a reroute continue
where they left off under their new pattern."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from premoe.demo.tasks import generate
from premoe.load import ResidentModel, load_pruned
from premoe.load.decode import decode
from premoe.load.miss import DroppedMass, shadow_meter
from premoe.serve.continuous import ContinuousDecoder, Seq, decoder_layers
from premoe.serve.decode import SamplingParams
from premoe.serve.graphs import Regions
from premoe.serve.miss import RowMeter, SlotMiss, merge
from premoe.serve.patterns import build_patterns
from premoe.serve.rowmask import RowRouting, union_keep
from premoe.source import resolve_model
from tests.helpers import GPU, run_triton_script
from tests.serve.conftest import KEEP, MAX_LEN, ServeWorld, mixed_on_cuda
from tests.serve.test_continuous import GraphLog, decode_shapes


@dataclass(eq=False)
class Sink:
    cancelled: bool = False
    text: str = ""
    reason: str | None = None
    tokens: int = 0

    def on_delta(self, text: str, completion_tokens: int) -> None:
        self.text += text

    def on_finish(self, reason: str, completion_tokens: int) -> None:
        self.reason, self.tokens = reason, completion_tokens


@dataclass
class World:
    source: Any
    tokenizer: Any
    patterns: dict[str, Any]
    model: Any
    routing: RowRouting
    meter: RowMeter
    refs: dict[str, Any] = field(default_factory=dict)

    def decoder(
        self, slots: int, pipeline: bool = False, **miss: Any
    ) -> tuple[ContinuousDecoder, dict[Any, DroppedMass]]:
        dec = ContinuousDecoder(
            self.model,
            self.tokenizer,
            slots=slots,
            max_len=MAX_LEN,
            routing=self.routing,
            pipeline=pipeline,
        )
        masses: dict[Any, DroppedMass] = {}

        def on_mass(seq: Seq, mass: DroppedMass) -> None:
            masses[seq.sink] = mass

        dec.miss = SlotMiss(self.meter, slots, on_mass=on_mass, **miss)
        return dec, masses


@pytest.fixture(scope="module")
def world(serve_world: ServeWorld) -> Iterator[World]:
    src = resolve_model(str(serve_world.model))
    _, patterns, _ = build_patterns(
        serve_world.store, src, keep=KEEP, budget=None, dtype=torch.float32
    )
    union = union_keep(patterns, src.num_experts)
    model = ResidentModel(src, union, device="cpu", dtype=torch.float32).model.eval()
    routing = RowRouting(model, src.arch, union, patterns)
    meter = RowMeter(model, src, patterns)
    meter.attach()
    yield World(src, serve_world.tokenizer, patterns, model, routing, meter)
    meter.detach()
    src.close()


def prompts(world: World) -> list[list[int]]:
    texts = [r["prompt"] for t in ("add", "reverse") for r in generate(t, 3, 5, "eval")]
    return [world.tokenizer(t)["input_ids"] for t in texts]


def close(a: DroppedMass, b: DroppedMass) -> bool:
    return (
        a.tokens == b.tokens
        and abs(a.mean - b.mean) < 1e-5
        and abs(a.max - b.max) < 1e-5
        and all(abs(x - y) < 1e-5 for x, y in zip(a.per_layer, b.per_layer, strict=True))
    )


def test_rows_of_a_mixed_batch_meter_as_alone_and_as_generate(world: World) -> None:
    names = list(world.patterns)
    # rows end at different steps: later decode steps have idle slots between live ones
    jobs = [(ids, names[i % len(names)], 4 + 5 * (i % 3)) for i, ids in enumerate(prompts(world))]
    dec, mixed = world.decoder(4)
    rows = [
        (Sink(), ids, SamplingParams(max_tokens=n, ignore_eos=True), pattern)
        for ids, pattern, n in jobs
    ]
    dec.run(rows)
    assert len(mixed) == len(rows)
    spread = set()
    for sink, ids, params, pattern in rows:
        got = mixed[sink]
        assert got.tokens == params.max_tokens - 1  # every generated token read back
        alone_dec, alone = world.decoder(1)
        one = Sink()
        alone_dec.run([(one, ids, params, pattern)])
        assert one.text == sink.text
        assert close(alone[one], got), (pattern, alone[one], got)
        # generate's definition: the library loop on the pattern's own pruned model
        if pattern not in world.refs:
            world.refs[pattern] = load_pruned(
                world.source, world.patterns[pattern], device="cpu", dtype=torch.float32
            ).eval()
        ref = world.refs[pattern]
        meter = shadow_meter(ref, world.source, world.patterns[pattern].layers)
        with meter:
            out = decode(ref, ids, max_new_tokens=params.max_tokens, meter=meter)
        assert out.mass is not None and close(out.mass, got), (pattern, out.mass, got)
        spread.add(round(got.mean, 4))
    assert len(spread) > 1, "every row measured the same: the test could not fail"


def test_pipelined_rows_meter_as_unpipelined_ones(world: World) -> None:
    """Rows that end on a stop string are seen to end only after the next step has fed their
    last token again: their figures are still those up to the step that sampled it."""
    names = list(world.patterns)
    params = [
        SamplingParams(max_tokens=12, stop=(":", "4"), ignore_eos=True),
        SamplingParams(max_tokens=7, ignore_eos=True),
    ]
    got = {}
    for pipeline in (False, True):
        dec, masses = world.decoder(3, pipeline=pipeline)
        rows = [
            (Sink(), ids, params[i % 2], names[i % len(names)])
            for i, ids in enumerate(prompts(world))
        ]
        dec.run(rows)
        got[pipeline] = [(s.text, s.reason, masses[s]) for s, _, _, _ in rows]
    assert [g[:2] for g in got[True]] == [g[:2] for g in got[False]]
    assert any(r == "stop" for _, r, _ in got[False]), "no row stopped early: could not fail"
    for (_, _, a), (_, _, b) in zip(got[True], got[False], strict=True):
        assert close(a, b), (a, b)


def test_reroute_takes_a_row_out_and_resumes_it_under_the_new_pattern(world: World) -> None:
    """A row rerouted mid-decode leaves its slot; resumed under the other pattern its text
    continues as that pattern's pruned model would on prompt + text so far."""
    decided: list[tuple[int, float]] = []

    def decide(seq: Seq, mass: float) -> bool:
        if decided or seq.generated == 0:  # not on the prompt: mid-decode
            return False
        decided.append((seq.generated, mass))
        return True

    dec, masses = world.decoder(2, window=3, threshold=0.0, decide=decide)
    ids = prompts(world)[0]
    sink = Sink()
    seq = dec.add(sink, ids, SamplingParams(max_tokens=9, ignore_eos=True), "math")
    moved = None
    while dec.active() or moved is not None:
        if moved is not None:
            dec.resume(moved, "code")
            moved = None
        report = dec.step()
        if report.rerouted:
            (moved,) = report.rerouted
            assert moved is seq and not dec.active()
    assert decided and decided[0][0] == 3  # checked after the 3rd generated token was fed
    assert sink.reason == "length" and sink.tokens == 9
    done = world.tokenizer(sink.text, add_special_tokens=False)["input_ids"]
    head = done[:3]  # decoded under math; the rest under code, from prompt + head
    ref = load_pruned(world.source, world.patterns["code"], device="cpu", dtype=torch.float32)
    x = torch.tensor([ids + head])
    with torch.no_grad():
        out = ref.eval().generate(
            input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=6
        )
    tail = world.tokenizer.decode(out[0, x.shape[1] :], skip_special_tokens=True)
    assert sink.text == world.tokenizer.decode(head, skip_special_tokens=True) + tail
    got = masses[sink]
    assert got.tokens == 8  # 3 fed under math (carried over) + 5 under code


def test_merge_weights_by_tokens() -> None:
    a = DroppedMass(2, 0.1, 0.2, 0.3, [0.1, 0.1])
    b = DroppedMass(6, 0.5, 0.6, 0.9, [0.5, 0.5])
    m = merge(a, b)
    assert m.tokens == 8 and abs(m.mean - 0.4) < 1e-9 and m.max == 0.6 and m.max_layer == 0.9
    assert merge(None, b) is b and merge(DroppedMass.empty(2), b) is b


def test_a_captured_step_measures_as_an_eager_step(world: World) -> None:
    """What a captured decode step records (router inputs tapped, then `SlotMiss.captured`, as
    graphs.py captures it) folds the same dropped mass into each slot as an eager metered step,
    each row against its own pattern (a row without one: the first pattern, as eager steps);
    idle rows and warm-up runs change nothing."""
    names = list(world.patterns)
    rows = [
        SimpleNamespace(slot=0, pattern=names[0]),
        None,
        SimpleNamespace(slot=2, pattern=names[-1]),
        SimpleNamespace(slot=3, pattern=None),
    ]
    ids = torch.tensor([[5], [0], [7], [9]])  # [B, 1]
    eager, captured = SlotMiss(world.meter, 4), SlotMiss(world.meter, 4)
    captured.enable_graphs()
    with torch.no_grad():
        with eager.forward(rows, 1, False):  # type: ignore[arg-type]
            world.model(ids)
        captured.before_replay(rows)  # type: ignore[arg-type]
        with captured.tapping():
            world.model(ids)
            captured.captured(4, warm=True)
            assert float(captured.gen.count.sum()) == 0.0
            captured.captured(4, warm=False)
    a, b = eager.gen, captured.gen
    for x, y in ((a.sum, b.sum), (a.max_layer, b.max_layer), (a.max_token, b.max_token)):
        assert torch.allclose(x, y, atol=1e-6), (x, y)
    assert a.count.tolist() == b.count.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert torch.allclose(a.win_sum, b.win_sum, atol=1e-6)
    assert float(a.sum[0].sum()) != float(a.sum[2].sum()), "the test could not fail"


def test_the_fold_kernel_under_the_interpreter() -> None:
    """The captured step's meter pass in two kernels (meter_fold.py) folds what the eager pass
    folds, for softmax and sigmoid routers, a logit bias and a correction, run by Triton's CPU
    interpreter (needs `triton`)."""
    stdout = run_triton_script(Path(__file__).with_name("meter_interpret_check.py"), 600)
    assert "fold ok" in stdout, stdout
    for family in ("qwen3_moe", "deepseek_v3", "gpt_oss"):
        assert f"{family} captured ok" in stdout, stdout
    assert "correction True" in stdout and "bias True" in stdout, stdout


def test_compiled_layers_tap_as_eager_layers(world: World) -> None:
    """The router inputs a captured step taps (`SlotMiss.tapping`) are the same through the
    compiled decoder layers (graphs.Regions) as eager, one graph serving every layer (the tap
    hook's layer index traced as a symbolic int) and the tap written in place, not through a
    view of the buffer."""
    log = GraphLog()
    torch._dynamo.reset()
    regions = Regions(decoder_layers(world.model), backend=log.backend)
    dec = ContinuousDecoder(world.model, world.tokenizer, slots=8, max_len=MAX_LEN)
    taps = []
    for compiled in (None, regions):
        miss = SlotMiss(world.meter, 8)
        miss.enable_graphs()
        with miss.tapping():
            for _, _ in decode_shapes(world, dec, compiled, True):
                assert world.meter._tap is not None
                taps.append(world.meter._tap.clone())
    half = len(taps) // 2
    assert float(taps[0].abs().sum()) > 0
    for eager, got in zip(taps[:half], taps[half:], strict=True):
        torch.testing.assert_close(got, eager)
    assert 0 < len(log.codes) <= 5, len(log.codes)
    assert not log.view_writes(), log.view_writes()


@GPU[0]
@GPU[1]
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_steps_meter_as_eager_steps(world: World, compile: bool) -> None:
    """Decode steps replayed from CUDA graphs measure every row's dropped mass as eager steps
    do (the captured step copies the router inputs into the meter's tap)."""
    union = world.routing.union
    model, routing = mixed_on_cuda(world.source, union, world.patterns, torch.float32)
    meter = RowMeter(model, world.source, world.patterns)
    meter.attach()
    names = list(world.patterns)
    jobs = [(ids, names[i % len(names)], 4 + 5 * (i % 3)) for i, ids in enumerate(prompts(world))]
    got: dict[bool, list[tuple[str, DroppedMass]]] = {}
    try:
        for graphs in (False, True):
            dec = ContinuousDecoder(
                model,
                world.tokenizer,
                slots=4,
                max_len=MAX_LEN,
                routing=routing,
                graphs=graphs,
                compile=compile and graphs,
            )
            masses: dict[Any, DroppedMass] = {}

            def on_mass(
                seq: Seq, mass: DroppedMass, masses: dict[Any, DroppedMass] = masses
            ) -> None:
                masses[seq.sink] = mass

            dec.set_miss(SlotMiss(meter, 4, on_mass=on_mass))
            rows = [
                (Sink(), ids, SamplingParams(max_tokens=n, ignore_eos=True), p)
                for ids, p, n in jobs
            ]
            dec.run(rows)
            if graphs:
                assert dec.graphs is not None and dec.graphs.graphs
            got[graphs] = [(sink.text, masses[sink]) for sink, _, _, _ in rows]
    finally:
        meter.detach()
    assert [t for t, _ in got[True]] == [t for t, _ in got[False]]
    for (_, a), (_, b) in zip(got[True], got[False], strict=True):
        assert a.tokens == b.tokens and abs(a.mean - b.mean) < 1e-4, (a, b)
    assert len({round(m.mean, 4) for _, m in got[False]}) > 1, "the test could not fail"
