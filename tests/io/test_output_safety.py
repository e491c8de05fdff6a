"""Issue #13, items 1-3: outputs never destroy inputs, concurrent writers lose nothing, and
interrupted writers leave nothing behind."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from premoe.errors import OutputError, StoreError, UnsafeOutputError
from premoe.io.atomic import (
    atomic_output_dir,
    check_not_input,
    lock_path,
    output_lock,
    sweep_leftovers,
)
from premoe.patterns import PatternStore
from premoe.profile import profile
from tests.helpers import assert_one_line_error, run_cli, tree_digest


@pytest.fixture(scope="module")
def model(tiny_dir, tmp_path_factory) -> Path:
    """A private copy of a tiny model (tests check that it survives)."""
    return Path(shutil.copytree(tiny_dir("qwen3_moe"), tmp_path_factory.mktemp("m") / "model"))


@pytest.fixture(scope="module")
def corpora(demo_suite) -> dict[str, Path]:
    return {t: demo_suite[t]["profile"] for t in ("add", "reverse", "sort")}


def _profile(model: Path, tasks: dict[str, Path], out: Path, **kw) -> PatternStore:
    return profile(model, tasks, out=out, device="cpu", max_length=32, batch_size=16, **kw)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".premoe-" in p.name)


# ---- item 1: data loss -------------------------------------------------------------------------


def test_profile_out_model_overwrite_keeps_the_model(model, corpora, capsys) -> None:
    before = tree_digest(model)
    args = ["profile", str(model), "--task", f"add={corpora['add']}", "--out", str(model)]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "not a pattern store")
    assert "--overwrite" not in err  # the advice that deleted the checkpoint is gone
    code, _, err = run_cli([*args, "--overwrite"], capsys)
    assert_one_line_error(code, err, "is the model folder")
    assert tree_digest(model) == before


def test_export_onto_its_own_store_is_refused(model, corpora, tmp_path, capsys) -> None:
    store = tmp_path / "store"
    _profile(model, {"add": corpora["add"]}, store)
    before = tree_digest(store)
    args = ["export", str(model), "-s", str(store), "-t", "add", "-k", "4", "-o", str(store)]
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli([*args, *extra], capsys)
        assert code != 0 and "Traceback" not in err
    assert_one_line_error(code, err, "is the pattern store")
    assert tree_digest(store) == before
    # an output inside an input, or holding one, is refused too
    with pytest.raises(UnsafeOutputError, match="inside the corpus folder"):
        check_not_input(corpora["add"].parent / "x", [("corpus folder", corpora["add"].parent)])
    with pytest.raises(UnsafeOutputError, match="contains the eval set"):
        check_not_input(tmp_path, [("eval set", store / "store.json")])


def test_overwrite_replaces_only_what_premoe_wrote(tmp_path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(UnsafeOutputError, match="premoe did not write"):
        atomic_output_dir(mine, overwrite=True).__enter__()
    assert (mine / "thesis.tex").read_text() == "years of work"
    ours = tmp_path / "ours"
    for n in range(2):
        with atomic_output_dir(ours, overwrite=True) as tmp:
            (tmp / "premoe.json").write_text(f"{n}")
    assert (ours / "premoe.json").read_text() == "1" and _leftovers(tmp_path) == []


# ---- item 2: lost updates ----------------------------------------------------------------------


def test_two_profiles_adding_tasks_to_one_store_lose_nothing(model, corpora, tmp_path) -> None:
    """Both runs read the store before either writes (a barrier in their progress callbacks);
    both tasks end up in it."""
    store = tmp_path / "store"
    _profile(model, {"add": corpora["add"]}, store)
    barrier = threading.Barrier(2, timeout=60)
    errors: list[BaseException] = []

    def run(task: str) -> None:
        waited = [False]

        def progress(_info) -> None:
            if not waited[0]:
                waited[0] = True
                barrier.wait()

        try:
            _profile(model, {task: corpora[task]}, store, progress=progress)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in ("reverse", "sort")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(PatternStore.load(store).task_names) == ["add", "reverse", "sort"]
    assert _leftovers(tmp_path) == []


def test_save_is_compare_and_swap(model, corpora, tmp_path) -> None:
    store = tmp_path / "store"
    _profile(model, {"add": corpora["add"]}, store)
    a, b = PatternStore.load(store), PatternStore.load(store)
    fresh = _profile(model, {"sort": corpora["sort"]}, None)
    a.add_task("sort", fresh.tasks["sort"], fresh.sums("sort"), fresh._keys["sort"])
    a.save(store, overwrite=True)
    b.remove_task("add")
    b.save(store, overwrite=True)  # b read the store before a wrote: a's task must survive
    assert PatternStore.load(store).task_names == ["sort"]
    other = PatternStore.load(store)
    other.metrics = ["frequency"]  # a store that cannot take the other's tasks
    a.add_task("sort", fresh.tasks["sort"], fresh.sums("sort"), fresh._keys["sort"])
    other.save(store, overwrite=True)
    with pytest.raises(StoreError, match="another premoe process"):
        a.save(store, overwrite=True)


def test_output_lock_is_exclusive_and_reentrant(tmp_path) -> None:
    out = tmp_path / "out"
    got: list[str] = []
    with output_lock(out), output_lock(out):  # re-entrant in one thread
        assert lock_path(out).exists()

        def other() -> None:
            try:
                with output_lock(out, timeout=0.2):
                    got.append("locked")
            except OutputError as exc:
                got.append(str(exc))

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert "being written by another premoe process" in got[0]
    assert not lock_path(out).exists()  # released and deleted


# ---- item 3: leaked partial output -------------------------------------------------------------


def test_sigterm_unwinds_and_removes_the_partial_output(tmp_path) -> None:
    from premoe_cli._common import signals_unwind

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc, signals_unwind(), atomic_output_dir(out) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 100)
        os.kill(os.getpid(), signal.SIGTERM)
    assert exc.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path) -> None:
    out = tmp_path / "out"
    (tmp_path / ".out.premoe-tmp-dead1").mkdir()
    (tmp_path / ".out.premoe-tmp-dead1" / "shard").write_text("partial")
    (tmp_path / ".out.premoe-tmp-dead2").write_text("partial file")
    (tmp_path / ".other.premoe-tmp-x").mkdir()  # another output's: not ours to judge
    with atomic_output_dir(out) as tmp:
        (tmp / "premoe.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.premoe-tmp-x", "out"]


def test_an_output_moved_aside_but_not_replaced_is_restored(tmp_path) -> None:
    """SIGKILL between the two renames of a replace: the old output is the backup."""
    out = tmp_path / "out"
    old = tmp_path / ".out.premoe-old-1234"
    old.mkdir()
    (old / "premoe.json").write_text("old")
    with output_lock(out):
        assert sweep_leftovers(out) == [old]
    assert (out / "premoe.json").read_text() == "old" and _leftovers(tmp_path) == []


def test_files_and_folders_are_fsynced_before_the_rename(tmp_path, monkeypatch) -> None:
    synced: list[str] = []
    renamed: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def rename(a, b) -> None:
        renamed.append(str(b))
        real_rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a")
        (tmp / "b.json").write_text("{}")
        n = len(synced)
    assert renamed == [str(out)]
    before = [s.replace(str(tmp), str(out)) for s in synced[n:]]
    for path in (out / "sub" / "a.bin", out / "b.json", out / "sub", out):
        assert str(path) in before, (path, before)
    assert str(tmp_path) in synced  # the parent, after the rename


def test_unwritable_output_fails_before_any_work(model, corpora, tmp_path, monkeypatch) -> None:
    """`eval --plot` / `profile --out` to a location that cannot be written: refused before the
    model runs (it used to crash after all the compute)."""
    import premoe.profile.api as profile_api
    import premoe_cli.eval_cmd as eval_cmd

    def never(*a, **k):
        raise AssertionError("the work started")

    monkeypatch.setattr(eval_cmd, "evaluate", never)
    monkeypatch.setattr(profile_api, "profile_corpora", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        _profile(model, {"add": corpora["add"]}, blocker / "store")
    from typer.testing import CliRunner

    from premoe_cli.app import app

    res = CliRunner().invoke(app, ["eval", str(model), "-t", "add", "--plot", f"{blocker}/e.png"])
    assert res.exit_code != 0 and isinstance(res.exception, OutputError)
