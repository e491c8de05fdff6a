"""Task corpora: read a source into texts, then sample and tokenize deterministically.

A task is given as ``NAME=SOURCE``. SOURCE is one of:

- a JSONL file (``.jsonl``, ``.ndjson``, or ``.json`` holding JSON lines or one JSON array of
  rows). The text of a row is, unless ``text_field`` names a field: ``text``; else ``prompt``
  followed directly by ``completion`` or ``response`` (or ``prompt`` alone); else chat
  ``messages`` rendered with the tokenizer's chat template;
- a plain text file (``.txt``, ``.text``, ``.md``): **one sample per non-empty line**;
- a Parquet (``.parquet``, ``.pq``) or CSV/TSV (``.csv``, ``.tsv``) file, read with pandas, with
  the same field rules as JSONL (columns are fields);
- ``hf:NAME[:CONFIG][:SPLIT]``: a Hugging Face dataset through `datasets.load_dataset`
  (``SPLIT`` defaults to ``train``; a cached dataset loads with no network, and a local folder
  of data files works as NAME too).

Sampling (`sample_task`): with no limit every sample is used in source order. With
``max_samples`` or ``max_tokens`` the samples are visited in a permutation drawn from ``seed``
and taken until ``max_samples`` samples or ``max_tokens`` tokens are reached (at least one
sample). Every sample is truncated to ``max_length`` tokens. Same inputs, same seed: same samples.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from premoe.errors import CorpusError, UsageError

log = logging.getLogger(__name__)

_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_JSONL = {".jsonl", ".ndjson", ".json"}
_TEXT = {".txt", ".text", ".md"}
_PARQUET = {".parquet", ".pq"}
_CSV = {".csv", ".tsv"}
_COMPLETION_FIELDS = ("completion", "response")

Render = Callable[[Any], str]  # chat messages -> text

CHARS_PER_TOKEN_BOUND = 64
"""No token of any tokenizer is longer than this many characters (a generous bound): a sample
is cut to ``max_length * CHARS_PER_TOKEN_BOUND`` characters before tokenizing, so one huge line
costs no more than a long sample."""


def check_task_name(name: str) -> str:
    if not _TASK_NAME.match(name) or name.startswith("__"):
        raise UsageError(
            f"bad task name {name!r}: use letters, digits, '_', '.', '-' (not starting with "
            "'__', which is reserved)"
        )
    return name


def parse_task_spec(spec: str) -> tuple[str, str]:
    """``"NAME=SOURCE"`` -> (name, source)."""
    name, sep, source = spec.partition("=")
    if not sep or not name.strip() or not source.strip():
        raise UsageError(f"--task expects NAME=SOURCE (e.g. math=math.jsonl), got {spec!r}")
    return check_task_name(name.strip()), source.strip()


def parse_task_specs(specs: Sequence[str]) -> dict[str, str]:
    tasks: dict[str, str] = {}
    for spec in specs:
        name, source = parse_task_spec(spec)
        if name in tasks:
            raise UsageError(f"task {name!r} is given twice")
        tasks[name] = source
    return tasks


# ---- rows -> text ------------------------------------------------------------------------------


def _describe(source: str) -> str:
    return source if len(source) < 80 else "..." + source[-77:]


def row_text(row: dict[str, Any], text_field: str | None, render: Render | None, where: str) -> str:
    """The text of one row, by the module's field rules."""
    if text_field is not None:
        if text_field not in row:
            raise CorpusError(
                f"{where}: no field {text_field!r}; fields: {', '.join(map(str, row)) or 'none'}"
            )
        return _value_text(row[text_field], render, where)
    if "text" in row:
        return _value_text(row["text"], render, where)
    if "prompt" in row:
        text = _value_text(row["prompt"], render, where)
        for f in _COMPLETION_FIELDS:
            if f in row and row[f] is not None:
                return text + _value_text(row[f], render, where)
        return text
    if "messages" in row:
        return _value_text(row["messages"], render, where)
    raise CorpusError(
        f"{where}: no text field (looked for text, prompt + completion/response, messages); "
        f"fields: {', '.join(map(str, row)) or 'none'}; choose one with --text-field"
    )


def _value_text(value: Any, render: Render | None, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) for m in value):
        if render is None:
            raise CorpusError(f"{where}: chat messages need a tokenizer with a chat template")
        return render(list(value))
    raise CorpusError(f"{where}: expected text or chat messages, got {type(value).__name__}")


def chat_renderer(tokenizer: Any) -> Render | None:
    """Render chat messages with the tokenizer's chat template (None if it has none)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict[str, Any]]) -> str:
        try:
            return str(tokenizer.apply_chat_template(messages, tokenize=False))
        except Exception as exc:
            raise CorpusError(
                f"cannot render chat messages with the chat template: {exc}"
            ) from None

    return render


# ---- sources -----------------------------------------------------------------------------------


class _Rows(Sequence[str]):
    """Lazy texts of a row table (rows rendered on access)."""

    def __init__(self, get: Callable[[int], dict[str, Any]], n: int, conv: Callable[..., str]):
        self._get, self._n, self._conv = get, n, conv

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        return self._conv(self._get(i), i)


def read_text_file(path: Path, what: str = "corpus") -> str:
    """The UTF-8 text of a file; a one-line `CorpusError` (with the path) when it cannot be read,
    is binary or is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if b"\x00" in data[: 1 << 16]:
        raise CorpusError(f"{what} {path} is a binary file, not text (it holds NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CorpusError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
            "convert it to UTF-8"
        ) from None


