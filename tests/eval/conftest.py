"""Fixtures of the eval tests: a tiny Qwen3-MoE with the demo char tokenizer, a small task suite
and a pattern store profiled on it (tcess and frequency only, so that reap is missing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from premoe.demo.tasks import build_tokenizer, write_suite
from premoe.eval.harness import torch_threads
from tests.tiny import build_tiny, save_tiny

TASKS = ("add", "sort", "count")


@pytest.fixture(scope="session")
def eval_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random qwen3_moe (8 experts, top-2) with the demo tokenizer."""
    folder = tmp_path_factory.mktemp("eval_model") / "qwen3_moe"
    tok = build_tokenizer(64)
    model = build_tiny(
        "qwen3_moe",
        0,
        vocab_size=128,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    save_tiny(model, folder, "original")
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def eval_suite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    return write_suite(tmp_path_factory.mktemp("eval_suite"), 32, 12, 0, list(TASKS))


@pytest.fixture(scope="session")
def eval_store(
    eval_model: Path, eval_suite: dict, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from premoe.profile import profile

    out = tmp_path_factory.mktemp("eval_store") / "store"
    with torch_threads(1):
        profile(
            eval_model,
            {t: p["profile"] for t, p in eval_suite.items()},
            out=out,
            metrics=["tcess", "frequency"],
            device="cpu",
            batch_size=32,
        )
    return out
