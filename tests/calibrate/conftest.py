"""A tiny model with a tokenizer, a calibration corpus file and a store whose task points at it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from premoe.fingerprint import fingerprint_source
from premoe.patterns.store import PatternStore, TaskInfo, key_spec
from premoe.source import resolve_model
from tests.helpers import random_texts, write_texts


@pytest.fixture
def calib_store(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """`calib_store(model_folder) -> (store folder, corpus file)`: one task "alpha" whose
    recorded source is a real JSONL corpus (tcess + reap scores, random)."""

    def make(folder: Path, n: int = 24) -> tuple[Path, Path]:
        corpus = write_texts(tmp_path / "alpha.jsonl", random_texts(n, 1, alphabet="abcdefgh"))
        src = resolve_model(folder)
        shape = (len(src.moe_layers), src.num_experts)
        store = PatternStore(fingerprint_source(src), ["tcess", "reap"], key_spec())
        g = torch.Generator().manual_seed(0)
        sums = {
            "counts": torch.rand(shape, generator=g, dtype=torch.float64) * 10 + 1,
            "tcess": torch.rand(shape, generator=g, dtype=torch.float64) * 10,
            "reap": torch.rand(shape, generator=g, dtype=torch.float64) * 10,
        }
        keys = {"router_input": np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)}
        info = TaskInfo(
            source=str(corpus),
            samples=4,
            tokens=100,
            created="2026-01-01T00:00:00Z",
            options={"max_length": 32, "seed": 0},
        )
        store.add_task("alpha", info, sums, keys)
        out = tmp_path / "store"
        store.save(out)
        src.close()
        return out, corpus

    return make
