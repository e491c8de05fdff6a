"""Helpers shared by the profile, patterns and route tests: tiny models with a tokenizer,
synthetic corpora, and an in-process runner of the real `premoe` entry point."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from premoe.demo.tasks import build_tokenizer, write_jsonl, write_suite
from tests.tiny import build_tiny, save_tiny

VOCAB = 128  # the demo char tokenizer has 100 ids


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
