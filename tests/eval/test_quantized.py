"""`evaluate(quantize=...)` and `premoe eval --quantize`: rows per precision at equal memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from premoe.errors import UsageError
from premoe.eval.runner import NONE, evaluate, parse_precisions
from tests.eval.conftest import TASKS
from tests.helpers import assert_one_line_error, run_cli
from tests.quantized import write_quantized

KW = {"keeps": [2, 8], "methods": "tcess,random", "routing": False, "device": "cpu"}
# the tiny model's experts are [16, 32] and [32, 16]: blocks and groups of 8 divide both
SIZES = {"block": 8, "group_size": 8}


def _evaluate(model: Path, store: Path, suite: dict, **kw):
    return evaluate(
        model,
        store,
        list(TASKS),
        eval_sets={t: suite[t]["eval"] for t in TASKS},
        threads=1,
        **{**KW, **kw},
    )


@pytest.fixture(scope="module")
def plain(eval_model, eval_store, eval_suite):
    return _evaluate(eval_model, eval_store, eval_suite)


@pytest.fixture(scope="module")
def quantized(eval_model, eval_store, eval_suite):
    return _evaluate(eval_model, eval_store, eval_suite, quantize="none,fp8,int4", **SIZES)


def test_a_row_per_precision_with_its_expert_bytes(quantized) -> None:
    assert quantized.precisions == [NONE, "fp8", "int4"]
    data = json.loads(json.dumps(quantized.to_json()))
    assert data["precisions"] == [NONE, "fp8", "int4"]
    assert len(data["results"]) == len(TASKS) * 2 * 2 * 3
    assert {r["precision"] for r in data["results"]} == {NONE, "fp8", "int4"}
    assert data["options"]["quantize"] == {"block": 8, "group_size": 8}
    for t in TASKS:
        for k in (2, 8):
            dense, fp8, int4 = (quantized.row(t, "tcess", k, p) for p in (NONE, "fp8", "int4"))
            # fp32 experts: 4 bytes per weight; fp8 1 (+ scales); int4 1/2 (+ scales)
            assert dense.expert_bytes > 3 * fp8.expert_bytes > 0
            assert fp8.expert_bytes > int4.expert_bytes > dense.expert_bytes / 8
            assert dense.checkpoint_bytes > fp8.checkpoint_bytes > int4.checkpoint_bytes
            # what ran held the experts quantized
            assert dense.resident_bytes > fp8.resident_bytes > int4.resident_bytes
            assert int4.expert_bytes == k * (int4.expert_bytes // k)
            for row in (fp8, int4):
                assert row.score.n == 12 and 0.0 <= row.score.value <= 1.0
                assert row.dropped_mass is not None
    # twice the experts cost twice the bytes at every precision
    for p in (NONE, "fp8", "int4"):
        a, b = quantized.row("add", "tcess", 2, p), quantized.row("add", "tcess", 8, p)
        assert b.expert_bytes == 4 * a.expert_bytes


def test_the_none_rows_equal_the_unquantized_eval(plain, quantized) -> None:
    assert plain.precisions == [NONE]
    for r in plain.rows:
        q = quantized.row(r.task, r.method, r.keep, NONE)
        assert q.score.predictions == r.score.predictions and q.score.value == r.score.value
        assert (q.resident_bytes, q.checkpoint_bytes) == (r.resident_bytes, r.checkpoint_bytes)
        assert q.dropped_mass == pytest.approx(r.dropped_mass)
        assert r.precision == NONE and r.expert_bytes == q.expert_bytes > 0


def test_quantized_experts_change_the_answers_a_little(quantized) -> None:
    """int4 with groups of 8 on a random model: some answers differ from fp32, most agree."""
    same = total = 0
    for t in TASKS:
        a = quantized.row(t, "tcess", 8, NONE).score.predictions
        b = quantized.row(t, "tcess", 8, "int4").score.predictions
        same += sum(x == y for x, y in zip(a, b, strict=True))
        total += len(a)
    assert total and same / total > 0.5


def test_parse_precisions() -> None:
    assert parse_precisions(None) == [NONE]
    assert parse_precisions("int4, none,int4") == ["int4", NONE]
    assert parse_precisions(["fp8", "none,int4"]) == ["fp8", NONE, "int4"]
    with pytest.raises(UsageError, match="unknown quantization scheme 'int3'"):
        parse_precisions("none,int3")
    with pytest.raises(UsageError, match="--quantize is empty"):
        parse_precisions(" , ")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"quantize": "int3"}, "unknown quantization scheme 'int3'"),
        ({"quantize": "int4", "group_size": 12}, "group size 12 does not divide"),
        ({"quantize": "fp8"}, "block 128x128 does not divide"),
        ({"quantize": "int4", "group_size": 8, "via": "export"}, "use --via load"),
    ],
)
def test_bad_quantization_fails_before_any_model_runs(
    eval_model, eval_store, eval_suite, kw, match
) -> None:
    with pytest.raises(UsageError, match=match):
        _evaluate(eval_model, eval_store, eval_suite, **kw)


@pytest.fixture(scope="module")
def fp8_source(eval_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_fp8") / "q"
    write_quantized(eval_model, out, "fp8_block", block=(8, 8))
    for f in eval_model.glob("*token*"):  # the tokenizer files
        (out / f.name).write_bytes(f.read_bytes())
    return out


def test_cli_refuses_in_one_line(eval_model, eval_store, eval_suite, fp8_source, capsys) -> None:
    base = ["--task", "add", "--eval-set", str(eval_suite["add"]["eval"]), "--keep", "2"]
    base += ["--method", "random", "--no-routing", "--device", "cpu", "--threads", "1"]
    cases = [
        (eval_model, ["--quantize", "none,int3"], "unknown quantization scheme 'int3'"),
        (eval_model, ["--quantize", "int4", "--group-size", "12"], "group size 12"),
        (eval_model, ["--quantize", "fp8", "--block", "5"], "block 5x5 does not divide"),
        (fp8_source, ["--quantize", "int4", "--group-size", "8"], "already fp8_block"),
    ]
    for folder, opts, needle in cases:
        code, _, err = run_cli(["eval", str(folder), *base, *opts], capsys)
        assert_one_line_error(code, err, needle)


def test_cli_table_json_and_plot(eval_model, eval_store, eval_suite, tmp_path, capsys) -> None:
    args = ["eval", str(eval_model), "--store", str(eval_store), "--task", "add"]
    args += ["--eval-set", str(eval_suite["add"]["eval"]), "--keep", "2,4", "--method", "tcess"]
    args += ["--no-routing", "--device", "cpu", "--threads", "1", "--quantize", "none,int4"]
    args += ["--group-size", "8"]
    code, out, err = run_cli([*args, "--plot", str(tmp_path / "q.png")], capsys)
    assert code == 0, err
    assert "at equal memory" in out and "int4" in out and "experts" in out
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = run_cli([*args, "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert {(r["keep"], r["precision"]) for r in rows} == {
        (k, p) for k in (2, 4) for p in (NONE, "int4")
    }
    assert all(r["expert_bytes"] > 0 for r in rows)
