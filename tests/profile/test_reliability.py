"""Issue #13, items 5-7: bad inputs are named as what they are, options are not silently
changed, and one huge corpus line costs no more than a long sample."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from premoe.errors import CheckpointError, CorpusError, ModelNotFoundError, UsageError
from premoe.generate import fit_context
from premoe.io.reader import CheckpointReader
from premoe.profile import profile
from premoe.profile.corpus import CHARS_PER_TOKEN_BOUND, load_task, read_texts
from premoe.source import load_tokenizer
from tests.helpers import tokenizer
from tests.tiny import build_tiny, save_tiny


def _profile(model: Path, tasks: dict, out: Path | None = None, **kw):
    return profile(model, tasks, out=out, device="cpu", batch_size=16, **kw)


# ---- item 5: decoding errors are one line with the path ----------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        ("a.txt", "caf\xe9\n".encode("latin-1"), r"not UTF-8 text \(byte 0xe9 on line 1\)"),
        ("a.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', "byte 0xff on line 2"),
        ("a.jsonl", b'{"text": "a\x00b"}\n', "binary file"),
    ],
)
def test_undecodable_corpora_are_named(tmp_path, name, data, needle) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(CorpusError, match=needle) as err:
        read_texts(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ---- item 6: wrong or silent answers -----------------------------------------------------------


def test_unreadable_shard_is_not_called_missing(tmp_path, monkeypatch) -> None:
    folder = save_tiny(build_tiny("qwen3_moe"), tmp_path / "m", "original")
    shard = folder / "model.safetensors"
    real_open = os.open

    def denied(path, flags, *a):
        if Path(path) == shard:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(CheckpointError, match="permission denied") as err:
        reader = CheckpointReader(folder)
        reader.get(reader.keys()[0])
    assert "re-download" not in str(err.value) and str(shard) in str(err.value)


def test_missing_tokenizer_is_named(tmp_path, demo_suite) -> None:
    folder = save_tiny(build_tiny("qwen3_moe"), tmp_path / "m", "original")
    with pytest.raises(ModelNotFoundError, match="no usable tokenizer"):
        load_tokenizer(folder)
    with pytest.raises(ModelNotFoundError, match="no usable tokenizer"):  # not "no sample"
        _profile(folder, {"add": demo_suite["add"]["profile"]})


def test_generate_refuses_a_prompt_longer_than_the_context() -> None:
    class Config:
        max_position_embeddings = 64

    with pytest.raises(UsageError, match="maximum context length is 64 tokens"):
        fit_context(64, 8, Config())
    assert fit_context(60, 8, Config()) == 4  # lowered to what fits (with a warning)
    assert fit_context(10, 8, Config()) == 8


def test_knn_zero_is_refused_not_replaced(tiny_dir, demo_suite) -> None:
    with pytest.raises(UsageError, match="--knn must be >= 1, got 0"):
        _profile(tiny_dir("qwen3_moe"), {"add": demo_suite["add"]["profile"]}, knn=0)


def test_max_length_is_not_mixed_into_a_store(tiny_dir, demo_suite, tmp_path) -> None:
    model, store = tiny_dir("qwen3_moe"), tmp_path / "store"
    _profile(model, {"add": demo_suite["add"]["profile"]}, store, max_length=32)
    with pytest.raises(UsageError, match="--max-length 32"):
        _profile(model, {"sort": demo_suite["sort"]["profile"]}, store, max_length=16)
    # no --max-length: the store's is used; the same task may be re-profiled with another
    st = _profile(model, {"sort": demo_suite["sort"]["profile"]}, store)
    assert st.tasks["sort"].options["max_length"] == 32
    fresh = _profile(model, {"add": demo_suite["add"]["profile"]}, tmp_path / "s2", max_length=8)
    assert fresh.tasks["add"].options["max_length"] == 8


# ---- item 7: one huge line ---------------------------------------------------------------------


def test_a_huge_line_is_cut_before_tokenizing(tmp_path) -> None:
    path = tmp_path / "huge.txt"
    path.write_text("ab" * 5_000_000 + "\nshort line\n")  # one 10 MB line
    tok = tokenizer()
    seen: list[int] = []

    class Spy:
        chat_template = None

        def __call__(self, text, **kw):
            seen.append(len(text))
            return tok(text, **kw)

    start = time.perf_counter()
    corpus = load_task("t", path, Spy(), max_length=16)
    assert time.perf_counter() - start < 10
    assert max(seen) <= 16 * CHARS_PER_TOKEN_BOUND
    assert [len(ids) for ids in corpus.token_ids] == [16, 11]  # <bos> + 10 characters
