"""`premoe demo`: a reduced run of the whole pipeline, on a tiny model and on the bundled one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from premoe.demo import MODEL_DIR
from premoe.demo.tasks import build_tokenizer, task_names
from premoe.errors import OutputExistsError, StoreMismatchError
from premoe.eval.demo import (
    DEFAULT_OUT,
    METHODS,
    SHIPPED_STORE,
    DemoOptions,
    build_shipped_store,
    choose_out,
    equal_memory_table,
    run_demo,
    shipped_store_matches,
    summary_table,
)
from premoe_cli.app import app
from tests.tiny import build_tiny, save_tiny

HAVE_MODEL = (MODEL_DIR / "config.json").is_file()
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="the bundled demo model is not trained yet")
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random qwen3_moe with the demo tokenizer (8 experts, top-2)."""
    folder = tmp_path_factory.mktemp("demo_tiny") / "model"
    tok = build_tokenizer(64)
    model = build_tiny(
        "qwen3_moe", 1, vocab_size=128, eos_token_id=tok.eos_token_id, pad_token_id=0
    )
    save_tiny(model, folder, "original")
    tok.save_pretrained(folder)
    return folder


def check_result(data: dict, out: Path, *, num_experts: int, keep: int) -> None:
    """Fields and sane values of a demo's JSON."""
    names = task_names()
    assert data["tasks"] == names and data["num_experts"] == num_experts and data["keep"] == keep
    assert data["out"] == str(out) and (out / "demo.json").is_file()
    assert json.loads((out / "demo.json").read_text())["summary"] == data["summary"]
    # the store was profiled into the output folder, with every metric
    assert data["store"]["reused"] is False and (out / "store" / "store.json").is_file()
    assert data["store"]["metrics"] == ["tcess", "frequency", "paper-logits", "reap"]
    assert all(n > 0 for n in data["store"]["samples"].values())
    # examples: one per task, similarity a cosine
    assert [x["task"] for x in data["examples"]] == names
    assert all(-1.0 <= x["similarity"] <= 1.0 + 1e-6 for x in data["examples"])
    # a real export, smaller than the source, that loads
    ex = data["export"]
    assert Path(ex["out"]).is_dir() and (Path(ex["out"]) / "config.json").is_file()
    assert ex["experts_kept"] == keep and 0.0 < ex["fraction"] < 1.0
    assert ex["bytes_written"] < ex["source_bytes"] and 0.0 <= ex["accuracy"] <= 1.0
    # the summary: full model, then every method at the headline K
    summary = data["summary"]
    assert [r["method"] for r in summary] == ["full", *METHODS]
    full = summary[0]
    assert full["keep"] == num_experts and full["saved"] == 0.0
    for row in summary[1:]:
        assert row["keep"] == keep and row["bytes"] < full["bytes"]
        assert 0.0 < row["saved"] < 1.0 and 0.0 <= row["accuracy"] <= 1.0
        assert set(row["per_task"]) == set(names)
    assert len({r["bytes"] for r in summary[1:]}) == 1  # same K, same memory
    check_equal_memory(data, num_experts=num_experts, keep=keep)
    routing = data["routing"]
    assert routing["n"] == len(names) * data["options"]["n_eval"]
    assert 0.0 <= routing["accuracy"] <= 1.0 and set(routing["per_task"]) == set(names)
    for name in ("accuracy_vs_experts", "heatmaps", "overlap", "coverage"):
        p = Path(data["plots"][name])
        assert p.is_file() and p.read_bytes()[:4] == b"\x89PNG" and p.parent == out / "plots"
    assert set(data["timings"]) >= {"suite", "profile", "route", "export", "evaluate", "plots"}
    assert data["seconds"] > 0 and data["premoe_version"]


