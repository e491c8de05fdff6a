"""Task corpora: every source format, field rules, deterministic sampling, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from premoe.errors import CorpusError, UsageError
from premoe.profile.corpus import load_task, parse_task_specs, read_texts
from tests.helpers import tokenizer

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_field_rules(tmp_path: Path) -> None:
    text = _jsonl(tmp_path / "a.jsonl", [{"text": "hello", "x": 1}, {"text": "world"}])
    assert list(read_texts(text)) == ["hello", "world"]
    pc = _jsonl(
        tmp_path / "b.jsonl",
        [
            {"prompt": "1+1=", "completion": "2"},
            {"prompt": "Q:", "response": "A"},
            {"prompt": "only"},
        ],
    )
    assert list(read_texts(pc)) == ["1+1=2", "Q:A", "only"]
    chosen = _jsonl(tmp_path / "c.jsonl", [{"body": "x", "text": "no"}])
    assert list(read_texts(chosen, text_field="body")) == ["x"]


def test_chat_messages_use_the_chat_template(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}]
    path = _jsonl(tmp_path / "chat.jsonl", rows)
    tok = tokenizer()
    with pytest.raises(CorpusError, match="chat template"):
        load_task("c", path, tok)  # this tokenizer has no template
    tok.chat_template = CHAT_TEMPLATE
    corpus = load_task("c", path, tok)
    assert corpus.token_ids[0] == tok("<user>hi\n<bot>yo\n")["input_ids"]


def test_json_array_text_parquet_csv(tmp_path: Path) -> None:
    import pandas as pd

    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"text": "p"}, {"text": "q"}]))
    assert list(read_texts(arr)) == ["p", "q"]
    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\n  second line  \n")
    corpus = load_task("t", txt, tokenizer())
    assert corpus.samples == 2  # one sample per non-empty line
    df = pd.DataFrame({"text": ["u", "v"], "n": [1, 2]})
    df.to_parquet(tmp_path / "a.parquet")
    df.to_csv(tmp_path / "a.csv", index=False)
    assert list(read_texts(tmp_path / "a.parquet")) == ["u", "v"]
    assert list(read_texts(tmp_path / "a.csv")) == ["u", "v"]
    with pytest.raises(CorpusError, match="fields: text, n"):
        read_texts(tmp_path / "a.parquet", text_field="body")


def test_hf_dataset_from_a_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [{"text": f"sample {i}"} for i in range(5)])
    texts = read_texts(f"hf:{folder}")
    assert len(texts) == 5 and texts[3] == "sample 3"
    with pytest.raises(CorpusError, match="no field 'body'; fields: text"):
        read_texts(f"hf:{folder}", text_field="body")
    with pytest.raises(CorpusError, match="cannot load the dataset"):
        read_texts(f"hf:{tmp_path / 'missing'}")


def test_sampling_is_deterministic_and_bounded(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [{"text": f"row number {i}"} for i in range(50)])
    tok = tokenizer()
    a = load_task("t", path, tok, max_samples=10, seed=3)
    b = load_task("t", path, tok, max_samples=10, seed=3)
    c = load_task("t", path, tok, max_samples=10, seed=4)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids and a.samples == 10
    capped = load_task("t", path, tok, max_tokens=60, seed=0)
    assert capped.tokens <= 60 and capped.samples >= 1
    short = load_task("t", path, tok, max_length=4)
    assert short.samples == 50 and max(len(t) for t in short.token_ids) == 4
    assert load_task("t", path, tok).token_ids[0] == tok("row number 0")["input_ids"]


def test_corpus_errors(tmp_path: Path) -> None:
    tok = tokenizer()
    with pytest.raises(CorpusError, match="does not exist"):
        load_task("t", tmp_path / "missing.jsonl", tok)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(CorpusError, match="no non-empty sample"):
        load_task("t", tmp_path / "empty.jsonl", tok)
    blank = _jsonl(tmp_path / "blank.jsonl", [{"text": "  "}, {"text": ""}])
    with pytest.raises(CorpusError, match="no non-empty sample"):
        load_task("t", blank, tok)
    odd = _jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(CorpusError, match="fields: question, answer"):
        load_task("t", odd, tok)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        load_task("t", tmp_path / "bad.jsonl", tok)
    (tmp_path / "x.xyz").write_text("a")
    with pytest.raises(CorpusError, match="unknown corpus format"):
        load_task("t", tmp_path / "x.xyz", tok)
    for err in (CorpusError, UsageError):
        assert issubclass(err, Exception)


def test_task_specs() -> None:
    assert parse_task_specs(["math=a.jsonl", "code=hf:org/x::test"]) == {
        "math": "a.jsonl",
        "code": "hf:org/x::test",
    }
    for bad in (["noequals"], ["=a.jsonl"], ["a b=x"], ["__global__=x"], ["a=x", "a=y"]):
        with pytest.raises(UsageError):
            parse_task_specs(bad)
