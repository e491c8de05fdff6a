"""Data-parallel profiling: two gloo processes on the CPU, launched by torchrun through the real
`premoe` CLI, give the single-process store on the same samples."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from premoe.errors import UsageError
from premoe.patterns.store import PatternStore
from premoe.profile import profile
from premoe.profile.distributed import detect, shard_indices
from tests.helpers import assert_same_store, random_texts, write_texts

METRICS = ["tcess", "frequency", "paper-logits", "reap"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "premoe_cli.app",
        "-q",
        *args,
    ]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)


def _tasks(tmp_path: Path) -> dict[str, Path]:
    return {
        "alpha": write_texts(tmp_path / "a.jsonl", random_texts(13, 1, alphabet="abcdef +")),
        "digits": write_texts(tmp_path / "d.jsonl", random_texts(8, 2, alphabet="0123456789*")),
        "one": write_texts(tmp_path / "o.jsonl", random_texts(1, 3)),  # rank 1: empty shard
    }


@pytest.mark.parametrize(
    "extra", [[], pytest.param(["--sequential"], marks=pytest.mark.slow)], ids=["plain", "seq"]
)
def test_two_process_gloo_equals_single_process(extra, tiny_dir, tmp_path: Path) -> None:
    folder = tiny_dir("deepseek_v3")
    tasks = _tasks(tmp_path)
    single = profile(folder, tasks, metrics=METRICS, batch_size=3, device="cpu", max_length=40)
    out = tmp_path / "dp"
    args = ["profile", str(folder), "--device", "cpu", "--batch-size", "3"]
    args += ["--max-length", "40", "--out", str(out), *extra]
    args += [f"--task={n}={p}" for n, p in tasks.items()]
    args += [f"--metric={m}" for m in METRICS]
    done = _torchrun(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_store(single, PatternStore.load(out), rel=1e-5)
    # rank 0 alone wrote (one store, no leftovers) and printed the summary once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "d.jsonl", "dp", "o.jsonl"]
    assert done.stdout.count("store ") == 1


def test_shards_cover_every_sample_once() -> None:
    for n in (0, 1, 7, 8):
        for world in (1, 2, 3):
            got = sorted(i for r in range(world) for i in shard_indices(n, r, world))
            assert got == list(range(n))


def test_detect_reads_the_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert detect() is None
    with pytest.raises(UsageError, match="torchrun"):
        detect(True)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = detect()
    assert ctx is not None and (ctx.rank, ctx.world, ctx.local_rank) == (3, 4, 1)
    assert not ctx.is_writer
    assert detect(False) is None
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UsageError, match="RANK"):
        detect()


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_two_gpu_nccl_equals_one_gpu(tiny_dir, tmp_path: Path) -> None:
    """torchrun on 2 GPUs (NCCL, cuda:LOCAL_RANK each) gives the one-GPU store."""
    folder = tiny_dir("qwen3_moe")
    tasks = _tasks(tmp_path)
    single = profile(folder, tasks, metrics=METRICS, batch_size=3, device="cuda", max_length=40)
    out = tmp_path / "dp"
    args = ["profile", str(folder), "--device", "cuda", "--batch-size", "3"]
    args += ["--max-length", "40", "--out", str(out)]
    args += [f"--task={n}={p}" for n, p in tasks.items()]
    args += [f"--metric={m}" for m in METRICS]
    done = _torchrun(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_store(single, PatternStore.load(out), rel=1e-5)