def check_equal_memory(data: dict, *, num_experts: int, keep: int) -> None:
    """The quarter of the experts dense beside half and all of them int4, by expert memory."""
    rows = data["equal_memory"]
    half = max(data["top_k"], num_experts // 2)
    assert {(r["keep"], r["precision"]) for r in rows} == {
        (keep, "none"),
        (half, "int4"),
        (num_experts, "int4"),
    }
    assert [r["expert_bytes"] for r in rows] == sorted(r["expert_bytes"] for r in rows)
    dense = next(r for r in rows if r["precision"] == "none")
    tcess = next(r for r in data["summary"] if r["method"] == "tcess")
    assert dense["accuracy"] == tcess["accuracy"] and dense["bytes"] == tcess["bytes"]
    all_int4 = next(r for r in rows if r["keep"] == num_experts)
    assert all_int4["bytes"] < data["summary"][0]["bytes"]  # int4 beats the full model's size
    assert all_int4["group_size"] in (128, 64, 32, 16, 8)
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["expert_bytes"] > 0
        assert r["label"].startswith(f"{r['keep']}/{num_experts} ")


def test_quick_demo_on_a_tiny_model(tiny_demo_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    opts = DemoOptions.quick(keep=4, n_profile=16, n_eval=8)
    result = run_demo(out, model=tiny_demo_model, options=opts)
    data = json.loads(json.dumps(result.to_json()))
    check_result(data, out, num_experts=8, keep=4)
    headers, rows = summary_table(result)
    assert headers[0] == "method" and len(rows) == len(METHODS) + 2
    assert rows[-1][0].startswith("TAER routing")
    headers, rows = equal_memory_table(result)
    assert headers[0] == "experts kept" and len(rows) == 3 and rows[0][0].endswith("int4")
    assert not list(tmp_path.glob(".demo.premoe-tmp-*"))
    # an explicit existing folder is refused (and left alone), replaced with overwrite
    stamp = (out / "demo.json").read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        run_demo(out, model=tiny_demo_model, options=opts)
    assert (out / "demo.json").read_bytes() == stamp
    # the store of another model is refused
    with pytest.raises(StoreMismatchError):
        run_demo(tmp_path / "d2", model=tiny_demo_model, options=opts, store=_other_store(tmp_path))
    assert not (tmp_path / "d2").exists()


def _other_store(tmp_path: Path) -> Path:
    """A store of a different tiny model."""
    from premoe.demo.tasks import write_suite
    from premoe.profile import profile

    folder = tmp_path / "other-model"
    tok = build_tokenizer(64)
    save_tiny(build_tiny("qwen3_moe", 7, vocab_size=128), folder, "original")
    tok.save_pretrained(folder)
    files = write_suite(tmp_path / "other-suite", 8, 2, 0, ["add"])
    return profile(
        folder, {"add": files["add"]["profile"]}, out=tmp_path / "other-store", device="cpu"
    ).path


def test_default_output_folder_is_never_clobbered(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert choose_out(None, False)[0] == DEFAULT_OUT
    DEFAULT_OUT.mkdir()
    path, note = choose_out(None, False)
    assert path != DEFAULT_OUT and path.name.startswith("premoe-demo-") and "left as it is" in note
    assert choose_out(None, True)[0] == DEFAULT_OUT
    with pytest.raises(OutputExistsError):
        choose_out(DEFAULT_OUT, False)
    assert os.path.isdir(DEFAULT_OUT)


@needs_model
def test_quick_demo_on_the_bundled_model_cli(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--quick", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    config = json.loads((MODEL_DIR / "config.json").read_text())
    e = config.get("num_experts") or config["num_local_experts"]
    check_result(data, out, num_experts=e, keep=max(config["num_experts_per_tok"], e // 4))
    summary = {r["method"]: r for r in data["summary"]}
    assert summary["full"]["accuracy"] >= 0.9  # the bundled model solves its tasks
    assert data["export"]["fraction"] < 0.5
    # the central claim, at a quarter of the experts: the task's own experts keep the model
    # near its full accuracy; all tasks pooled and random experts fall far below
    assert summary["tcess"]["retained"] >= 0.85
    assert summary["tcess"]["accuracy"] >= summary["global"]["accuracy"] + 0.15
    assert summary["random"]["accuracy"] <= 0.2
    assert data["routing"]["accuracy"] >= 0.9
    # table output names every part
    res = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "d2")])
    assert res.exit_code == 0, res.output
    texts = ("pattern store", "routing", "exported", "TCESS", "random experts", "plots:")
    for text in (*texts, "at equal memory", "int4"):
        assert text in res.stdout


@needs_model
def test_shipped_store_is_the_bundled_models(tmp_path: Path) -> None:
    from premoe.fingerprint import fingerprint_source
    from premoe.patterns import PatternStore
    from premoe.source import resolve_model

    if not (SHIPPED_STORE / "store.json").is_file():
        pytest.skip("no shipped store in this checkout")
    st = PatternStore.load(SHIPPED_STORE)
    src = resolve_model(MODEL_DIR)
    try:
        st.check_model(fingerprint_source(src))
    finally:
        src.close()
    assert set(st.task_names) == set(task_names())
    assert set(st.metrics) == {"tcess", "frequency", "paper-logits", "reap"}
    # it is what the demo pipeline builds (rebuilt here: same options, same scores)
    fresh = build_shipped_store(tmp_path / "store")
    for t in st.task_names:
        assert st.tokens(t) == fresh.tokens(t)
        for m in st.metrics:
            assert torch.allclose(st.scores(t, m), fresh.scores(t, m), rtol=1e-4, atol=1e-6)
    assert shipped_store_matches()
