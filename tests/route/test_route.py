"""Routing: query keys cost no expert, held-out prompts reach their task, fallback, CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from premoe.demo.tasks import read_jsonl
from premoe.errors import StoreError, UsageError
from premoe.patterns import GLOBAL, PatternStore
from premoe.profile import profile
from premoe.profile.hooks import experts_module, router_module
from premoe.route import QueryKeyer, route
from tests.helpers import assert_one_line_error, needs_cuda, run_cli, tiny_model, tokenizer


def _experts_on_meta(model):
    """A copy of `model` whose every routed-expert parameter lives on the meta device."""
    from premoe.arch import arch_for_config

    stripped = copy.deepcopy(model)
    arch = arch_for_config(stripped.config)
    for layer in arch.moe_layer_ids(stripped.config):
        experts_module(stripped, arch, layer).to_empty(device="meta")
    metas = [n for n, p in stripped.named_parameters() if p.is_meta]
    assert metas and all(".experts." in n for n in metas)
    return stripped


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("kind", ["router_input", "tcess"])
def test_query_key_touches_no_expert(family, kind, tmp_path: Path) -> None:
    model = tiny_model(family)
    tok = tokenizer()
    texts = ["12+345=", "kqzb>", "QDKA:"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    store = profile(model, {"t": corpus}, tokenizer=tok, key=kind, batch_size=3)
    intact = QueryKeyer.for_store(store, model, tok)
    stripped = _experts_on_meta(model)
    with pytest.raises((NotImplementedError, RuntimeError)):  # a full forward needs experts
        with torch.no_grad():
            stripped.model(input_ids=torch.tensor([tok(texts[0])["input_ids"]]), use_cache=False)
    meta = QueryKeyer.for_store(store, stripped, tok)
    got = meta.keys(texts)
    assert np.array_equal(got, intact.keys(texts))
    # the key of a text equals its key as a calibration sample (same computation as the store)
    assert np.allclose(got, store.keys("t", kind), atol=1e-5)
    for i, text in enumerate(texts):  # one query alone (no padding: attention's causal path)
        alone = meta.key_tensor(text)
        assert alone.dtype == torch.float32 and alone.device == torch.device("cpu")
        assert np.allclose(alone.numpy(), store.keys("t", kind)[i], atol=1e-5)
    assert got.shape[1] == (store.num_experts if kind == "tcess" else model.config.hidden_size)


@pytest.fixture(scope="module")
def routed(demo_suite):
    model = tiny_model("qwen3_moe")
    tok = tokenizer()
    store = profile(
        model, {t: p["profile"] for t, p in demo_suite.items()}, tokenizer=tok, batch_size=16
    )
    return store, QueryKeyer.for_store(store, model, tok)


def test_held_out_prompts_route_to_their_task(routed, demo_suite) -> None:
    store, keyer = routed
    report = {}
    for task, paths in demo_suite.items():
        rows = read_jsonl(paths["eval"])
        hits = [route(store, keyer, r["prompt"]).task == task for r in rows]
        report[task] = sum(hits) / len(hits)
    print(f"held-out routing accuracy (tiny random qwen3_moe): {report}")
    assert min(report.values()) >= 0.9, report


def test_fallback_and_candidates(routed) -> None:
    store, keyer = routed
    res = route(store, keyer, "12+34=")
    assert res.task == "add" and not res.fallback
    assert [c.task for c in res.candidates][0] == "add"
    assert res.similarity == res.candidates[0].similarity
    low = route(store, keyer, "12+34=", threshold=1.01)
    assert low.fallback and low.task == GLOBAL and low.similarity == res.similarity
    assert route(store, keyer, "12+34=", threshold=1.01, fallback="sort").task == "sort"
    assert route(store, keyer, "12+34=", threshold=1.01, fallback=None).task == "add"
    with pytest.raises(StoreError, match="fallback pattern 'nope'"):
        route(store, keyer, "12+34=", fallback="nope")
    for empty in ("", "   "):
        with pytest.raises(UsageError, match="empty"):
            route(store, keyer, empty)
    assert set(res.to_json()) == {"task", "similarity", "fallback", "candidates"}
    assert torch.equal(store.scores(low.task), store.pooled_scores())


def test_route_cli(tiny_dir, demo_suite, tmp_path: Path, capsys) -> None:
    model = str(tiny_dir("qwen3_moe"))
    store = tmp_path / "s"
    tasks = [a for t in ("add", "reverse") for a in ("--task", f"{t}={demo_suite[t]['profile']}")]
    code, _, err = run_cli(["profile", model, "--out", str(store), *tasks], capsys)
    assert code == 0, err
    code, out, err = run_cli(["route", str(store), model, "123+45=", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"task", "similarity", "fallback", "candidates"}
    assert data["task"] == "add" and data["fallback"] is False
    assert all(set(c) == {"task", "similarity"} for c in data["candidates"])
    code, out, _ = run_cli(["route", str(store), model, "123+45=", "--threshold", "2"], capsys)
    assert code == 0 and "__global__" in out and "fallback" in out
    code, _, err = run_cli(["route", str(store), model, ""], capsys)
    assert_one_line_error(code, err, "prompt is empty")
    other = str(tiny_dir("qwen3_moe", seed=1))
    capsys.readouterr()
    code, _, err = run_cli(["route", str(store), other, "123+45="], capsys)
    assert_one_line_error(code, err, "another model")
    code, _, err = run_cli(["route", str(tmp_path / "none"), model, "x"], capsys)
    assert_one_line_error(code, err, "no pattern store")
    assert PatternStore.load(store).task_names == ["add", "reverse"]


DEMO_MODEL = Path(__file__).resolve().parents[2] / "premoe" / "demo" / "model"


@pytest.mark.skipif(not (DEMO_MODEL / "config.json").exists(), reason="no trained demo model")
def test_demo_model_routes_held_out_prompts(tmp_path: Path) -> None:
    """On the trained demo model, held-out prompts of each of the five tasks route to their
    own task with the default key (router_input, kNN vote)."""
    from premoe.demo.tasks import task_names, write_suite
    from premoe.profile import load_causal_lm, load_tokenizer

    suite = write_suite(tmp_path, n_profile=64, n_eval=40, seed=0)
    tok = load_tokenizer(DEMO_MODEL)
    model = load_causal_lm(DEMO_MODEL, device="cpu", dtype="fp32")
    store = profile(
        model, {t: suite[t]["profile"] for t in task_names()}, tokenizer=tok, batch_size=64
    )
    keyer = QueryKeyer.for_store(store, model, tok)
    report = {}
    for task in task_names():
        prompts = [r["prompt"] for r in read_jsonl(suite[task]["eval"])]
        hits = [store.search(key, k=1)[0][0] == task for key in keyer.keys(prompts)]
        report[task] = sum(hits) / len(hits)
    print(f"held-out routing accuracy (demo model): {report}")
    assert sum(report.values()) / len(report) >= 0.95 and min(report.values()) >= 0.85, report


def test_cuda_graph_keys_need_one_cuda_device() -> None:
    model = tiny_model("qwen3_moe")
    assert QueryKeyer(model, tokenizer())._graphs is None  # CPU: eager keys
    with pytest.raises(UsageError, match="one CUDA device"):
        QueryKeyer(model, tokenizer(), cuda_graphs=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("kind", ["router_input", "tcess"])
def test_cuda_graph_keys_equal_eager_keys(family: str, kind: str) -> None:
    """A single query's key replayed from a CUDA graph (padded to its length bucket) equals the
    eager key, across buckets, and sees in-place router changes (what a swap does)."""
    model = tiny_model(family).cuda()
    tok = tokenizer()
    graphed = QueryKeyer(model, tok, key_spec={"kind": kind})
    eager = QueryKeyer(model, tok, key_spec={"kind": kind}, cuda_graphs=False)
    assert graphed._graphs is not None and eager._graphs is None

    def same(n: int) -> None:
        ids = [[3 + (7 * i) % 90 for i in range(n)]]
        got = graphed.tensor_keys_from_ids(ids)
        torch.testing.assert_close(got, eager.tensor_keys_from_ids(ids), atol=1e-4, rtol=1e-4)

    for n in (1, 5, 16, 17, 40):
        same(n)
    if family != "gpt_oss":
        assert not graphed._graphs.failed and set(graphed._graphs.graphs) == {16, 32, 64}
    # gpt_oss attends eagerly (attention sinks) and transformers' eager mask copies a host scalar
    # to the GPU (transformers 5.17), which no CUDA graph can capture: its keys stay eager and
    # right, with a warning
    router = router_module(model, graphed.arch, graphed.layer)
    with torch.no_grad():
        next(router.parameters()).mul_(-1.5)
    same(17)
