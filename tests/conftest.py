"""Session fixtures: tiny random checkpoints, built once per test run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.tiny import build_tiny, save_tiny

# Tiny models: one thread avoids thread hand-off costs that dominate at this size (and contention).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_checkpoint(family, layout="original", seed=0)` -> folder of a saved tiny model."""
    cache: dict[tuple[str, str, int], Path] = {}
    root = tmp_path_factory.mktemp("tiny")

    def make(family: str, layout: str = "original", seed: int = 0) -> Path:
        key = (family, layout, seed)
        if key not in cache:
            cache[key] = save_tiny(
                build_tiny(family, seed), root / f"{family}-{layout}-{seed}", layout
            )
        return cache[key]

    return make