def read_json_rows(path: Path, what: str = "corpus") -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (or a .json array); a one-line `CorpusError` on bad JSON."""
    text = read_text_file(path, what)
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise CorpusError(f"{path}: row {n} is {type(row).__name__}, expected a JSON object")
    return rows


def _read_table(path: Path) -> Any:
    try:
        import pandas as pd
    except ImportError:
        raise CorpusError(
            f"{path}: reading Parquet/CSV needs pandas (pip install 'premoe[data]')"
        ) from None
    try:
        if path.suffix in _PARQUET:
            return pd.read_parquet(path)
        return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    except Exception as exc:
        raise CorpusError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None


def _parse_hf(source: str) -> tuple[str, str | None, str]:
    parts = source[3:].split(":")
    if len(parts) > 3 or not parts[0]:
        raise UsageError(f"expected hf:NAME[:CONFIG][:SPLIT], got {source!r}")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def _load_hf(source: str) -> Any:
    name, config, split = _parse_hf(source)
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            f"{source}: needs the datasets library (pip install 'premoe[data]')"
        ) from None
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorpusError(f"{source}: cannot load the dataset ({msg})") from None


def read_texts(
    source: str | Path, *, text_field: str | None = None, render: Render | None = None
) -> Sequence[str]:
    """The texts of a corpus source (lazy for tables and datasets). Raises CorpusError."""
    src = str(source)
    if src.startswith("hf:"):
        ds = _load_hf(src)
        rows = _Rows(lambda i: ds[i], len(ds), _converter(src, text_field, render))
        if len(rows):
            rows[0]  # check the fields now, not halfway through sampling
        return rows
    path = Path(src).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus file {path} does not exist")
    if path.is_dir():
        raise CorpusError(f"corpus {path} is a folder; pass a file, or hf:{path} for a dataset")
    suffix = path.suffix.lower()
    if suffix in _TEXT:
        return [line.strip() for line in read_text_file(path).splitlines()]
    if suffix in _JSONL:
        rows = read_json_rows(path)
        conv = _converter(str(path), text_field, render)
        return [conv(row, i) for i, row in enumerate(rows)]
    if suffix in _PARQUET | _CSV:
        df = _read_table(path)
        records = df.to_dict(orient="records")
        conv = _converter(str(path), text_field, render)
        return [conv(row, i) for i, row in enumerate(records)]
    raise CorpusError(
        f"{path}: unknown corpus format {suffix or '(no suffix)'!r}; use .jsonl, .json, .txt, "
        ".parquet, .csv/.tsv or hf:NAME[:CONFIG][:SPLIT]"
    )


def _converter(where: str, text_field: str | None, render: Render | None) -> Callable[..., str]:
    def conv(row: dict[str, Any], i: int) -> str:
        return row_text(row, text_field, render, f"{_describe(where)} row {i + 1}")

    return conv


# ---- sampling ----------------------------------------------------------------------------------


@dataclass
class TaskCorpus:
    """A task's sampled, tokenized corpus."""

    name: str
    source: str
    token_ids: list[list[int]]  # one list per sample, each 1..max_length tokens
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return len(self.token_ids)

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


def _encode(tokenizer: Any, text: str, max_length: int) -> list[int]:
    text = text[: max_length * CHARS_PER_TOKEN_BOUND]  # a huge line: cut before tokenizing
    ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    return list(ids[:max_length])


def sample_task(
    name: str,
    source: str,
    texts: Sequence[str],
    tokenizer: Any,
    *,
    max_samples: int | None = None,
    max_tokens: int | None = None,
    max_length: int = 512,
    seed: int = 0,
) -> TaskCorpus:
    """Pick and tokenize a task's samples deterministically (see the module docstring)."""
    for label, value in (("max-samples", max_samples), ("max-tokens", max_tokens)):
        if value is not None and value < 1:
            raise UsageError(f"--{label} must be >= 1, got {value}")
    if max_length < 1:
        raise UsageError(f"--max-length must be >= 1, got {max_length}")
    order: Sequence[int] = range(len(texts))
    if max_samples is not None or max_tokens is not None:
        perm = list(order)
        random.Random(seed).shuffle(perm)
        order = perm
    ids: list[list[int]] = []
    total = 0
    for i in order:
        text = texts[i]
        if not text or not text.strip():
            continue
        tok = _encode(tokenizer, text, max_length)
        if not tok:
            continue
        if max_tokens is not None and ids and total + len(tok) > max_tokens:
            break
        ids.append(tok)
        total += len(tok)
        if max_samples is not None and len(ids) >= max_samples:
            break
        if max_tokens is not None and total >= max_tokens:
            break
    if not ids:
        raise CorpusError(f"task {name!r}: corpus {_describe(source)} has no non-empty sample")
    options = {
        "max_samples": max_samples,
        "max_tokens": max_tokens,
        "max_length": max_length,
        "seed": seed,
    }
    log.info("task %s: %d samples, %d tokens from %s", name, len(ids), total, source)
    return TaskCorpus(name=name, source=source, token_ids=ids, options=options)


def load_task(
    name: str,
    source: str | Path,
    tokenizer: Any,
    *,
    text_field: str | None = None,
    max_samples: int | None = None,
    max_tokens: int | None = None,
    max_length: int = 512,
    seed: int = 0,
) -> TaskCorpus:
    """Read, sample and tokenize one task's corpus."""
    check_task_name(name)
    texts = read_texts(source, text_field=text_field, render=chat_renderer(tokenizer))
    corpus = sample_task(
        name,
        str(source),
        texts,
        tokenizer,
        max_samples=max_samples,
        max_tokens=max_tokens,
        max_length=max_length,
        seed=seed,
    )
    corpus.options["text_field"] = text_field
    return corpus
