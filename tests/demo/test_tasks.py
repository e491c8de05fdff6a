"""Tests of the demo task suite, its tokenizer and the bundled demo model."""

from __future__ import annotations

import json
import random
import re

import pytest

from premoe.demo import MODEL_DIR
from premoe.demo import tasks as T

SEEDS = (0, 1)


def _reference_answer(task: str, prompt: str) -> str:
    """Recompute an answer from the prompt alone, independently of the samplers."""
    if task == "add":
        m = re.fullmatch(r"(\d{1,3})\+(\d{1,3})=", prompt)
        assert m, prompt
        return str(int(m[1]) + int(m[2]))
    if task == "reverse":
        assert re.fullmatch(r"[a-z]{2,8}>", prompt), prompt
        return prompt[:-1][::-1]
    if task == "sort":
        assert re.fullmatch(r"[A-Z]{2,8}:", prompt), prompt
        return "".join(sorted(prompt[:-1]))
    if task == "count":
        m = re.fullmatch(r"([#$%&*@]{3,9})\|([#$%&*@])\?", prompt)
        assert m, prompt
        return str(m[1].count(m[2]))
    if task == "close":
        assert re.fullmatch(r"[(\[{<]{2,8};", prompt), prompt
        pairs = {"(": ")", "[": "]", "{": "}", "<": ">"}
        return "".join(pairs[c] for c in prompt[-2::-1])
    raise AssertionError(f"no reference for task {task}")


def test_task_registry() -> None:
    names = T.task_names()
    assert names == list(T.TASKS)
    assert 5 <= len(names) <= 6
    for name, task in T.TASKS.items():
        assert task.name == name and task.description
        prompt, answer = task.sample(random.Random(0))
        assert isinstance(prompt, str) and isinstance(answer, str) and answer


@pytest.mark.parametrize("task", T.task_names())
def test_generate_is_deterministic_and_distinct(task: str) -> None:
    a = T.generate(task, 50, seed=3, split="profile")
    assert a == T.generate(task, 50, seed=3, split="profile")
    assert a != T.generate(task, 50, seed=4, split="profile")
    assert len(a) == 50 and len({r["prompt"] for r in a}) == 50


@pytest.mark.parametrize("task", T.task_names())
def test_splits_are_disjoint(task: str) -> None:
    prompts = {}
    for split in T.SPLITS:
        rows = [r for seed in SEEDS for r in T.generate(task, 300, seed, split)]
        prompts[split] = {r["prompt"] for r in rows}
        assert all(T.split_of(task, p) == split for p in prompts[split])
    assert not prompts["eval"] & prompts["profile"]
    assert not prompts["eval"] & prompts["train"]
    assert not prompts["profile"] & prompts["train"]


@pytest.mark.parametrize("task", T.task_names())
def test_answers_are_correct(task: str) -> None:
    for split in T.SPLITS:
        for row in T.generate(task, 200, 0, split):
            assert row["task"] == task
            assert row["text"] == row["prompt"] + row["answer"]
            assert row["answer"] == _reference_answer(task, row["prompt"])
            assert len(row["answer"]) <= T.TASKS[task].max_answer_chars


def test_exact_match() -> None:
    assert T.exact_match("357", "357")
    assert T.exact_match(" 357\n", "357")
    assert not T.exact_match("35", "357")
    assert not T.exact_match("3570", "357")


def test_write_suite(tmp_path) -> None:
    paths = T.write_suite(tmp_path, n_profile=20, n_eval=10, seed=0)
    assert sorted(paths) == sorted(T.task_names())
    for task, files in paths.items():
        assert files["profile"] == tmp_path / f"{task}.profile.jsonl"
        assert files["eval"] == tmp_path / f"{task}.eval.jsonl"
        profile = [json.loads(line) for line in files["profile"].read_text().splitlines()]
        evals = T.read_jsonl(files["eval"])
        assert len(profile) == 20 and len(evals) == 10
        assert all({"text", "prompt", "answer"} <= set(r) for r in profile + evals)
        assert not {r["prompt"] for r in profile} & {r["prompt"] for r in evals}


def test_tokenizer_round_trip() -> None:
    tok = T.build_tokenizer()
    assert tok.padding_side == "left"
    assert {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id} == {0, 1, 2}
    for task in T.task_names():
        for row in T.generate(task, 100, 0, "eval"):
            ids = tok(row["text"])["input_ids"]
            assert ids[0] == tok.bos_token_id and len(ids) == len(row["text"]) + 1
            assert tok.decode(ids, skip_special_tokens=True) == row["text"]
    weird = "a b\nc ~!"
    assert tok.decode(tok(weird)["input_ids"], skip_special_tokens=True) == weird


def test_bundled_tokenizer_matches_builder() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    built = T.build_tokenizer()
    assert tok.get_vocab() == built.get_vocab()
    assert tok.padding_side == "left"
    text = "12+345=357"
    assert tok(text)["input_ids"] == built(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_bundled_model_size_and_config() -> None:
    files = [p for p in MODEL_DIR.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 10 * 1024 * 1024
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(MODEL_DIR)
    assert config.model_type == "qwen3_moe"
    assert config.num_experts >= 32 and config.num_experts_per_tok == 4
    assert config.norm_topk_prob is True
    assert config.output_router_logits is False
    assert (MODEL_DIR / "README.md").is_file()


def test_bundled_model_solves_tasks() -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    rows = [r for t in T.task_names() for r in T.generate(t, 8, 0, "eval")]
    preds = T.solve(model, tok, [r["prompt"] for r in rows], max_new_tokens=9)
    right = [T.exact_match(p, r["answer"]) for p, r in zip(preds, rows, strict=True)]
    assert sum(right) >= len(rows) - 1, list(zip(rows, preds, strict=True))
