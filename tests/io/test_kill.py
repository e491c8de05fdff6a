"""Kill tests (issue #13, item 3): `premoe export` and `premoe profile` killed by SIGTERM or
SIGKILL at random points leave the target absent, old or new and valid, every time; SIGTERM
leaves no temporary folder; the next run that writes there leaves none either.

The commands run in children forked from a "zygote" process that has already imported torch,
transformers and premoe, so each run costs a fraction of a second instead of an interpreter
start. N kills per command and signal: 2 in the default run, more under ``-m slow``.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from premoe.io.reader import CheckpointReader
from premoe.patterns import PatternStore
from premoe.profile import profile
from tests.helpers import tree_digest

_ZYGOTE = r"""
import json, os, sys
for k in ("TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[k] = "false" if k.startswith("TOK") else "1"
import torch
torch.set_num_threads(1)
from premoe_cli.app import main

def run(argv):
    sys.argv = ["premoe", "-q", *argv]
    try:
        main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        return 99
    return 0

def fresh_tqdm_locks():
    # tqdm's multiprocessing lock, made during the warm-up, is shared with every forked child:
    # a child killed while holding it would block its siblings. Give each child its own.
    import tqdm.std as ts
    if "mp_lock" in vars(ts.TqdmDefaultWriteLock):
        del ts.TqdmDefaultWriteLock.mp_lock
    ts.TqdmDefaultWriteLock.th_lock = ts.TRLock()
    stack = [ts.tqdm]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if "_lock" in vars(cls):
            delattr(cls, "_lock")

LOGS = sys.argv[2]
null = os.open(os.devnull, os.O_WRONLY)
saved = os.dup(1), os.dup(2)
os.dup2(null, 1)
os.dup2(null, 2)
for argv in json.loads(sys.argv[1]):  # warm-up runs: lazy imports, first-call kernel set-up
    run(argv)
os.dup2(saved[0], 1)
os.dup2(saved[1], 2)
print("ready", flush=True)
for line in sys.stdin:
    argv = json.loads(line)
    pid = os.fork()
    if pid == 0:
        log = os.open(os.path.join(LOGS, f"{os.getpid()}.err"), os.O_WRONLY | os.O_CREAT, 0o644)
        os.dup2(null, 1)
        os.dup2(log, 2)
        fresh_tqdm_locks()
        os._exit(run(argv))
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": status}), flush=True)
"""


class Zygote:
    """Runs `premoe ARGS` in forked children of one warm interpreter."""

    def __init__(self, warm_up: list[list[str]], logs: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.pid = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE, json.dumps(warm_up), str(logs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self._line() == "ready"

    def _line(self, timeout: float = 300.0) -> str:
        """The zygote's next line; a hung child fails the test instead of hanging it."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            raise AssertionError(f"no answer from the zygote within {timeout:.0f} s")
        return self.proc.stdout.readline().strip()

    def start(self, args: list[str]) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(args) + "\n")
        self.proc.stdin.flush()
        self.pid = int(json.loads(self._line())["pid"])
        return self.pid

    def wait(self) -> int:
        """The child's exit code (negative: killed by that signal)."""
        status = int(json.loads(self._line())["status"])
        return os.waitstatus_to_exitcode(status)

    def stderr(self) -> str:
        """What the last child wrote to stderr (its traceback, if any)."""
        path = self.logs / f"{self.pid}.err"
        return path.read_text()[-3000:] if path.exists() else ""

    def run(self, args: list[str]) -> int:
        self.start(args)
        return self.wait()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(setup) -> Iterator[Zygote]:
    warm = setup["root"] / "warm-up"
    z = Zygote(
        [_export_args(setup, warm / "e", 4), _profile_args(setup, warm / "s")],
        setup["root"] / "logs",
    )
    yield z
    z.close()


def _temps(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".premoe-" in p.name)


def _kill_at_random(z: Zygote, args: list[str], sig: int, parent: Path, span: float) -> int:
    """Start `args`, kill it with `sig` at a random point: either a random time into a typical
    run (`span` seconds), or a random moment once its temporary output folder exists."""
    pid = z.start(args)
    t0 = time.monotonic()
    if random.random() < 0.5:
        time.sleep(random.uniform(0, span))
    else:
        while not any(TMP in n for n in os.listdir(parent)) and time.monotonic() - t0 < span * 3:
            time.sleep(0.001)
        time.sleep(random.uniform(0, 0.02))
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # it finished first
        pass
    return z.wait()


