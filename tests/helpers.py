"""Helpers shared by the tests: tiny models with a tokenizer, synthetic corpora, an in-process
runner of the real `premoe` entry point, store comparison, the GPU marks."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from premoe.demo.tasks import build_tokenizer, write_jsonl, write_suite
from premoe.patterns.store import KEY_KINDS, PatternStore
from tests.tiny import build_tiny, save_tiny

VOCAB = 128  # the demo char tokenizer has 100 ids

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU = [pytest.mark.gpu, needs_cuda]
"""`pytestmark = GPU`: CUDA tests (not in the default run; skipped without CUDA)."""


def run_triton_script(script: Path, timeout: int, interpret: bool = True) -> str:
    """Stdout of a Triton check `script`, run in a subprocess (under Triton's CPU interpreter
    with `interpret`); skips without triton, fails on a non-zero exit."""
    from premoe.quant import kernels

    if not kernels.triton_importable():
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def captured_step_kernels(compile: bool = False, sink: Any = None) -> tuple[dict[str, int], Any]:
    """(launches by kernel name of 3 captured decode steps, the decoder) of the tiny bf16
    Qwen3-MoE (experts through premoe's GEMV) on CUDA, decoding one 12-token stream into `sink`
    (after 4 warm steps; the stream is then run to its end)."""
    from torch.profiler import ProfilerActivity, profile

    from premoe.quant.gemv_experts import register
    from premoe.serve.continuous import ContinuousDecoder
    from premoe.serve.decode import NullSink, SamplingParams

    model = tiny_model("qwen3_moe").to("cuda", torch.bfloat16).eval()
    model.config._experts_implementation = register()
    dec = ContinuousDecoder(model, tokenizer(), slots=2, max_len=64, graphs=True, compile=compile)
    dec.add(sink or NullSink(), [5, 6, 7, 8], SamplingParams(max_tokens=12, ignore_eos=True))
    for _ in range(4):
        dec.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            dec.step()
        torch.cuda.synchronize()
    while dec.active():
        dec.step()
    return {e.key: e.count for e in prof.key_averages()}, dec


def tokenizer() -> Any:
    return build_tokenizer(128)


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    return build_tiny(family, seed, vocab_size=VOCAB, **overrides)


def save_with_tokenizer(model: Any, folder: Path) -> Path:
    save_tiny(model, folder, "original")
    tokenizer().save_pretrained(folder)
    return folder


def random_texts(n: int, seed: int, lo: int = 3, hi: int = 40, alphabet: str = "") -> list[str]:
    rng = random.Random(seed)
    chars = alphabet or "abcdefghijklmnopqrstuvwxyz0123456789+-*/=()[]{} .,;:!?"
    return ["".join(rng.choice(chars) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def write_texts(path: Path, texts: list[str]) -> Path:
    return write_jsonl([{"text": t} for t in texts], path)


def suite(folder: Path, tasks: tuple[str, ...] = ("add", "reverse", "sort"), n: int = 48) -> dict:
    return write_suite(folder, n_profile=n, n_eval=30, seed=0, tasks=list(tasks))


def greedy_text(model: Any, tokenizer: Any, ids: list[int], n: int) -> str:
    """`model.generate`'s greedy continuation of `ids` (n new tokens), decoded."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(out[0, x.shape[1] :], skip_special_tokens=True))


def tree_digest(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file under `folder` (to prove a store was left untouched)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `premoe ARGS` through the console entry point, in process: (exit code, out, err)."""
    from premoe_cli.app import main

    capsys.readouterr()  # drop whatever earlier setup printed
    old = sys.argv
    sys.argv = ["premoe", *args]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("premoe: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def load_json(text: str) -> Any:
    return json.loads(text)


def assert_same_store(a: PatternStore, b: PatternStore, rel: float = 1e-4) -> None:
    """Same tasks, samples and tokens; scores within `rel` of the largest; same sum rows; keys
    (same shape, corpus order) within `rel` (plus 1e-6 absolute)."""
    assert a.task_names == b.task_names
    for task in a.task_names:
        assert a.tasks[task].samples == b.tasks[task].samples
        assert a.tokens(task) == b.tokens(task)
        for metric in a.metrics:
            x, y = a.scores(task, metric), b.scores(task, metric)
            scale = max(x.abs().max().item(), 1e-12)
            assert (x - y).abs().max().item() <= rel * scale, (task, metric)
        assert a.sums(task).keys() == b.sums(task).keys()
        for kind in KEY_KINDS:
            ka, kb = a.keys(task, kind), b.keys(task, kind)
            assert ka.shape == kb.shape
            np.testing.assert_allclose(ka, kb, rtol=rel, atol=1e-6)


def hf_qwen3_moe() -> Any:
    """A tiny random Qwen3-MoE made by transformers' own `from_config` (seed 0, fp32; 2 layers of
    8 experts, top-2, hidden 32), for checkpoints written by `save_pretrained` itself."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model
