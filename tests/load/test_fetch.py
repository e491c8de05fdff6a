"""`FetchingModel` (the ``fetch`` miss policy): exact outputs with a quarter of experts resident.

The store is profiled on some demo tasks only; prompts come from tasks it has never seen, the
resident set is the pooled fallback pattern, and the model holds 2 of 8 experts per layer.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from premoe.demo.tasks import generate as task_rows
from premoe.generate import generate
from premoe.load import HostExpertCache
from premoe.load.decode import decode
from premoe.load.fetch import FetchingModel
from premoe.patterns import PatternStore
from premoe.patterns.store import GLOBAL
from premoe.policy import select_experts
from premoe.profile import profile
from premoe.prune import KeepSets
from premoe.source import load_tokenizer, resolve_model
from tests.helpers import save_with_tokenizer, suite, tiny_model

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3"]  # deepseek_v3: sigmoid, bias, groups
UNSEEN = ["count", "close"]  # the store below knows add, reverse and sort only


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fetch")
    corpora = {k: v["profile"] for k, v in suite(root / "suite", n=24).items()}
    out: dict = {}
    for family in FAMILIES:
        folder = save_with_tokenizer(tiny_model(family), root / family)
        store = profile(folder, corpora, out=root / f"store-{family}", device="cpu")
        out[family] = (folder, store)
    return out


def _pooled_quarter(store: PatternStore, src) -> KeepSets:
    quarter = src.num_experts // 4  # 2 of 8: the routed count
    return select_experts(
        store.pooled_scores(store.default_metric),
        src.moe_layers,
        num_experts=src.num_experts,
        routed=src.top_k,
        keep=quarter,
    ).keep


def _prompts() -> list[str]:
    return [r["prompt"] for t in UNSEEN for r in task_rows(t, 2, seed=3)]


@pytest.mark.parametrize("family", FAMILIES)
def test_fetch_greedy_equals_the_full_model_on_unseen_tasks(setup, family) -> None:
    folder, store = setup[family]
    src = resolve_model(folder)
    tok = load_tokenizer(folder)
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    keep = _pooled_quarter(store, src)
    assert keep.count == src.num_experts // 4
    cache = HostExpertCache("1MiB", pin=False)
    with FetchingModel(src, keep, host_cache=cache) as fm:
        assert fm.slots == 2
        for prompt in _prompts():
            ids = tok(prompt)["input_ids"]
            want = decode(full, ids, max_new_tokens=12)
            got = decode(fm.model, ids, max_new_tokens=12, after_prompt=fm.adapt)
            assert got.tokens == want.tokens, prompt
            with torch.no_grad():
                a = full(torch.tensor([ids])).logits
                b = fm.model(torch.tensor([ids])).logits
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        stats = fm.stats
        assert stats.experts > 0 and stats.passes > 0  # it did fetch, and ran multi-pass calls
        assert stats.per_source["cache"] > 0  # later fetches hit the host cache
        # the slots hold 2 experts per layer at all times, and the meter's view agrees
        assert all(len(v) == 2 == len(set(v)) for v in fm.resident.values())


def test_fetch_lru_keeps_the_pattern_and_evicts_fetched_experts_first(setup) -> None:
    folder, _ = setup["qwen3_moe"]
    src = resolve_model(folder)
    layers = src.moe_layers
    keep = KeepSets.uniform(layers, [0, 1, 2, 3])
    with FetchingModel(src, keep, pinned={n: [0, 1] for n in layers}) as fm:
        slots = fm._slots[layers[0]]
        slots.touch([0, 1, 2, 3])  # 0 is the least recently used, but pinned
        assert slots.expert[slots.victim(set())] == 2
        assert slots.expert[slots.victim({2, 3})] == 0  # only pinned ones left
        fm._fetch(slots, [7], {0, 1, 3})
        assert sorted(fm.resident[layers[0]]) == [0, 1, 3, 7]
        assert int(slots.table[7]) == slots.slot[7] and int(slots.table[2]) == slots.k
        # a pattern switch fetches the new pattern's missing experts at once and pins them
        moved = fm.swap_to(KeepSets.uniform(layers, [4, 5, 6, 7]))
        assert moved == 4 * len(layers) - 1  # layer 0 already held 7
        assert all(sorted(v) == [4, 5, 6, 7] for v in fm.resident.values())
        assert slots.pinned == {4, 5, 6, 7}


def test_generate_fetch_policy_reports_fetches_and_dropped_mass(setup) -> None:
    folder, store = setup["qwen3_moe"]
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = load_tokenizer(folder)
    prompt = _prompts()[0]
    res = generate(
        folder,
        store,
        prompt,
        keep=2,
        task=GLOBAL,
        miss_policy="fetch",
        max_new_tokens=8,
        device="cpu",
    )
    want = decode(full, tok(prompt)["input_ids"], max_new_tokens=8)
    assert res.text == tok.decode(want.tokens, skip_special_tokens=True)
    miss = res.to_json()["miss"]
    assert miss["policy"] == "fetch" and miss["fetch"]["experts"] > 0
    mass = miss["dropped_mass"]
    assert mass["prompt"]["tokens"] == len(tok(prompt)["input_ids"])
    assert 0.0 < mass["prompt"]["mean"] <= mass["prompt"]["max"] <= 1.0


def test_adapt_unpins_a_pattern_the_prompt_does_not_use(setup) -> None:
    folder, _ = setup["mixtral"]
    src = resolve_model(folder)
    tok = load_tokenizer(folder)
    ids = torch.tensor([tok(_prompts()[0])["input_ids"]])
    layers = src.moe_layers
    with FetchingModel(src, KeepSets.uniform(layers, [0, 1])) as fm:
        with torch.no_grad():
            fm.model(ids)  # a prompt: usage tracked
        assert all(s.usage is not None for s in fm._slots.values())
        used = {n: fm._slots[n].usage.clone() for n in layers}
        unpinned = fm.adapt(min_coverage=0.9)
        for n in layers:
            share = float(used[n][[0, 1]].sum() / used[n].sum())
            assert (fm._slots[n].pinned == set()) == (share < 0.9)
        assert unpinned == sum(float(used[n][[0, 1]].sum() / used[n].sum()) < 0.9 for n in layers)
        # a pattern that holds everything the prompt used stays pinned
        fm.set_pinned({n: range(src.num_experts) for n in layers})
        with torch.no_grad():
            fm.model(ids)
        assert fm.adapt() == 0 and all(len(s.pinned) == src.num_experts for s in fm._slots.values())
        assert fm.adapt() == 0  # nothing tracked since the last call
