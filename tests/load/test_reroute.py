"""The ``reroute`` miss policy on the bundled demo model: topic changes and unprofiled tasks."""

from __future__ import annotations

from pathlib import Path

import pytest

from premoe.demo.tasks import generate as task_rows
from premoe.demo.tasks import write_suite
from premoe.generate import generate
from premoe.patterns.store import GLOBAL
from premoe.profile import profile
from tests.helpers import load_json, run_cli

DEMO = Path(__file__).resolve().parents[2] / "premoe" / "demo" / "model"
DEMO_STORE = Path(__file__).resolve().parents[2] / "patterns" / "demo"
OPTIONS = dict(keep=32, miss_window=4, miss_threshold=0.1, reroute_context=8, device="cpu")


def conversation(first: str, then: str) -> str:
    """Two solved examples of task `first`, then a question of task `then`."""
    done = " ".join(r["text"] for r in task_rows(first, 2, seed=5))
    return f"{done} {task_rows(then, 1, seed=7)[0]['prompt']}"


@pytest.mark.parametrize("first", ["reverse", "close"])
def test_reroute_follows_a_topic_change_to_the_right_pattern(first) -> None:
    prompt = conversation(first, "add")
    res = generate(DEMO, DEMO_STORE, prompt, max_new_tokens=6, miss_policy="reroute", **OPTIONS)
    assert res.task == first  # the whole prompt routes to the old topic
    miss = res.to_json()["miss"]
    assert miss["final_task"] == "add"
    switch = miss["switches"][0]
    assert (switch["from"], switch["to"], switch["reason"]) == (first, "add", "retrieval")
    assert switch["token"] == 0  # decided on the prompt's last tokens, before generating
    assert switch["dropped"] > OPTIONS["miss_threshold"]
    # mask keeps the first pattern; it only reports the dropped mass
    masked = generate(DEMO, DEMO_STORE, prompt, max_new_tokens=6, **OPTIONS)
    m = masked.to_json()["miss"]
    assert m["switches"] == [] and m["final_task"] == first
    assert m["dropped_mass"]["prompt"] == miss["dropped_mass"]["prompt"]


@pytest.fixture(scope="module")
def partial_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of the demo model profiled on add, reverse and sort only."""
    root = tmp_path_factory.mktemp("partial")
    tasks = ["add", "reverse", "sort"]
    suite = write_suite(root / "suite", n_profile=48, n_eval=4, seed=0, tasks=tasks)
    profile(DEMO, {t: suite[t]["profile"] for t in tasks}, out=root / "store", device="cpu")
    return root / "store"


def test_unprofiled_task_gets_the_pooled_pattern_not_silent_degradation(partial_store) -> None:
    prompt = task_rows("count", 1, seed=2)[0]["prompt"]  # a task the store never saw
    res = generate(DEMO, partial_store, prompt, max_new_tokens=6, miss_policy="reroute", **OPTIONS)
    miss = res.to_json()["miss"]
    assert miss["final_task"] == GLOBAL
    assert res.task != GLOBAL  # retrieval alone picks a stored task: the wrong one
    assert [(s["to"], s["reason"]) for s in miss["switches"]] == [(GLOBAL, "fallback")]
    in_task = generate(DEMO, partial_store, task_rows("add", 1, seed=2)[0]["prompt"], **OPTIONS)
    assert (
        in_task.to_json()["miss"]["dropped_mass"]["prompt"]["mean"]
        < OPTIONS["miss_threshold"]
        < miss["switches"][0]["dropped"]
    )


def test_cli_generate_json_reports_policy_mass_and_switches(capsys) -> None:
    prompt = conversation("reverse", "add")
    args = ["generate", str(DEMO), prompt, "--store", str(DEMO_STORE), "--keep", "32"]
    args += ["--miss-policy", "reroute", "--miss-window", "4", "--miss-threshold", "0.1"]
    args += ["--reroute-context", "8", "--max-new-tokens", "4", "--device", "cpu", "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    miss = load_json(out)["miss"]
    assert miss["policy"] == "reroute" and miss["switches"][0]["to"] == "add"
    for part in ("prompt", "generated"):
        assert set(miss["dropped_mass"][part]) >= {"mean", "max", "tokens", "per_layer"}
    code, out, err = run_cli([*args[:5], "--miss-policy", "sometimes"], capsys)
    assert code != 0 and "sometimes" in err
