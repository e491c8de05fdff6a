"""`evaluate()` and `premoe eval`: methods x keep counts, full-model row, export = load, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from premoe.errors import CorpusError, StoreError, UsageError
from premoe.eval.harness import load_eval_set, score
from premoe.eval.runner import ModelShape, evaluate, method_keep, parse_eval_sets
from premoe.load import load_pruned
from premoe.patterns import PatternStore
from premoe.policy import select_nonuniform
from premoe.source import load_tokenizer, resolve_model
from premoe_cli.app import app
from tests.eval.conftest import TASKS

runner = CliRunner()


def _evaluate(model: Path, store: Path, suite: dict, **kw):
    kw.setdefault("eval_sets", {t: suite[t]["eval"] for t in TASKS})
    kw.setdefault("device", "cpu")
    kw.setdefault("threads", 1)
    return evaluate(model, store, list(TASKS), **kw)


@pytest.fixture(scope="module")
def report(eval_model, eval_store, eval_suite):
    return _evaluate(
        eval_model,
        eval_store,
        eval_suite,
        keeps=[2, 4, 8],
        methods="tcess,frequency,global,random,routed",
    )


def test_full_row_and_every_method_and_keep(report) -> None:
    assert report.methods == ["tcess", "frequency", "global", "random", "routed"]
    assert report.keeps == [2, 4, 8] and report.num_experts == 8 and report.top_k == 2
    assert set(report.full) == set(TASKS)
    for t in TASKS:
        assert report.full[t].kind == "accuracy" and report.full[t].n == 12
        for m in report.methods:
            for k in report.keeps:
                row = report.row(t, m, k)
                assert row.score.n == 12 and 0.0 <= row.score.value <= 1.0
                assert row.full is report.full[t]
    # fewer experts, fewer bytes; K = E is the full model
    sizes = [report.row("add", "tcess", k).checkpoint_bytes for k in (2, 4, 8)]
    assert sizes[0] < sizes[1] < sizes[2] == report.full_checkpoint_bytes
    data = json.loads(json.dumps(report.to_json()))  # strict JSON (no NaN)
    assert len(data["results"]) == 3 * 5 * 3
    assert {"premoe_version", "fingerprint", "routing", "eval_sets", "options"} <= set(data)


def test_keeping_every_expert_reproduces_the_full_model(report) -> None:
    """Pruning is exact: at K = E every method gives the full model's very answers."""
    for t in TASKS:
        for m in report.methods:
            assert report.row(t, m, 8).score.predictions == report.full[t].predictions


def test_methods_choose_their_own_experts(eval_model, eval_store) -> None:
    st = PatternStore.load(eval_store)
    src = resolve_model(eval_model)
    shape = ModelShape(tuple(src.moe_layers), src.num_experts, src.top_k, (1, 1))
    src.close()
    tc = method_keep(st, "add", "tcess", 2, shape)
    top = st.scores("add", "tcess").argsort(dim=1, descending=True)[:, :2]
    assert tc.layers == {
        layer: tuple(sorted(top[i].tolist())) for i, layer in enumerate(st.moe_layers)
    }
    glob = method_keep(st, "add", "global", 2, shape)
    assert glob == method_keep(st, "sort", "global", 2, shape)  # task-agnostic
    rnd = method_keep(st, "add", "random", 2, shape, seed=3)
    assert rnd == method_keep(st, "sort", "random", 2, shape, seed=3)
    assert rnd != method_keep(st, "add", "random", 2, shape, seed=4)


def test_nonuniform_rows_score_the_ragged_pruned_model(eval_model, eval_store, eval_suite) -> None:
    """`nonuniform`: K x layers experts spread over the layers by the task's scores, scored on
    exactly what `load_pruned` builds from those ragged keep sets (a model per count pattern)."""
    st = PatternStore.load(eval_store)
    src = resolve_model(eval_model)
    shape = ModelShape(tuple(src.moe_layers), src.num_experts, src.top_k, (1, 1))
    keeps = {t: method_keep(st, t, "nonuniform", 3, shape) for t in TASKS}
    for t, keep in keeps.items():
        total = 3 * len(shape.layers)
        assert keep == select_nonuniform(
            st.scores(t, st.default_metric), shape.layers, total, routed=2, cap=8
        )
        assert sum(len(v) for v in keep.layers.values()) == total
    assert not all(k.is_uniform for k in keeps.values()), "the test could not fail"
    rep = _evaluate(eval_model, eval_store, eval_suite, keeps=[3], methods="tcess,nonuniform",
                    routing=False)  # fmt: skip
    tok = load_tokenizer(src.path)
    for t, keep in keeps.items():
        net = load_pruned(src, keep, device="cpu").eval()
        want = score(net, tok, load_eval_set(t, eval_suite[t]["eval"]))
        assert rep.row(t, "nonuniform", 3).score.predictions == want.predictions
    src.close()


