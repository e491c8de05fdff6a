"""A real pattern store with chosen task scores (built through the PatternStore API)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from premoe.fingerprint import fingerprint_source
from premoe.patterns.store import PatternStore, TaskInfo, key_spec
from premoe.source import resolve_model

TOKENS = 100


def task_scores(n_layers: int, n_experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n_layers, n_experts), generator=g, dtype=torch.float64) ** 4  # [L, E]


@pytest.fixture
def make_store(tmp_path: Path) -> Callable[..., Path]:
    """`make_store(model_folder, {task: [L, E] scores} | None) -> store folder` (metric tcess)."""

    def make(folder: Path, scores: Mapping[str, torch.Tensor] | None = None) -> Path:
        src = resolve_model(folder)
        shape = (len(src.moe_layers), src.num_experts)
        if scores is None:
            scores = {"math": task_scores(*shape, 1), "code": task_scores(*shape, 2)}
        store = PatternStore(fingerprint_source(src), ["tcess", "frequency"], key_spec())
        rng = np.random.default_rng(0)
        for name, s in scores.items():
            keys = {kind: rng.normal(size=(4, 8)).astype(np.float32) for kind in ("router_input",)}
            store.add_task(
                name,
                TaskInfo(source="test", samples=4, tokens=TOKENS, created="2026-01-01T00:00:00Z"),
                {"counts": torch.ones(shape, dtype=torch.float64), "tcess": s * TOKENS},
                keys,
            )
        out = tmp_path / f"store-{len(list(tmp_path.glob('store-*')))}"
        store.save(out)
        src.close()
        return out

    return make
