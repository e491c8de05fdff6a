"""`--allocation nonuniform`: each pattern's keep sets are ragged (the uniform total, K experts
times the MoE layers, spread by the pattern's scores); rows of ragged patterns share decode steps
over the resident union (per-row router masks) and each row's greedy text equals its pattern's
own ragged pruned model (`premoe.load.load_pruned`); swap mode refuses them with one line."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from premoe.demo.tasks import generate
from premoe.load import ResidentModel, load_pruned
from premoe.policy import select_nonuniform
from premoe.prune import KeepSets
from premoe.serve import Engine, EngineConfig, RequestError, RouteInfo, SamplingParams
from premoe.serve.continuous import ContinuousDecoder
from premoe.serve.patterns import build_patterns
from premoe.serve.rowmask import RowRouting, union_keep
from premoe.source import resolve_model
from tests.helpers import assert_one_line_error, greedy_text, run_cli
from tests.serve.conftest import KEEP, MAX_LEN, ServeWorld
from tests.serve.test_continuous import run_joining
from tests.serve.test_engine import collect


@dataclass
class Ragged:
    source: Any
    tokenizer: Any
    patterns: dict[str, KeepSets]  # nonuniform
    uniform: dict[str, KeepSets]
    refs: dict[tuple[str, bool], Any] = field(default_factory=dict)

    def greedy(self, pattern: str, ids: list[int], n: int, *, ragged: bool = True) -> str:
        """Greedy text of `pattern`'s own pruned model (its ragged or its uniform keep sets)."""
        if (pattern, ragged) not in self.refs:
            keep = (self.patterns if ragged else self.uniform)[pattern]
            model = load_pruned(self.source, keep, device="cpu", dtype=torch.float32)
            self.refs[pattern, ragged] = model.eval()
        return greedy_text(self.refs[pattern, ragged], self.tokenizer, ids, n)


@pytest.fixture(scope="module")
def ragged(serve_world: ServeWorld) -> Iterator[Ragged]:
    src = resolve_model(str(serve_world.model))
    common: dict[str, Any] = {"keep": KEEP, "budget": None, "dtype": torch.float32}
    _, uniform, _ = build_patterns(serve_world.store, src, **common)
    _, patterns, _ = build_patterns(serve_world.store, src, allocation="nonuniform", **common)
    yield Ragged(src, serve_world.tokenizer, patterns, uniform)
    src.close()


def prompts(tokenizer: Any) -> list[list[int]]:
    texts = [r["prompt"] for t in ("add", "reverse") for r in generate(t, 6, 5, "eval")]
    return [tokenizer(t)["input_ids"] for t in texts]


def shape(keep: KeepSets) -> tuple[int, ...]:
    return tuple(len(v) for _, v in sorted(keep.layers.items()))


def test_nonuniform_patterns_are_ragged_with_the_uniform_total(
    serve_world: ServeWorld, ragged: Ragged
) -> None:
    src = ragged.source
    store, _, info = build_patterns(
        serve_world.store,
        src,
        keep=KEEP,
        budget=None,
        dtype=torch.float32,
        allocation="nonuniform",
    )
    assert info["allocation"] == "nonuniform" and info["keep"] == KEEP
    assert set(ragged.patterns) == set(ragged.uniform)
    layers = src.moe_layers
    for name, keep in ragged.patterns.items():
        assert sum(shape(keep)) == sum(shape(ragged.uniform[name])) == KEEP * len(layers)
        assert all(src.top_k <= n <= src.num_experts for n in shape(keep))
        scores = store.scores(name, store.default_metric)
        assert keep == select_nonuniform(
            scores, layers, KEEP * len(layers), routed=src.top_k, cap=src.num_experts
        )
    assert any(not k.is_uniform for k in ragged.patterns.values())
    # per-layer counts differ between patterns: the union and the masks must follow each one
    assert len({shape(k) for k in ragged.patterns.values()}) > 1
    with pytest.raises(Exception, match="--allocation"):
        build_patterns(
            serve_world.store, src, keep=KEEP, budget=None, dtype=torch.float32, allocation="x"
        )


