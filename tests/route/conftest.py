"""Fixtures of the profile tests (tiny model folders with the demo char tokenizer)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.profile.helpers import save_with_tokenizer, suite, tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_dir(family, seed=0)` -> a saved tiny model folder with a tokenizer (cached)."""
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
