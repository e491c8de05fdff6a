"""Session fixtures: tiny random checkpoints, built once per test run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import save_with_tokenizer, suite, tiny_model
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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_dir(family, seed=0)` -> a saved tiny model folder with the demo char tokenizer
    (cached)."""
    cache: dict[tuple[str, int], Path] = {}
    root = tmp_path_factory.mktemp("tiny_tok")

    def make(family: str, seed: int = 0) -> Path:
        if (family, seed) not in cache:
            cache[(family, seed)] = save_with_tokenizer(
                tiny_model(family, seed), root / f"{family}-{seed}"
            )
        return cache[(family, seed)]

    return make


@pytest.fixture(scope="session")
def demo_suite(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Synthetic task corpora: {task: {"profile": path, "eval": path}} for add, reverse, sort."""
    return suite(tmp_path_factory.mktemp("suite"))