def test_ragged_rows_mixed_in_continuous_steps_equal_their_own_pruned_model(
    ragged: Ragged,
) -> None:
    src, patterns = ragged.source, ragged.patterns
    union = union_keep(patterns, src.num_experts)
    model = ResidentModel(src, union, device="cpu", dtype=torch.float32).model.eval()
    routing = RowRouting(model, src.arch, union, patterns)
    assert routing.verify(model) is None
    # each pattern's mask opens exactly its own (ragged) count of slots in every layer
    for p, name in enumerate(routing.names):
        opened = (routing.masks[p] == 0).sum(dim=1).tolist()  # [L]
        assert tuple(opened) == shape(patterns[name])
    rng = random.Random(1)
    names = list(patterns)
    dec = ContinuousDecoder(
        model, ragged.tokenizer, slots=4, max_len=MAX_LEN, prefill_tokens=7, routing=routing
    )
    waiting = [
        (ids, names[i % len(names)], rng.randint(4, 14))
        for i, ids in enumerate(prompts(ragged.tokenizer))
    ]
    rng.shuffle(waiting)
    rows, reports = run_joining(dec, waiting, rng)
    mixed_steps = sum(len(report.patterns) > 1 for report in reports)
    assert mixed_steps > 0, "no step mixed patterns: the test could not fail"
    differ = 0
    for sink, ids, pattern, n in rows:
        assert sink.reason in ("stop", "length")
        assert sink.text == ragged.greedy(pattern, ids, n), (pattern, ids)
        if not patterns[pattern].is_uniform:
            differ += sink.text != ragged.greedy(pattern, ids, n, ragged=False)
    assert differ >= 1, "ragged and uniform keep sets agree on every row: the test could not fail"


def test_engine_serves_nonuniform_patterns_mixed(serve_world: ServeWorld, ragged: Ragged) -> None:
    def router(prompt: str) -> RouteInfo:
        return RouteInfo("math" if prompt[0].isdigit() else "code", 1.0, False, True)

    cfg = EngineConfig(
        model=str(serve_world.model),
        store=str(serve_world.store),
        keep=KEEP,
        allocation="nonuniform",
        device="cpu",
        dtype="fp32",
        max_batch=4,
        max_wait_ms=10,
    )
    eng = Engine(cfg, router=router)
    eng.start()
    try:
        assert eng.mixed and eng.info["allocation"] == "nonuniform"
        assert eng.patterns == ragged.patterns
        assert eng.info["experts_kept"] == KEEP  # the mean over layers
        texts = [r["prompt"] for t in ("add", "reverse") for r in generate(t, 3, 7, "eval")]

        async def run() -> list[tuple[str, RequestError | str]]:
            reqs = [
                eng.submit(eng.encode_prompt(t), t, SamplingParams(max_tokens=8)) for t in texts
            ]
            return list(await asyncio.gather(*(collect(r) for r in reqs)))

        for prompt, (text, finish) in zip(texts, asyncio.run(run()), strict=True):
            assert finish in ("stop", "length"), finish
            want = ragged.greedy(router(prompt).task, eng.encode_prompt(prompt), 8)
            assert text == want, prompt
        assert eng.metrics.steps.value(mode="mixed") > 0
    finally:
        eng.stop()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--allocation", "nonuniform", "--mixed", "off"], "nonuniform allocation needs"),
        (["--allocation", "nonuniform", "--scheduler", "batch"], "nonuniform allocation needs"),
        (["--allocation", "ragged"], "--allocation must be uniform or nonuniform"),
    ],
)
def test_serve_refuses_nonuniform_swapping_in_one_line(
    serve_world: ServeWorld, capsys: pytest.CaptureFixture[str], extra: list[str], words: str
) -> None:
    code, _, err = run_cli(
        ["serve", str(serve_world.model), "--store", str(serve_world.store), "--keep", str(KEEP)]
        + ["--device", "cpu", "--dtype", "fp32", *extra],
        capsys,
    )
    assert_one_line_error(code, err, words)
