"""Pattern store: round trip, search modes, merging, and validation of damaged stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from premoe.errors import StoreError, StoreMismatchError, UsageError
from premoe.patterns import GLOBAL, PatternStore
from premoe.profile import profile
from tests.helpers import needs_cuda, tiny_model, tokenizer

METRICS = ["tcess", "frequency", "paper-logits", "reap"]


@pytest.fixture(scope="module")
def store(demo_suite) -> PatternStore:
    model = tiny_model("qwen3_moe")
    tasks = {t: p["profile"] for t, p in demo_suite.items()}
    return profile(model, tasks, tokenizer=tokenizer(), metrics=METRICS, batch_size=16)


def _queries(store: PatternStore) -> list[np.ndarray]:
    return [store.keys(t)[i] for t in store.task_names for i in (0, 5)]


def _same(a: PatternStore, b: PatternStore) -> None:
    assert a.task_names == b.task_names and a.metrics == b.metrics and a.key == b.key
    assert a.model == b.model and a.moe_layers == b.moe_layers
    for t in a.task_names:
        assert a.tasks[t] == b.tasks[t]
        for m in a.metrics:
            assert torch.equal(a.scores(t, m), b.scores(t, m))
        for row, v in a.sums(t).items():
            assert torch.equal(v, b.sums(t)[row])
        for kind in ("router_input", "tcess"):
            assert np.array_equal(a.keys(t, kind), b.keys(t, kind))
    for q in _queries(a):
        assert a.search(q, k=3) == b.search(q, k=3)


@pytest.mark.parametrize(
    "variant",
    [{}, {"search": "centroid"}, {"kind": "tcess"}, {"index": "hnsw"}, {"center": True}],
    ids=["knn", "centroid", "tcess-key", "hnsw", "centered"],
)
def test_round_trip(store: PatternStore, variant: dict, tmp_path: Path) -> None:
    st = store.with_key(**variant)
    st.save(tmp_path / "s")
    back = PatternStore.load(tmp_path / "s")
    _same(st, back)
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    assert meta["key"]["search"] == st.key["search"] and meta["key"]["kind"] == st.key["kind"]
    assert meta["model"] == st.model and meta["premoe_version"]
    assert not list(tmp_path.glob(".*premoe-tmp*"))  # nothing left over


def test_search_and_scores(store: PatternStore) -> None:
    for t in store.task_names:
        best, sim = store.search(store.keys(t)[0], k=5)[0]
        assert best == t and 0.0 < sim <= 1.0 + 1e-6
    cent = store.with_key(search="centroid")
    res = cent.search(store.keys("add")[1], k=5)
    assert [t for t, _ in res][0] == "add" and len(res) == len(store.task_names)
    assert all(res[i][1] >= res[i + 1][1] for i in range(len(res) - 1))
    tokens = {t: store.tokens(t) for t in store.task_names}
    pooled = sum(store.scores(t).double() * tokens[t] for t in tokens) / sum(tokens.values())
    assert torch.allclose(store.pooled_scores().double(), pooled, atol=1e-6)
    assert torch.equal(store.scores(GLOBAL), store.pooled_scores())
    assert store.scores("add").shape == (len(store.moe_layers), store.num_experts)
    with pytest.raises(StoreError, match="tasks in this store: add, reverse, sort"):
        store.scores("nope")
    with pytest.raises(StoreError, match="metrics: tcess, frequency, paper-logits, reap"):
        store.scores("add", "bogus")
    with pytest.raises(UsageError, match="dimension"):
        store.search(np.ones(3, dtype=np.float32))


VARIANTS = [{}, {"search": "centroid"}, {"kind": "tcess"}, {"index": "hnsw"}, {"center": True}]


def _rounded(found: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return [(t, round(s, 4)) for t, s in found]


@pytest.mark.parametrize("variant", VARIANTS, ids=["knn", "centroid", "tcess", "hnsw", "centered"])
def test_exact_tensor_search_matches_faiss(store: PatternStore, variant: dict) -> None:
    """The exact search that runs on an accelerator (here run on the CPU: same code) finds the
    neighbours FAISS finds, with the same similarities."""
    st = store.with_key(**variant)
    n = min(int(st.key["k"]), st._index.ntotal)
    for q in _queries(st):
        sims, idx = st._search_on_device(torch.from_numpy(q).view(1, -1) * 3.0, n)
        fsims, fidx = st._search_one(st._prepare(q.reshape(1, -1), st._mu), n)
        assert set(idx[0].tolist()) == set(fidx[0].tolist())
        np.testing.assert_allclose(np.sort(sims[0]), np.sort(fsims[0]), atol=1e-5)
    # a CPU tensor key takes the FAISS path, with the numpy key's answer
    q = _queries(st)[0]
    assert st.search(torch.from_numpy(q), k=3) == st.search(q, k=3)


@pytest.mark.parametrize("variant", VARIANTS, ids=["knn", "centroid", "tcess", "hnsw", "centered"])
@pytest.mark.gpu
@needs_cuda
def test_cuda_key_is_searched_on_the_device(store: PatternStore, variant: dict) -> None:
    st = store.with_key(**variant)
    for q in _queries(st):
        assert _rounded(st.search(torch.from_numpy(q).cuda(), k=3)) == _rounded(st.search(q, k=3))
    assert st._on_device is not None and st._on_device[0].is_cuda
    with pytest.raises(UsageError, match="non-finite"):
        st.search(torch.full((st._index.d,), float("nan"), device="cuda"))


def test_tasks_differ(store: PatternStore, demo_suite, tmp_path: Path) -> None:
    """Clearly different corpora give clearly different patterns: the distance between two
    tasks is far above the distance between two halves of one task."""
    from premoe.demo.tasks import read_jsonl, write_jsonl

    rows = read_jsonl(demo_suite["add"]["profile"])
    half = len(rows) // 2
    halves = profile(
        tiny_model("qwen3_moe"),
        {
            "a1": write_jsonl(rows[:half], tmp_path / "a1.jsonl"),
            "a2": write_jsonl(rows[half:], tmp_path / "a2.jsonl"),
        },
        tokenizer=tokenizer(),
    )
    within = (halves.scores("a1") - halves.scores("a2")).abs().sum().item()
    names = store.task_names
    between = [
        (store.scores(a) - store.scores(b)).abs().sum().item()
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]
    assert min(between) > 2 * within, (between, within)


def test_add_replace_and_model_check(store: PatternStore, tmp_path: Path) -> None:
    st = store.with_key()
    sums, info = st.sums("add"), st.tasks["add"]
    st.add_task("add2", info, sums, {k: st.keys("add", k) for k in ("router_input", "tcess")})
    assert st.task_names[-1] == "add2" and torch.equal(st.scores("add2"), st.scores("add"))
    st.remove_task("add2")
    assert "add2" not in st.task_names
    st.check_model(dict(store.model))
    other = dict(store.model, router_hash="0" * 32)
    with pytest.raises(StoreMismatchError, match="router_hash"):
        st.check_model(other)


def _damage(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    if how == "truncated-index":
        data = (dst / "index.faiss").read_bytes()
        (dst / "index.faiss").write_bytes(data[: len(data) // 2])
    elif how == "truncated-meta":
        data = (dst / "store.json").read_text()
        (dst / "store.json").write_text(data[: len(data) // 2])
    elif how == "truncated-scores":
        data = (dst / "scores.safetensors").read_bytes()
        (dst / "scores.safetensors").write_bytes(data[: len(data) - 100])
    elif how == "future-format":
        meta = json.loads((dst / "store.json").read_text())
        meta["format_version"] = 99
        (dst / "store.json").write_text(json.dumps(meta))
    elif how == "wrong-shape":
        meta = json.loads((dst / "store.json").read_text())
        meta["model"]["num_experts"] = meta["num_experts"] = 16
        (dst / "store.json").write_text(json.dumps(meta))
    elif how == "index-size":
        meta = json.loads((dst / "store.json").read_text())
        meta["tasks"]["add"]["samples"] -= 1  # keys no longer match either
        (dst / "store.json").write_text(json.dumps(meta))
    elif how == "other-index":
        import faiss

        index = faiss.read_index(str(dst / "index.faiss"))
        smaller = faiss.IndexFlatIP(index.d)
        smaller.add(index.reconstruct_n(0, index.ntotal - 1))
        faiss.write_index(smaller, str(dst / "index.faiss"))
    elif how == "missing-index":
        (dst / "index.faiss").unlink()
    return dst


@pytest.mark.parametrize(
    ("how", "needle"),
    [
        ("truncated-index", "index.faiss is damaged"),
        ("truncated-meta", "store.json is damaged"),
        ("truncated-scores", "scores.safetensors is damaged"),
        ("future-format", "format version 99"),
        ("wrong-shape", "expected (2, 16)"),
        ("index-size", "keys of task 'add'"),
        ("other-index", "index.faiss holds"),
        ("missing-index", "lacks index.faiss"),
    ],
)
def test_damaged_store_is_refused(store, tmp_path: Path, how: str, needle: str) -> None:
    store.save(tmp_path / "good")
    bad = _damage(tmp_path / "good", tmp_path / "bad", how)
    with pytest.raises(StoreError) as info:
        PatternStore.load(bad)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_load_missing_and_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no pattern store"):
        PatternStore.load(tmp_path / "nothing")
    (tmp_path / "folder").mkdir()
    with pytest.raises(StoreError, match="not a pattern store"):
        PatternStore.load(tmp_path / "folder")


def test_save_refuses_to_overwrite_without_asking(store, tmp_path: Path) -> None:
    from premoe.errors import OutputExistsError

    store.save(tmp_path / "s")
    with pytest.raises(OutputExistsError):
        store.save(tmp_path / "s")
    store.save(tmp_path / "s", overwrite=True)
