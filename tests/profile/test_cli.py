"""`premoe profile` and `premoe patterns`: end to end through the real entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from premoe.patterns import PatternStore
from tests.helpers import assert_one_line_error, run_cli, tree_digest


@pytest.fixture(scope="module")
def made_store(tiny_dir, demo_suite, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "store"
    args = ["profile", str(tiny_dir("qwen3_moe")), "--out", str(out), "-m", "tcess"]
    args += ["-m", "frequency", "--batch-size", "16"]
    for t in ("add", "reverse"):
        args += ["--task", f"{t}={demo_suite[t]['profile']}"]
    proc = subprocess.run(
        [sys.executable, "-m", "premoe_cli.app", *args], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "add" in proc.stdout and "Traceback" not in proc.stderr
    return out


def test_show_json_contract(made_store: Path, capsys) -> None:
    code, out, err = run_cli(["patterns", "show", str(made_store), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"premoe_version", "model", "metrics", "tasks"}
    assert data["metrics"] == ["tcess", "frequency"]
    assert data["model"]["family"] == "qwen3_moe"
    layers, experts = len(data["model"]["moe_layers"]), data["model"]["num_experts"]
    store = PatternStore.load(made_store)
    for name, task in data["tasks"].items():
        assert set(task) == {"samples", "tokens", "scores"}
        assert isinstance(task["samples"], int) and isinstance(task["tokens"], int)
        for m in data["metrics"]:
            grid = task["scores"][m]
            assert len(grid) == layers and all(len(r) == experts for r in grid)
            assert torch.allclose(torch.tensor(grid), store.scores(name, m))
    code, out, _ = run_cli(["patterns", "show", str(made_store), "--task", "add", "--json"], capsys)
    assert list(json.loads(out)["tasks"]) == ["add"]


def test_list_and_show_tables(made_store: Path, capsys) -> None:
    code, out, _ = run_cli(["patterns", "list", str(made_store)], capsys)
    assert code == 0 and "add" in out and "reverse" in out and "qwen3_moe" in out
    code, out, _ = run_cli(["patterns", "show", str(made_store), "-t", "add", "--top", "3"], capsys)
    assert code == 0 and "top-3 share" in out and "task add" in out
    code, out, _ = run_cli(["patterns", "list", str(made_store), "--json"], capsys)
    assert json.loads(out)["key"]["kind"] == "router_input"


def test_profile_adds_and_replaces_tasks(made_store, tiny_dir, demo_suite, tmp_path, capsys):
    store = tmp_path / "s"
    shutil.copytree(made_store, store)
    before = PatternStore.load(store)
    args = ["profile", str(tiny_dir("qwen3_moe")), "--out", str(store)]
    code, _, err = run_cli([*args, "--task", f"sort={demo_suite['sort']['profile']}"], capsys)
    assert code == 0, err
    after = PatternStore.load(store)
    assert after.task_names == ["add", "reverse", "sort"]
    assert after.metrics == ["tcess", "frequency"]  # the store's metrics are kept
    for t in ("add", "reverse"):
        assert torch.equal(after.scores(t), before.scores(t))
    # replace "add" with another corpus
    code, _, err = run_cli([*args, "--task", f"add={demo_suite['sort']['profile']}"], capsys)
    assert code == 0, err
    replaced = PatternStore.load(store)
    assert torch.equal(replaced.scores("add"), replaced.scores("sort"))
    assert replaced.search(replaced.keys("reverse")[0])[0][0] == "reverse"


def _bad_cases(tmp: Path, tiny_dir, suite) -> dict[str, tuple[list[str], str]]:
    empty = tmp / "empty.jsonl"
    empty.write_text("\n")
    other = tiny_dir("qwen3_moe", seed=1)
    good = f"x={suite['add']['profile']}"
    return {
        "missing-file": (["--task", f"x={tmp / 'missing.jsonl'}"], "does not exist"),
        "empty-corpus": (["--task", f"x={empty}"], "no non-empty sample"),
        "unknown-field": (["--task", good, "--text-field", "body"], "fields: task, prompt"),
        "unknown-metric": (["--task", good, "-m", "bogus"], "unknown metric 'bogus'"),
        "metric-change": (["--task", good, "-m", "reap"], "holds metrics"),
        "threshold-change": (["--task", good, "--threshold", "0.5"], "--threshold"),
        "other-model": (["--task", good, "--model-override", str(other)], "another model"),
        "bad-task-spec": (["--task", "nonsense"], "NAME=SOURCE"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing-file",
        "empty-corpus",
        "unknown-field",
        "unknown-metric",
        "metric-change",
        "threshold-change",
        "other-model",
        "bad-task-spec",
    ],
)
def test_bad_input_leaves_the_store_unchanged(
    case, made_store, tiny_dir, demo_suite, tmp_path, capsys
) -> None:
    store = tmp_path / "s"
    shutil.copytree(made_store, store)
    extra, needle = _bad_cases(tmp_path, tiny_dir, demo_suite)[case]
    model = str(tiny_dir("qwen3_moe"))
    if "--model-override" in extra:
        i = extra.index("--model-override")
        model = extra[i + 1]
        extra = extra[:i] + extra[i + 2 :]
    digest = tree_digest(store)
    code, _, err = run_cli(["profile", model, "--out", str(store), *extra], capsys)
    assert_one_line_error(code, err, needle)
    assert tree_digest(store) == digest
    assert sorted(p.name for p in tmp_path.iterdir() if ".premoe-" in p.name) == []


@pytest.mark.parametrize("damage", ["index", "meta"])
def test_damaged_store_is_reported_and_kept(
    damage, made_store, tiny_dir, demo_suite, tmp_path, capsys
) -> None:
    store = tmp_path / "s"
    shutil.copytree(made_store, store)
    file = store / ("index.faiss" if damage == "index" else "store.json")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 3])
    digest = tree_digest(store)
    task = f"x={demo_suite['add']['profile']}"
    args = ["profile", str(tiny_dir("qwen3_moe")), "--out", str(store), "--task", task]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "damaged")
    code, _, err = run_cli(["patterns", "show", str(store)], capsys)
    assert_one_line_error(code, err, "damaged")
    assert tree_digest(store) == digest


def test_overwrite_and_not_a_store(made_store, tiny_dir, demo_suite, tmp_path, capsys) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    task = f"x={demo_suite['add']['profile']}"
    args = ["profile", str(tiny_dir("qwen3_moe")), "--out", str(folder), "--task", task]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "not a pattern store")
    assert (folder / "keep.txt").read_text() == "mine"
    # --overwrite replaces only folders premoe wrote (issue #13): this one is refused too
    code, _, err = run_cli([*args, "--overwrite", "--json"], capsys)
    assert_one_line_error(code, err, "premoe did not write")
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]


def test_device_map_dtype_and_key_options(tiny_dir, demo_suite, tmp_path: Path) -> None:
    """--device-map auto (accelerate) gives the same patterns; bf16 is close; key options stick
    when tasks are added to a store."""
    from premoe.profile import profile

    model, task = tiny_dir("qwen3_moe"), {"add": demo_suite["add"]["profile"]}
    cpu = profile(model, task, device="cpu", dtype="fp32")
    auto = profile(model, task, device_map="auto", dtype="fp32")
    half = profile(model, task, device="cpu", dtype="bf16", metrics=["tcess", "reap"])
    assert torch.equal(cpu.scores("add"), auto.scores("add"))
    assert (cpu.scores("add") - half.scores("add")).abs().max().item() < 0.02
    assert half.tasks["add"].options["dtype"] == "bfloat16"
    out = tmp_path / "s"
    profile(model, task, out=out, key="tcess", search="centroid", knn=5)
    profile(model, {"rev": demo_suite["reverse"]["profile"]}, out=out)
    key = PatternStore.load(out).key
    assert (key["kind"], key["search"], key["k"]) == ("tcess", "centroid", 5)
