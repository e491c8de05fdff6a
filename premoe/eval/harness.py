"""Scoring one model on one evaluation set: greedy exact-match accuracy, or perplexity.

An evaluation set (`EvalSet`) is a list of rows. When every row has ``prompt`` and ``answer`` the
set is scored by **exact-match accuracy**: the model answers every prompt greedily (batched,
left-padded), generation stops at the end-of-sequence token or a newline, and the answer counts
when it equals the reference with surrounding whitespace ignored (`premoe.demo.tasks.exact_match`).
Otherwise the set is scored by **perplexity** on each row's text (the corpus field rules of
`premoe.profile.corpus`: ``text``, else ``prompt`` + ``completion``/``response``, ...): the
exponential of the mean negative log-likelihood over every predicted token of every row (the
first token of a row is never predicted; padding never counts).

Shape legend: B batch, S padded sequence length, V vocabulary.

One module because eval sets, their scoring (exact match, perplexity) and the batched greedy
generation both scores share are one contract with `premoe.eval.runner`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from premoe.batching import iter_batches, pad_batch
from premoe.demo import tasks as demo_tasks
from premoe.demo.tasks import exact_match
from premoe.errors import CorpusError, UsageError
from premoe.profile.corpus import read_json_rows, read_text_file, row_text

log = logging.getLogger(__name__)

Kind = Literal["accuracy", "perplexity"]

DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_NEW_TOKENS = 64
#: Tokens generated beyond the longest reference answer of a batch (end-of-sequence + slack for
#: tokenizers that split an answer differently in context).
ANSWER_SLACK = 2


@dataclass
class EvalSet:
    """Held-out rows of one task, scored by accuracy (prompt/answer) or perplexity (text)."""

    task: str
    kind: Kind
    source: str
    prompts: list[str] = field(default_factory=list)  # accuracy: the prompts
    answers: list[str] = field(default_factory=list)  # accuracy: the reference answers
    texts: list[str] = field(default_factory=list)  # perplexity: the texts

    def __len__(self) -> int:
        return len(self.prompts) if self.kind == "accuracy" else len(self.texts)

    @property
    def queries(self) -> list[str]:
        """What a router sees of each row: the prompt (accuracy) or the text (perplexity)."""
        return self.prompts if self.kind == "accuracy" else self.texts


def eval_set_from_rows(
    task: str,
    rows: Sequence[dict[str, Any]],
    source: str,
    *,
    max_samples: int | None = None,
    seed: int = 0,
    text_field: str | None = None,
) -> EvalSet:
    """An `EvalSet` from rows: accuracy when every row has prompt and answer, else perplexity.

    With `max_samples`, a seeded random subset of that size (in source order) is kept.
    """
    if max_samples is not None and max_samples < 1:
        raise UsageError(f"--max-samples must be >= 1, got {max_samples}")
    rows = list(rows)
    if not rows:
        raise CorpusError(f"eval set {source} of task {task!r} has no rows")
    if max_samples is not None and len(rows) > max_samples:
        pick = sorted(random.Random(seed).sample(range(len(rows)), max_samples))
        rows = [rows[i] for i in pick]
    qa = text_field is None and all(
        isinstance(r, dict)
        and isinstance(r.get("prompt"), str)
        and isinstance(r.get("answer"), str | int | float)
        for r in rows
    )
    if qa:
        return EvalSet(
            task,
            "accuracy",
            source,
            prompts=[str(r["prompt"]) for r in rows],
            answers=[str(r["answer"]) for r in rows],
        )

    texts = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise CorpusError(f"{source} row {i + 1}: expected a JSON object")
        text = row_text(row, text_field, None, f"{source} row {i + 1}")
        if text.strip():
            texts.append(text)
    if not texts:
        raise CorpusError(f"eval set {source} of task {task!r} has no non-empty text")
    log.info("eval set %s of task %s has no prompt/answer rows: scoring perplexity", source, task)
    return EvalSet(task, "perplexity", source, texts=texts)


def load_eval_set(
    task: str,
    source: str | Path,
    *,
    max_samples: int | None = None,
    seed: int = 0,
    text_field: str | None = None,
    filter_task: bool = False,
) -> EvalSet:
    """Read an eval set file: JSON lines (or a JSON array) of rows, or plain text lines.

    With `filter_task`, only rows whose ``task`` field equals `task` are kept (one file holding
    several tasks); a file whose rows have no ``task`` field is then an error.
    """
    path = Path(source).expanduser()
    if not path.is_file():
        raise CorpusError(f"eval set {path} does not exist (or is not a file)")
    suffix = path.suffix.lower()
    if suffix in {".txt", ".text", ".md"}:
        if filter_task:
            raise UsageError(
                f"eval set {path} is plain text, so it cannot hold several tasks; give it as "
                f"--eval-set {task}={path}"
            )

        text = read_text_file(path, "eval set")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        rows: list[dict[str, Any]] = [{"text": ln} for ln in lines]
    elif suffix in {".jsonl", ".ndjson", ".json"}:
        rows = read_json_rows(path, "eval set")
    else:
        raise CorpusError(
            f"{path}: unknown eval set format {suffix or '(no suffix)'!r}; use .jsonl or .txt"
        )
    if filter_task:
        if rows and not any(isinstance(r, dict) and "task" in r for r in rows):
            raise UsageError(
                f"eval set {path} has no 'task' field to split it by; give one file per task "
                f"as --eval-set TASK=FILE"
            )
        rows = [r for r in rows if isinstance(r, dict) and r.get("task") == task]
        if not rows:
            raise CorpusError(f"eval set {path} has no row of task {task!r}")
    return eval_set_from_rows(
        task, rows, str(path), max_samples=max_samples, seed=seed, text_field=text_field
    )


def demo_eval_set(task: str, n: int = 100, seed: int = 0) -> EvalSet:
    """The held-out eval split of a bundled demo task (`premoe.demo.tasks.generate`)."""

    if task not in demo_tasks.TASKS:
        raise UsageError(
            f"task {task!r} is not a bundled demo task, so there is no default eval set; "
            f"give one with --eval-set {task}=FILE"
        )
    rows = demo_tasks.generate(task, n, seed, "eval")
    return eval_set_from_rows(task, rows, f"premoe.demo.tasks:{task}:eval:seed={seed}")


# ---- scores ------------------------------------------------------------------------------------


@dataclass
class Score:
    """A model's score on one eval set."""

    kind: Kind
    value: float  # accuracy in [0, 1], or perplexity (>= 1)
    n: int  # rows scored
    correct: int | None = None  # accuracy: rows answered exactly
    tokens: int | None = None  # perplexity: tokens predicted
    nll: float | None = None  # perplexity: total negative log-likelihood (nats)
    predictions: list[str] | None = None  # accuracy: the generated answers, in row order

    def to_json(self, *, predictions: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "value": self.value, "n": self.n}
        if self.correct is not None:
            out["correct"] = self.correct
        if self.tokens is not None:
            out["tokens"] = self.tokens
        if predictions and self.predictions is not None:
            out["predictions"] = list(self.predictions)
        return out


