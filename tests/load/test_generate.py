"""`generate` / `premoe generate`: route on the expert-free prefix, load the pattern, generate."""

from __future__ import annotations

import json

import pytest
import torch

from premoe.errors import StoreMismatchError, UsageError
from premoe.generate import generate
from premoe.load import load_prefix, load_pruned, size_model
from premoe.patterns import PatternStore
from premoe.policy import select_experts
from premoe.profile import load_causal_lm, load_tokenizer, profile
from premoe.route import QueryKeyer, route
from premoe.source import resolve_model
from tests.helpers import (
    assert_one_line_error,
    run_cli,
    save_with_tokenizer,
    suite,
    tiny_model,
)

PROMPTS = ["12+345=", "kqzb>", "QDKA:"]  # add, reverse, sort


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("generate")
    corpora = {k: v["profile"] for k, v in suite(root / "suite").items()}
    out = {"corpora": corpora}
    for family in ("qwen3_moe", "deepseek_v3"):
        folder = save_with_tokenizer(tiny_model(family), root / family)
        out[family] = folder
        for key in ("router_input", "tcess"):
            store = root / f"store-{family}-{key}"
            profile(folder, corpora, out=store, device="cpu", key=key)
            out[(family, key)] = store
    out["other"] = save_with_tokenizer(tiny_model("qwen3_moe", seed=1), root / "other")
    return out


@pytest.mark.parametrize("key", ["router_input", "tcess"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_prefix_key_costs_no_expert_and_equals_the_full_models(setup, family, key) -> None:
    folder, store = setup[family], PatternStore.load(setup[(family, key)])
    src = resolve_model(folder)
    prefix = load_prefix(src)
    layer0 = src.moe_layers[0]
    experts = [
        prefix.model.layers[n].get_parameter(t.memory)
        for n in src.moe_layers
        for t in src.arch.experts
    ]
    assert all(p.is_meta for p in experts)  # no expert exists, yet the key is computed
    assert prefix.lm_head.weight.is_meta
    assert not prefix.model.layers[layer0].get_parameter(src.arch.router_weight.memory).is_meta
    tok = load_tokenizer(folder)
    full = load_causal_lm(folder, device="cpu", dtype="auto")
    for prompt in PROMPTS:
        a = QueryKeyer.for_store(store, prefix, tok, check=False).key(prompt)
        b = QueryKeyer.for_store(store, full, tok, check=False).key(prompt)
        assert (abs(a - b)).max() == 0.0


def test_generate_routes_loads_and_generates(setup) -> None:
    folder, store_path = setup["qwen3_moe"], setup[("qwen3_moe", "router_input")]
    store = PatternStore.load(store_path)
    tok = load_tokenizer(folder)
    full = load_causal_lm(folder, device="cpu", dtype="auto")
    keyer = QueryKeyer.for_store(store, full, tok, check=False)
    src = resolve_model(folder)
    for prompt in PROMPTS:
        result = generate(folder, store_path, prompt, keep=4, max_new_tokens=6, device="cpu")
        expected = route(store, keyer, prompt)  # the route engineer's path, on the full model
        assert (result.task, result.fallback) == (expected.task, expected.fallback)
        assert result.similarity == pytest.approx(expected.similarity, abs=1e-6)
        # the same experts as the policy picks for that task, and the same tokens as their load
        keep = select_experts(
            store.scores(result.task), src.moe_layers, num_experts=8, routed=2, keep=4
        ).keep
        model = load_pruned(src, keep)
        ids = torch.tensor([tok(prompt)["input_ids"]])
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        assert result.text == tok.decode(gen[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
        assert result.keep_count == 4 and result.new_tokens == 6
        assert result.resident_bytes == size_model(src, torch.float32).resident(4)
        assert result.resident_bytes < result.full_bytes
        data = result.to_json()
        assert data["pattern"]["task"] == result.task
        assert data["timing"]["tokens_per_second"] > 0
        assert data["model"]["family"] == "qwen3_moe"


def test_given_task_and_budget(setup) -> None:
    folder, store = setup["deepseek_v3"], setup[("deepseek_v3", "tcess")]
    sizes = size_model(resolve_model(folder), torch.float32)
    budget = sizes.resident(6) + sizes.per_k_bytes // 2  # fits 6; groups of 4 prefer 6 (3 + 3)
    result = generate(
        folder, store, "kqzb>", task="reverse", budget=budget, max_new_tokens=2, device="cpu"
    )
    assert result.task == "reverse" and not result.routed and result.keep_count == 6
    assert result.resident_bytes <= budget
    assert json.dumps(result.to_json())  # NaN similarity is written as null


def test_bad_input(setup) -> None:
    folder, store = setup["qwen3_moe"], setup[("qwen3_moe", "router_input")]
    with pytest.raises(UsageError, match="prompt is empty"):
        generate(folder, store, "   ")
    with pytest.raises(UsageError, match="task 'poetry' is not in the store"):
        generate(folder, store, "12+3=", task="poetry")
    with pytest.raises(StoreMismatchError, match="another model"):
        generate(setup["other"], store, "12+3=")
    sizes = size_model(resolve_model(folder), torch.float32)
    with pytest.raises(UsageError, match="experts routed per token"):
        generate(folder, store, "12+3=", budget=sizes.resident(1))
    with pytest.raises(UsageError, match="at most one of"):
        generate(folder, store, "12+3=", keep=4, budget="1GiB")
    with pytest.raises(UsageError, match="fewer than the 2 experts routed"):
        generate(folder, store, "12+3=", keep=1)


def test_cli(setup, capsys) -> None:
    folder, store = str(setup["qwen3_moe"]), str(setup[("qwen3_moe", "router_input")])
    args = [
        "generate",
        folder,
        "12+345=",
        "--store",
        store,
        "--keep",
        "4",
        "--device",
        "cpu",
        "--max-new-tokens",
        "3",
    ]
    code, out, err = run_cli([*args, "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["keep"] == 4 and data["timing"]["new_tokens"] == 3
    assert set(data["pattern"]) == {"task", "similarity", "fallback", "routed", "candidates"}
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "tokens/s" in out and "similarity" in out
    code, _, err = run_cli(["generate", folder, "", "--store", store], capsys)
    assert_one_line_error(code, err, "prompt is empty")
    code, _, err = run_cli(["generate", folder, "x", "--store", store, "--task", "nope"], capsys)
    assert_one_line_error(code, err, "not in the store")