TMP = ".premoe-tmp-"


def _case(z: Zygote, sig: int, n: int, args_new: list[str], out: Path, valid, span: float) -> None:
    """Kill `args_new` (which replaces or extends `out`) n times, checking `out` each time."""
    for _ in range(n):
        code = _kill_at_random(z, args_new, sig, out.parent, span)
        assert code in (0, -sig, 128 + sig), (code, z.stderr())
        valid(out)  # absent, old or new, and valid
        if sig == signal.SIGTERM:
            assert not [t for t in _temps(out.parent) if TMP in t], _temps(out.parent)
        assert z.run(args_new) == 0, z.stderr()  # the next run writes there...
        assert _temps(out.parent) == []  # ...and nothing temporary survives it
        valid(out)


def _span(z: Zygote, args: list[str]) -> float:
    t0 = time.monotonic()
    assert z.run(args) == 0
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def setup(tiny_dir, demo_suite, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("kill")
    model = tiny_dir("qwen3_moe")
    store = root / "store"
    corp = {t: demo_suite[t]["profile"] for t in ("add", "reverse")}
    profile(model, {"add": corp["add"]}, out=store, device="cpu", max_length=32)
    return {"root": root, "model": model, "store": store, "corpora": corp}


def _export_args(s: dict, out: Path, keep: int) -> list[str]:
    return ["export", str(s["model"]), "-s", str(s["store"]), "-t", "add", "-k", str(keep)] + [
        "--max-shard-size",
        "20KB",
        "-o",
        str(out),
        "--overwrite",
    ]


def _run_export(z: Zygote, s: dict, sig: int, n: int) -> None:
    out = s["root"] / f"export-{sig}-{n}" / "out"
    out.parent.mkdir()
    ref_old, ref_new = s["root"] / f"old-{sig}-{n}", s["root"] / f"new-{sig}-{n}"
    assert z.run(_export_args(s, ref_old, 4)[:-1]) == 0
    assert z.run(_export_args(s, ref_new, 6)[:-1]) == 0
    old, new = tree_digest(ref_old), tree_digest(ref_new)
    assert z.run(_export_args(s, out, 4)) == 0  # the old output that the kills try to replace
    span = _span(z, _export_args(s, ref_new, 6))

    def valid(path: Path) -> None:
        if path.exists():
            assert tree_digest(path) in (old, new)
            with CheckpointReader(path) as r:
                assert r.keys()

    _case(z, sig, n, _export_args(s, out, 6), out, valid, span)


def _profile_args(s: dict, out: Path) -> list[str]:
    corp = s["corpora"]
    return ["profile", str(s["model"]), "-t", f"reverse={corp['reverse']}", "-o", str(out)] + [
        "--max-length",
        "32",
        "--device",
        "cpu",
    ]


def _run_profile(z: Zygote, s: dict, sig: int, n: int) -> None:
    out = s["root"] / f"profile-{sig}-{n}" / "store"
    out.parent.mkdir()
    args = _profile_args(s, out)
    span = _span(z, _profile_args(s, s["root"] / f"ref-{sig}-{n}"))

    def valid(path: Path) -> None:
        if path.exists():  # absent, the old store (add) or the new one (add + reverse)
            assert PatternStore.load(path).task_names in (["add"], ["add", "reverse"])

    for _ in range(n):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(s["store"], out)  # the old store, that the kills try to extend
        _case(z, sig, 1, args, out, valid, span)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("command", ["export", "profile"])
def test_killed_at_random_points(zygote, setup, command: str, sig: int) -> None:
    random.seed(f"{command}-{sig}")
    (_run_export if command == "export" else _run_profile)(zygote, setup, sig, 2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGHUP], ids=["SIGTERM", "SIGKILL", "SIGHUP"]
)
@pytest.mark.parametrize("command", ["export", "profile"])
def test_killed_at_random_points_many_times(zygote, setup, command: str, sig: int) -> None:
    random.seed(f"many-{command}-{sig}")
    (_run_export if command == "export" else _run_profile)(zygote, setup, sig, 20)
