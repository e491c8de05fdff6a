"""Synthetic task suite of the bundled demo model.

Each task draws short prompts from its own character set, so that the tasks have clearly
different input distributions (as "math", "code" and "prose" do for a real model), and each has
one checkable answer:

===========  ==========================  =======================================
task         example (prompt -> answer)  what it asks
===========  ==========================  =======================================
``add``      ``12+345=`` -> ``357``      sum of two numbers of 1-3 digits
``reverse``  ``kqzb>`` -> ``bzqk``       reverse a lowercase string
``sort``     ``QDKA:`` -> ``ADKQ``       sort uppercase letters
``count``    ``#@#&|#?`` -> ``2``        how often the symbol after ``|`` occurs
``close``    ``([<{;`` -> ``}>])``       close the open brackets, innermost first
===========  ==========================  =======================================

A row is ``{"task", "prompt", "answer", "text"}`` with ``text == prompt + answer``; the model is
trained on ``text`` followed by its end-of-sequence token and answers greedily.

Splits are disjoint by construction, not by luck: every prompt belongs to exactly one split,
chosen by a hash of the task name and the prompt (80 % train, 10 % profile, 10 % eval). A
held-out eval prompt can therefore never appear in the training or profiling data, whatever the
seeds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

Split = Literal["train", "profile", "eval"]
SPLITS: tuple[Split, ...] = ("train", "profile", "eval")

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
#: Every character the tokenizer knows: printable ASCII (space included) and newline.
CHARACTERS: str = "\n" + "".join(chr(c) for c in range(32, 127))

_COUNT_SYMBOLS = "#$%&*@"
_OPEN = "([{<"
_CLOSE = {"(": ")", "[": "]", "{": "}", "<": ">"}


def _add(rng: random.Random) -> tuple[str, str]:
    a = rng.randrange(10 ** rng.randint(1, 3))
    b = rng.randrange(10 ** rng.randint(1, 3))
    return f"{a}+{b}=", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
    return f"{s}>", s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(2, 8)))
    return f"{s}:", "".join(sorted(s))


def _count(rng: random.Random) -> tuple[str, str]:
    length = rng.randint(3, 9)
    target = rng.choice(_COUNT_SYMBOLS)
    hits = rng.randint(0, min(length, 6))  # uniform counts, so large ones are not rare
    others = [c for c in _COUNT_SYMBOLS if c != target]
    chars = [target] * hits + [rng.choice(others) for _ in range(length - hits)]
    rng.shuffle(chars)
    return f"{''.join(chars)}|{target}?", str(hits)


def _close(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(_OPEN) for _ in range(rng.randint(2, 8)))
    return f"{s};", "".join(_CLOSE[c] for c in reversed(s))


@dataclass(frozen=True)
class Task:
    """One synthetic task: a sampler of (prompt, answer) pairs and a line of description."""

    name: str
    sample: Callable[[random.Random], tuple[str, str]]
    description: str
    #: Longest possible answer, in characters (bounds generation length).
    max_answer_chars: int


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("add", _add, "sum of two numbers of 1-3 digits: '12+345=' -> '357'", 4),
        Task("reverse", _reverse, "reverse a lowercase string: 'kqzb>' -> 'bzqk'", 8),
        Task("sort", _sort, "sort uppercase letters: 'QDKA:' -> 'ADKQ'", 8),
        Task("count", _count, "count the symbol after '|': '#@#&|#?' -> '2'", 1),
        Task("close", _close, "close open brackets, innermost first: '([<{;' -> '}>])'", 8),
    )
}

# Held-out shares of the prompt space; the rest is train.
_SPLIT_BUCKETS: dict[Split, range] = {"eval": range(0, 10), "profile": range(10, 20)}


def task_names() -> list[str]:
    """Names of the demo tasks, in a fixed order."""
    return list(TASKS)


def split_of(task: str, prompt: str) -> Split:
    """The one split a prompt belongs to (a pure function of task and prompt)."""
    bucket = int.from_bytes(hashlib.sha256(f"{task}\0{prompt}".encode()).digest()[:4], "big") % 100
    for split, buckets in _SPLIT_BUCKETS.items():
        if bucket in buckets:
            return split
    return "train"


def _get_task(task: str) -> Task:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown demo task {task!r}; known: {', '.join(TASKS)}") from None


def make_row(task: str, prompt: str, answer: str) -> dict[str, str]:
    """A row of the suite: task, prompt, answer and the training text ``prompt + answer``."""
    return {"task": task, "prompt": prompt, "answer": answer, "text": prompt + answer}


def iter_examples(task: str, seed: int, split: Split = "train") -> Iterable[dict[str, str]]:
    """An endless, deterministic stream of rows of ``task`` whose prompts lie in ``split``.

    Prompts may repeat in the stream (use `generate` for distinct prompts).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    spec = _get_task(task)
    rng = random.Random(f"premoe-demo/{task}/{split}/{seed}")
    while True:
        prompt, answer = spec.sample(rng)
        if split_of(task, prompt) == split:
            yield make_row(task, prompt, answer)


