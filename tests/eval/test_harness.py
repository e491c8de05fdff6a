"""Scoring one model: batched greedy decoding, exact match, perplexity, eval set files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from premoe.errors import CorpusError, UsageError
from premoe.eval.harness import (
    EvalSet,
    accuracy,
    combine,
    eval_set_from_rows,
    greedy_answers,
    load_eval_set,
    perplexity,
    score_many,
    subset,
    torch_threads,
)


@pytest.fixture(scope="module")
def loaded(eval_model: Path):
    tok = AutoTokenizer.from_pretrained(eval_model)
    net = AutoModelForCausalLM.from_pretrained(eval_model, dtype=torch.float32).eval()
    return net, tok


def _prompts(eval_suite: dict) -> list[str]:
    rows = [
        json.loads(x) for t in eval_suite for x in eval_suite[t]["eval"].read_text().splitlines()
    ]
    return [r["prompt"] for r in rows]


def test_batched_left_padded_decoding_equals_one_by_one(loaded, eval_suite) -> None:
    net, tok = loaded
    prompts = _prompts(eval_suite)[:16]
    with torch_threads(1):
        batched = greedy_answers(net, tok, prompts, budgets=6, batch_size=16)
        single = greedy_answers(net, tok, prompts, budgets=6, batch_size=1)
    assert batched == single
    assert len({len(p) for p in prompts}) > 1  # padding was really exercised
    assert all("\n" not in a for a in batched)


def test_exact_match_accuracy_counts_own_answers(loaded, eval_suite) -> None:
    net, tok = loaded
    prompts = _prompts(eval_suite)[:12]
    with torch_threads(1):
        own = greedy_answers(net, tok, prompts, budgets=6)
        # the model's own answers are right; perturbed ones are wrong
        answers = [a if i % 3 else a + "#" for i, a in enumerate(own)]
        es = EvalSet("x", "accuracy", "test", prompts, answers)
        s = accuracy(net, tok, es, fixed_budget=6)
    assert s.kind == "accuracy" and s.n == 12
    assert s.correct == 8 and s.value == pytest.approx(8 / 12)
    assert s.predictions is not None and len(s.predictions) == 12
    # a prediction never depends on its batch-mates: scored alone, the same
    with torch_threads(1):
        alone = accuracy(net, tok, subset(es, [3]), fixed_budget=6)
        default = accuracy(net, tok, es)  # budgets from the answers' lengths
    assert alone.predictions == s.predictions[3:4]
    assert default.n == 12 and 0 <= default.value <= 1


def test_perplexity_matches_a_direct_computation(loaded) -> None:
    net, tok = loaded
    texts = ["12+34=46", "abc>cba", "QDKA:ADKQ", "#@#|#?2"]
    es = EvalSet("x", "perplexity", "test", texts=texts)
    with torch_threads(1), torch.no_grad():
        s = perplexity(net, tok, es, batch_size=3)
        nll, n = 0.0, 0
        for t in texts:
            ids = torch.tensor([tok.encode(t)])
            logits = net(input_ids=ids).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    assert s.tokens == n and s.n == 4
    assert s.value == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_kind_detection_and_files(tmp_path: Path) -> None:
    qa = eval_set_from_rows("t", [{"prompt": "1+1=", "answer": "2"}], "mem")
    assert qa.kind == "accuracy" and qa.prompts == ["1+1="] and qa.queries == ["1+1="]
    text = eval_set_from_rows("t", [{"text": "hello"}, {"prompt": "a", "completion": "b"}], "mem")
    assert text.kind == "perplexity" and text.texts == ["hello", "ab"]
    # numbers as answers are accepted as text
    assert eval_set_from_rows("t", [{"prompt": "1+1=", "answer": 2}], "m").answers == ["2"]

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"task": "a", "prompt": "p1", "answer": "x"},
                {"task": "b", "prompt": "p2", "answer": "y"},
                {"task": "a", "prompt": "p3", "answer": "z"},
            ]
        )
    )
    got = load_eval_set("a", mixed, filter_task=True)
    assert got.prompts == ["p1", "p3"]
    with pytest.raises(CorpusError, match="no row of task 'c'"):
        load_eval_set("c", mixed, filter_task=True)
    plain = tmp_path / "plain.txt"
    plain.write_text("first line\n\nsecond line\n")
    assert load_eval_set("a", plain).texts == ["first line", "second line"]
    with pytest.raises(UsageError, match="plain text"):
        load_eval_set("a", plain, filter_task=True)
    with pytest.raises(CorpusError, match="does not exist"):
        load_eval_set("a", tmp_path / "missing.jsonl")
    with pytest.raises(CorpusError, match="unknown eval set format"):
        load_eval_set("a", mixed.rename(tmp_path / "mixed.xml"))


def test_max_samples_is_a_seeded_subset() -> None:
    rows = [{"prompt": str(i), "answer": str(i)} for i in range(50)]
    a = eval_set_from_rows("t", rows, "m", max_samples=10, seed=1)
    b = eval_set_from_rows("t", rows, "m", max_samples=10, seed=1)
    c = eval_set_from_rows("t", rows, "m", max_samples=10, seed=2)
    assert a.prompts == b.prompts != c.prompts and len(a) == 10
    assert a.prompts == sorted(a.prompts, key=int)  # source order kept
    with pytest.raises(UsageError):
        eval_set_from_rows("t", rows, "m", max_samples=0)


def test_score_many_and_combine_agree_with_single_scores(loaded, eval_suite) -> None:
    net, tok = loaded
    sets = {t: load_eval_set(t, eval_suite[t]["eval"]) for t in eval_suite}
    with torch_threads(1):
        together = score_many(net, tok, list(sets.values()))
        alone = [accuracy(net, tok, s) for s in sets.values()]
    assert [s.predictions for s in together] == [s.predictions for s in alone]
    s = next(iter(sets.values()))
    idx_a, idx_b = [0, 2, 4], [i for i in range(len(s)) if i not in (0, 2, 4)]
    with torch_threads(1):
        parts = score_many(net, tok, [subset(s, idx_a), subset(s, idx_b)])
    merged = combine([(parts[0], idx_a), (parts[1], idx_b)], len(s))
    assert merged.predictions == alone[0].predictions and merged.value == alone[0].value