def test_routing_accuracy_is_reported(report) -> None:
    r = report.routing
    assert r is not None and set(r.per_task) == set(TASKS)
    assert r.n == 36 and 0 <= r.correct <= 36
    for t, v in r.per_task.items():
        assert sum(v["routed"].values()) == v["n"] == 12
        assert v["correct"] == v["routed"].get(t, 0)
        assert len(r.routes[t]) == 12
    # the routed method used, per query, the pattern routing chose: when every query of a
    # task routed to itself, routed == tcess
    for t in TASKS:
        if r.per_task[t]["accuracy"] == 1.0:
            for k in report.keeps:
                assert (
                    report.row(t, "routed", k).score.predictions
                    == report.row(t, "tcess", k).score.predictions
                )


def test_export_equals_load(eval_model, eval_store, eval_suite, tmp_path) -> None:
    kw = {"keeps": [4], "methods": "tcess,random", "routing": False}
    via_load = _evaluate(eval_model, eval_store, eval_suite, **kw)
    via_export = _evaluate(eval_model, eval_store, eval_suite, via="export", workdir=tmp_path, **kw)
    for t in TASKS:
        for m in ("tcess", "random"):
            a, b = via_load.row(t, m, 4), via_export.row(t, m, 4)
            assert a.score.predictions == b.score.predictions
            assert a.score.value == b.score.value
            assert a.resident_bytes == b.resident_bytes
    assert via_export.options["via"] == "export" and via_load.routing is None
    assert not any(tmp_path.iterdir())  # exports were temporary


def test_perplexity_mode_for_sets_without_answers(eval_model, eval_store, tmp_path) -> None:
    texts = tmp_path / "add.jsonl"
    texts.write_text("\n".join(json.dumps({"text": f"{i}+{i}={2 * i}"}) for i in range(10)))
    rep = evaluate(
        eval_model,
        eval_store,
        ["add"],
        keeps=[2, 8],
        methods="tcess,random",
        eval_sets=[f"add={texts}"],
        device="cpu",
        threads=1,
    )
    assert rep.full["add"].kind == "perplexity" and rep.full["add"].value > 1.0
    full = rep.full["add"].value
    assert rep.row("add", "tcess", 8).score.value == pytest.approx(full, rel=1e-5)
    assert rep.row("add", "random", 2).score.kind == "perplexity"
    assert rep.to_json()["eval_sets"]["add"]["kind"] == "perplexity"


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"methods": "tcess,bogus"}, UsageError, "unknown method 'bogus'"),
        ({"methods": "reap"}, StoreError, "needs the reap metric"),
        ({"keeps": [1, 4]}, UsageError, "fewer than the 2 experts routed"),
        ({"keeps": [16]}, UsageError, "more than the model's 8"),
        ({"keeps": "4,x"}, UsageError, "--keep expects counts"),
        ({"via": "ftp"}, UsageError, "unknown --via"),
        ({"methods": "nonuniform", "via": "export"}, UsageError, "only --via load"),
        ({"eval_sets": {"add": "/nonexistent.jsonl"}}, CorpusError, "does not exist"),
    ],
)
def test_bad_input_is_a_clear_error(eval_model, eval_store, eval_suite, kw, error, match) -> None:
    with pytest.raises(error, match=match):
        _evaluate(eval_model, eval_store, eval_suite, **kw)


def test_task_not_in_store_and_no_default_eval_set(eval_model, eval_store) -> None:
    with pytest.raises(StoreError, match="not in the store"):
        evaluate(eval_model, eval_store, ["close"], methods="tcess", device="cpu")
    with pytest.raises(UsageError, match="no default eval set"):
        evaluate(eval_model, eval_store, ["math"], methods="random", keeps=[2], device="cpu")


def test_eval_set_specs() -> None:
    assert parse_eval_sets(["a=x.jsonl"], ["a", "b"])["a"].path == "x.jsonl"
    shared = parse_eval_sets(["all.jsonl"], ["a", "b"])
    assert shared["a"].by_task and shared["b"].path == "all.jsonl"
    assert not parse_eval_sets(["one.jsonl"], ["a"])["a"].by_task
    with pytest.raises(UsageError, match="not among the tasks"):
        parse_eval_sets(["c=x.jsonl"], ["a"])


def test_cli_json_table_and_plot(eval_model, eval_store, eval_suite, tmp_path) -> None:
    plot = tmp_path / "eval.png"
    args = ["eval", eval_model, "--store", eval_store, "--task", "add", "--task", "sort"]
    args += [
        "--eval-set",
        eval_suite["add"]["eval"],
        "--eval-set",
        f"sort={eval_suite['sort']['eval']}",
    ]
    args += ["--keep", "2,4", "--method", "tcess,random", "--device", "cpu", "--threads", "1"]
    res = runner.invoke(app, [*map(str, args), "--json", "--plot", str(plot)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {(r["task"], r["method"], r["keep"]) for r in data["results"]} == {
        (t, m, k) for t in ("add", "sort") for m in ("tcess", "random") for k in (2, 4)
    }
    assert "predictions" not in data["results"][0]
    # the plot is not overwritten without --overwrite; table output
    res = runner.invoke(app, [*map(str, args), "--plot", str(plot)])
    assert res.exit_code != 0 and "already exists" in str(res.exception)
    res = runner.invoke(app, list(map(str, args)))
    assert res.exit_code == 0, res.output
    assert "task add: exact-match accuracy on 12 held-out rows" in res.output
    assert "K=2/8" in res.output and "routing (key router_input/knn)" in res.output