def generate(task: str, n: int, seed: int, split: Split = "eval") -> list[dict[str, str]]:
    """``n`` rows of ``task`` with distinct prompts from ``split``, deterministic for ``seed``.

    Different splits never share a prompt (see `split_of`).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    tries = 0
    for row in iter_examples(task, seed, split):
        tries += 1
        if row["prompt"] in seen:
            if tries > 1000 * (n + 10):
                raise ValueError(f"task {task!r} has fewer than {n} distinct {split} prompts")
            continue
        if len(rows) >= n:
            break
        seen.add(row["prompt"])
        rows.append(row)
    return rows


def exact_match(pred: str, answer: str) -> bool:
    """Whether a generated answer equals the reference (surrounding whitespace ignored)."""
    return pred.strip() == answer.strip()


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON lines (UTF-8); creates parent folders. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read JSON lines written by `write_jsonl`."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_suite(
    folder: str | Path,
    n_profile: int = 256,
    n_eval: int = 100,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
) -> dict[str, dict[str, Path]]:
    """Write ``{task}.profile.jsonl`` and ``{task}.eval.jsonl`` for every task into ``folder``.

    Profile files are task corpora (a profiler reads their ``text`` field); eval files are
    held-out prompt/answer sets. Returns ``{task: {"profile": path, "eval": path}}``.
    """
    folder = Path(folder)
    out: dict[str, dict[str, Path]] = {}
    for task in tasks if tasks is not None else task_names():
        out[task] = {
            "profile": write_jsonl(
                generate(task, n_profile, seed, "profile"), folder / f"{task}.profile.jsonl"
            ),
            "eval": write_jsonl(
                generate(task, n_eval, seed, "eval"), folder / f"{task}.eval.jsonl"
            ),
        }
    logger.info("wrote the demo suite (%d tasks) to %s", len(out), folder)
    return out


def build_tokenizer(model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """The demo model's character-level tokenizer (one token per character).

    A `tokenizers` WordLevel model over `CHARACTERS` and the special tokens, a pre-tokenizer that
    isolates every character, a ``<bos>`` prepended to every sequence, and a decoder that joins
    characters back without spaces. Padding is on the left, for batched greedy generation.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *CHARACTERS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def max_new_tokens(task: str) -> int:
    """Generation budget for a task: its longest answer plus the end-of-sequence token."""
    return _get_task(task).max_answer_chars + 1


def solve(
    model: Any,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    max_new_tokens: int = 9,
    batch_size: int = 256,
) -> list[str]:
    """Greedy answers of ``model`` to ``prompts`` (batched, left-padded), special tokens removed."""
    import torch

    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            list(prompts[start : start + batch_size]), return_tensors="pt", padding=True
        )
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return answers


def accuracy(
    model: Any,
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[dict[str, str]],
    batch_size: int = 256,
) -> float:
    """Greedy exact-match accuracy of ``model`` on rows with ``prompt`` and ``answer``."""
    if not rows:
        return float("nan")
    budget = max(max_new_tokens(r["task"]) if r.get("task") in TASKS else 16 for r in rows)
    preds = solve(model, tokenizer, [r["prompt"] for r in rows], budget, batch_size)
    return sum(exact_match(p, r["answer"]) for p, r in zip(preds, rows, strict=True)) / len(rows)