def combine(parts: Sequence[tuple[Score, Sequence[int]]], n: int) -> Score:
    """One `Score` from scores of disjoint subsets of a set of `n` rows ((score, row indices))."""
    kinds = {s.kind for s, _ in parts}
    if len(kinds) != 1:
        raise ValueError("cannot combine accuracy with perplexity")
    kind = kinds.pop()
    if sum(len(idx) for _, idx in parts) != n:
        raise ValueError("the parts do not cover the rows exactly once")
    if kind == "accuracy":
        preds: list[str] = [""] * n
        correct = 0
        for s, idx in parts:
            correct += int(s.correct or 0)
            for i, p in zip(idx, s.predictions or [], strict=True):
                preds[i] = p
        return _accuracy_score(correct, n, preds)
    nll = sum(float(s.nll or 0.0) for s, _ in parts)
    tokens = sum(int(s.tokens or 0) for s, _ in parts)
    return Score(
        "perplexity", math.exp(nll / tokens) if tokens else float("nan"), n, tokens=tokens, nll=nll
    )


def subset(evalset: EvalSet, rows: Sequence[int]) -> EvalSet:
    """The rows `rows` of an eval set, in that order."""
    if evalset.kind == "accuracy":
        return EvalSet(
            evalset.task,
            "accuracy",
            evalset.source,
            prompts=[evalset.prompts[i] for i in rows],
            answers=[evalset.answers[i] for i in rows],
        )
    return EvalSet(
        evalset.task, "perplexity", evalset.source, texts=[evalset.texts[i] for i in rows]
    )


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` CPU threads for torch (None: leave as is), restoring the count after.

    Small models on a CPU shared with other work run far faster on one thread: OpenMP worker
    threads that spin-wait for a busy core can make every tiny kernel 10-100x slower.
    """
    if n is None:
        yield
        return
    if n < 1:
        raise UsageError(f"--threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def no_load_bars() -> Iterator[None]:
    """Silence transformers' own progress bars ("Loading weights") while models load; premoe
    reports progress through its callbacks instead."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def model_device(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


def _pad_id(tokenizer: Any, model: Any) -> int:
    for value in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(model.config, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            return value
    return 0


def _eos_ids(tokenizer: Any, model: Any, stop_at_newline: bool) -> list[int]:
    ids: list[int] = []
    for value in (getattr(tokenizer, "eos_token_id", None), model.config.eos_token_id):
        for v in value if isinstance(value, list | tuple) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    if stop_at_newline:
        nl = tokenizer.encode("\n", add_special_tokens=False)
        if len(nl) == 1 and nl[0] not in ids and nl[0] != getattr(tokenizer, "unk_token_id", -1):
            ids.append(nl[0])
    return ids


def _answer_tokens(tokenizer: Any, answers: Sequence[str]) -> list[int]:
    return [len(tokenizer.encode(a, add_special_tokens=False)) for a in answers]


def _budgets(tokenizer: Any, answers: Sequence[str], max_new_tokens: int) -> list[int]:
    """Per-row generation budgets: the reference answer's tokens + `ANSWER_SLACK`, capped."""
    return [min(max_new_tokens, t + ANSWER_SLACK) for t in _answer_tokens(tokenizer, answers)]


def _accuracy_score(correct: int, n: int, predictions: list[str]) -> Score:
    return Score(
        "accuracy", correct / n if n else float("nan"), n, correct=correct, predictions=predictions
    )


def _exact_matches(predictions: Sequence[str], answers: Sequence[str]) -> int:
    return sum(exact_match(p, a) for p, a in zip(predictions, answers, strict=True))


Progress = Callable[[int], None]  # called with the number of rows just finished


@torch.inference_mode()
def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    budgets: Sequence[int] | int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stop_at_newline: bool = True,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy answers to `prompts` (special tokens removed, cut at the first newline).

    Prompts are batched by length (left padding); each batch generates up to the largest of its
    rows' `budgets` new tokens and stops early once every row has ended (end-of-sequence or,
    with `stop_at_newline`, a newline token).
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    n = len(prompts)
    limits = [int(budgets)] * n if isinstance(budgets, int) else [int(b) for b in budgets]
    if len(limits) != n:
        raise ValueError("one generation budget per prompt")

    encoded = [tokenizer.encode(p) for p in prompts]
    order = sorted(range(n), key=lambda i: (len(encoded[i]), limits[i], i))
    device = model_device(model)
    pad = _pad_id(tokenizer, model)
    eos = _eos_ids(tokenizer, model, stop_at_newline)
    out: list[str] = [""] * n
    for start in range(0, n, batch_size):
        sel = order[start : start + batch_size]
        ids, mask = pad_batch([encoded[i] for i in sel], pad, left=True)  # [B, S] each
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(1, max(limits[i] for i in sel)),
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=eos or None,
        )
        new = gen[:, width:].cpu()  # [B, new]
        # each row keeps only its own budget, so its answer does not depend on its batch-mates
        texts = tokenizer.batch_decode(
            [new[row, : limits[i]] for row, i in enumerate(sel)], skip_special_tokens=True
        )
        for i, text in zip(sel, texts, strict=True):
            out[i] = text.split("\n", 1)[0] if stop_at_newline else text
        if progress is not None:
            progress(len(sel))
    return out


def accuracy(
    model: Any,
    tokenizer: Any,
    evalset: EvalSet,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    fixed_budget: int | None = None,
    progress: Progress | None = None,
) -> Score:
    """Greedy exact-match accuracy on a prompt/answer set.

    Each row may generate up to its reference answer's token count + `ANSWER_SLACK` tokens
    (never more than `max_new_tokens`): a longer answer could not match anyway.
    `fixed_budget` gives every row that many new tokens instead.
    """
    if evalset.kind != "accuracy":
        raise UsageError(f"eval set {evalset.source} has no prompt/answer rows")
    budgets: list[int] | int = (
        fixed_budget
        if fixed_budget is not None
        else _budgets(tokenizer, evalset.answers, max_new_tokens)
    )
    preds = greedy_answers(
        model, tokenizer, evalset.prompts, budgets=budgets, batch_size=batch_size, progress=progress
    )
    return _accuracy_score(_exact_matches(preds, evalset.answers), len(preds), preds)


@torch.inference_mode()
def perplexity(
    model: Any,
    tokenizer: Any,
    evalset: EvalSet,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: Progress | None = None,
) -> Score:
    """Perplexity on the texts: exp(total NLL / predicted tokens), padding excluded."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")

    max_pos = getattr(model.config, "max_position_embeddings", None)
    limit = max_length or (max_pos if isinstance(max_pos, int) and max_pos > 0 else 2048)
    encoded = [
        tokenizer.encode(t, truncation=True, max_length=limit)[:limit] for t in evalset.texts
    ]
    device = model_device(model)
    pad = _pad_id(tokenizer, model)
    nll = 0.0
    tokens = 0
    for ids, mask, sel in iter_batches(encoded, batch_size, pad):  # right padded, [B, S] each
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, S, V]
        target = ids[:, 1:]  # [B, S-1]
        keep = mask[:, 1:].bool()  # [B, S-1]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, S-1, V]
        tok_nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [B, S-1]
        nll += float(tok_nll[keep].sum())
        tokens += int(keep.sum())
        if progress is not None:
            progress(len(sel))
    if tokens == 0:
        raise CorpusError(
            f"eval set {evalset.source}: no text has two or more tokens, so perplexity is undefined"
        )
    return Score("perplexity", math.exp(nll / tokens), len(encoded), tokens=tokens, nll=nll)


def score(
    model: Any,
    tokenizer: Any,
    evalset: EvalSet,
    *,
    batch_size: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: Progress | None = None,
) -> Score:
    """`accuracy` or `perplexity`, by the eval set's kind."""
    return score_many(
        model,
        tokenizer,
        [evalset],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )[0]


def score_many(
    model: Any,
    tokenizer: Any,
    evalsets: Sequence[EvalSet],
    *,
    batch_size: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: Progress | None = None,
) -> list[Score]:
    """`score` of several sets on one model; the accuracy sets share one batched generation
    (fewer, fuller batches), and each set still gets its own `Score`."""
    qa = [s for s in evalsets if s.kind == "accuracy"]
    scores: dict[int, Score] = {}
    if qa:
        prompts = [p for s in qa for p in s.prompts]
        answers = [a for s in qa for a in s.answers]
        preds = greedy_answers(
            model,
            tokenizer,
            prompts,
            budgets=_budgets(tokenizer, answers, max_new_tokens),
            batch_size=batch_size or DEFAULT_BATCH_SIZE,
            progress=progress,
        )
        start = 0
        for s in qa:
            mine = preds[start : start + len(s)]
            start += len(s)
            scores[id(s)] = _accuracy_score(_exact_matches(mine, s.answers), len(s), mine)
    for s in evalsets:
        if s.kind == "perplexity":
            scores[id(s)] = perplexity(
                model, tokenizer, s, batch_size=batch_size or 8, progress=progress
            )
    return [scores[id(s)] for s in evalsets]


__all__ = [
    "EvalSet",
    "Score",
    "accuracy",
    "combine",
    "demo_eval_set",
    "eval_set_from_rows",
    "greedy_answers",
    "load_eval_set",
    "no_load_bars",
    "perplexity",
    "score",
    "score_many",
    "subset",
    "torch_threads",
]
