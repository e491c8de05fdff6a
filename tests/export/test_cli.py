"""`premoe plan` and `premoe export` on the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from premoe.errors import OutputExistsError, UsageError
from premoe.plan import SizeModel
from premoe.source import resolve_model
from premoe_cli.app import app, main

runner = CliRunner()


def run(*args: str) -> object:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)


def premoe_main(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """`main()` in process (as the console script calls it): exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["premoe", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    return int(info.value.code or 0), capsys.readouterr().err


def premoe(*args: str) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("premoe")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def test_plan_json_and_table(tiny_checkpoint, make_store) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    store = make_store(folder)
    budget = str(SizeModel.from_source(resolve_model(folder)).resident(3))
    res = run("plan", folder, "--store", store, "--task", "math", "--budget", budget, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert [r["keep"] for r in data["rows"]] == [2, 3, 4, 8] and data["fits"] == 3
    assert data["rows"][0]["coverage_min"] is not None
    table = run("plan", folder, "--store", store, "--task", "math", "--budget", budget)
    assert table.exit_code == 0
    assert "coverage min" in table.output and "largest keep count within" in table.output


def test_export_cli_writes_and_summarises(tiny_checkpoint, make_store, tmp_path) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    store = make_store(folder)
    out = tmp_path / "out"
    res = run(
        "export", folder, "--store", store, "--task", "math", "--task", "code", "--merge",
        "union", "--keep", "4", "--top-k", "1", "--out", out, "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["experts_kept"] == 4 and summary["top_k"] == 1
    assert summary["policy"]["merge"] == "union"
    prov = json.loads((out / "premoe.json").read_text())
    assert prov["tasks"] == ["math", "code"] and prov["top_k"]["pruned"] == 1
    table = run(
        "export", folder, "--store", store, "-t", "math", "--coverage", "0.7",
        "--out", tmp_path / "o2", "--format", "expert-list",
    )  # fmt: skip
    assert table.exit_code == 0, table.output
    assert "experts kept" in table.output and str(tmp_path / "o2") in table.output


def test_export_cli_errors_raise_premoe_errors(tiny_checkpoint, tmp_path) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    res = run("export", folder, "--policy", "random", "--keep", "1", "--out", tmp_path / "o")
    assert isinstance(res.exception, UsageError)
    (tmp_path / "o").mkdir()
    res = run("export", folder, "--policy", "random", "--keep", "2", "--out", tmp_path / "o")
    assert isinstance(res.exception, OutputExistsError)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep", "1"], "fewer than the 2 experts routed per token"),
        (["--keep", "9"], "more than the model's 8 experts"),
        (["--budget", "1KB"], "smaller than the model without any routed expert"),
        (["--store", "{store}", "--task", "poetry", "--keep", "2"], "task 'poetry' is not in"),
    ],
)
def test_one_line_errors(
    tiny_checkpoint, make_store, tmp_path, capsys, monkeypatch, args, message
) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    args = [a.format(store=make_store(folder)) if "{" in a else a for a in args]
    if "--store" not in args:
        args = ["--policy", "random", *args]
    parent = tmp_path / "exports"
    parent.mkdir()
    code, err = premoe_main(capsys, monkeypatch, "export", folder, *args, "--out", parent / "out")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("premoe: error: ") and message in lines[0]
    assert list(parent.iterdir()) == []


def test_console_script_mismatch_and_exists(
    tiny_checkpoint, make_store, tmp_path, capsys, monkeypatch
) -> None:
    store = make_store(tiny_checkpoint("qwen3_moe", seed=0))
    other = tiny_checkpoint("qwen3_moe", seed=1)
    proc = premoe("export", other, "-s", store, "-t", "math", "-k", "2", "-o", tmp_path / "x")
    assert proc.returncode == 1 and "made for another model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    (tmp_path / "x").mkdir()
    code, err = premoe_main(
        capsys, monkeypatch, "export", other, "--policy", "random", "-k", "2", "-o", tmp_path / "x"
    )
    assert code == 2 and "--overwrite" in err
    code, err = premoe_main(capsys, monkeypatch, "plan", other, "--budget", "lots")
    assert code == 2 and "cannot read size 'lots'" in err
