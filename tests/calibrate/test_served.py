"""Calibrated routers where patterns run: a resident model's swaps write each pattern's own
routers (and the source's back), stores hand them to load/serve per pattern, mixed batches route
every row with its pattern's routers, and a store whose routers no longer fit is a clear error."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from premoe.calibrate import RecalibrateOptions, recalibrate, router_overrides
from premoe.calibrate.routers import (
    CalibratedRouters,
    router_roles,
    router_tensor,
    save_to_store,
)
from premoe.calibrate.served import SOURCE, pattern_routers, verified
from premoe.errors import KeepSetError, StoreError
from premoe.export import export_pruned
from premoe.load import ResidentModel, load_pruned
from premoe.patterns.store import PatternStore
from premoe.prune import KeepSets
from premoe.serve.rowmask import RowRouting, union_keep
from premoe.source import ModelSource, resolve_model
from tests.helpers import greedy_text, random_texts, tokenizer

FAST = RecalibrateOptions(steps=4, lr=5e-2, batch_size=8, max_tokens=400)


def _corpus(n: int = 16, seed: int = 3) -> list[list[int]]:
    tok = tokenizer()
    return [tok(t)["input_ids"] for t in random_texts(n, seed)]


def _keep(src: ModelSource, ids: list[int]) -> KeepSets:
    return KeepSets.from_mapping({layer: ids for layer in src.moe_layers})


def _ids() -> torch.Tensor:
    return torch.tensor([_corpus(2, 11)[0]])


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_routers(model: Any, src: ModelSource, want: dict[int, dict[str, torch.Tensor]]) -> None:
    """Bit for bit: every router tensor of `model` equals `want` (slot order)."""
    for layer in src.moe_layers:
        for role in router_roles(src.arch):
            got = router_tensor(model, src.arch, layer, role).detach()
            assert torch.equal(got, want[layer][role].reshape(got.shape).to(got.dtype)), (
                layer,
                role,
            )


def _source_rows(src: ModelSource, keep: KeepSets) -> dict[int, dict[str, torch.Tensor]]:
    """The router tensors `load_pruned(src, keep)` holds (the source's rows of the kept)."""
    plain = load_pruned(src, keep, dtype=torch.float32)
    return {
        layer: {
            role: router_tensor(plain, src.arch, layer, role).detach().clone()
            for role in router_roles(src.arch)
        }
        for layer in src.moe_layers
    }


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_swaps_write_each_patterns_routers(tiny_dir, tmp_path: Path, family: str) -> None:
    from transformers import AutoModelForCausalLM

    src = resolve_model(tiny_dir(family))
    a, b = _keep(src, [0, 2, 3, 5]), _keep(src, [1, 2, 4, 7])
    ra = recalibrate(src, a, _corpus(), options=FAST)
    rb = recalibrate(src, b, _corpus(seed=5), options=FAST)
    exports = {}
    for name, keep, r in (("a", a, ra), ("b", b, rb)):
        export_pruned(src, keep, tmp_path / name, router_overrides=router_overrides(src, r))
        exports[name] = AutoModelForCausalLM.from_pretrained(
            tmp_path / name, dtype=torch.float32
        ).eval()
    ids = _ids()
    resident = ResidentModel(src, a, dtype=torch.float32, routers=ra.tensors)
    ptrs = {n: t.data_ptr() for n, t in resident.model.state_dict(keep_vars=True).items()}

    def check(name: str, routers: CalibratedRouters) -> None:
        _assert_routers(resident.model, src, routers.tensors)
        d = (_logits(resident.model, ids) - _logits(exports[name], ids)).abs().max()
        assert float(d) <= 1e-5, (name, float(d))

    check("a", ra)
    stats = resident.swap_to(b, routers=rb.tensors)
    assert stats.router_bytes > 0
    check("b", rb)
    resident.swap_to(a, routers=ra.tensors)
    check("a", ra)
    # a pattern without its own routers gets the source's rows back, in every layer
    resident.swap_to(b)
    _assert_routers(resident.model, src, _source_rows(src, b))
    fresh = load_pruned(src, b, dtype=torch.float32)
    assert torch.equal(_logits(resident.model, ids), _logits(fresh, ids))
    # the same keep set: only the routers change (calibrated, then the source's again)
    resident.swap_to(b, routers=rb.tensors)
    check("b", rb)
    resident.swap_to(b)
    assert torch.equal(_logits(resident.model, ids), _logits(fresh, ids))
    # in place all along (compiled graphs stay valid)
    now = resident.model.state_dict(keep_vars=True)
    assert {n: t.data_ptr() for n, t in now.items()} == ptrs
    # routers of another keep set are refused before anything moves
    with pytest.raises(KeepSetError):
        resident.swap_to(a, routers=_keep_routers(src, ra, 3))
    assert resident.keep == b
    resident.close()
    src.close()


def _keep_routers(src: ModelSource, r: CalibratedRouters, n: int) -> dict[int, Any]:
    return {layer: {k: v[:n] for k, v in by.items()} for layer, by in r.tensors.items()}


def test_load_pruned_takes_routers(tiny_dir) -> None:
    src = resolve_model(tiny_dir("qwen3_moe"))
    a = _keep(src, [0, 2, 3, 5])
    ra = recalibrate(src, a, _corpus(), options=FAST)
    net = load_pruned(src, a, dtype=torch.float32, routers=ra.tensors)
    _assert_routers(net, src, ra.tensors)
    with pytest.raises(KeepSetError, match="keeps 4 experts"):
        load_pruned(src, a, routers=_keep_routers(src, ra, 3))
    src.close()


def _store_with(calib_store, folder: Path, routers: list[CalibratedRouters]) -> PatternStore:
    store_dir, _ = calib_store(folder)
    store = PatternStore.load(store_dir)
    for r in routers:
        save_to_store(store, "alpha", r)
    return store


def test_store_routers_per_pattern(tiny_dir, calib_store) -> None:
    folder = tiny_dir("qwen3_moe")
    src = resolve_model(folder)
    a = _keep(src, [0, 2, 3, 5])
    ra = recalibrate(src, a, _corpus(), options=FAST)
    store = _store_with(calib_store, folder, [ra])
    by_scores = {"alpha": _keep(src, [1, 2, 3, 4]), "__global__": _keep(src, [0, 1, 2, 3])}
    patterns, chosen = pattern_routers(store, by_scores, src)
    # the task runs with its calibrated keep set and routers; the pooled pattern as before
    assert patterns["alpha"] == a and patterns["__global__"] == by_scores["__global__"]
    first = src.moe_layers[0]
    assert torch.equal(chosen.tensors("alpha")[first]["weight"], ra.tensors[first]["weight"])
    assert chosen.label("alpha").startswith("alpha@") and chosen.label("__global__") == SOURCE
    # off: nothing changes
    same, none = pattern_routers(store, by_scores, src, enabled=False)
    assert same == by_scores and none.routers == {} and none.label("alpha") == SOURCE
    # another kept count: the calibrated routers do not apply
    five = {"alpha": _keep(src, [0, 1, 2, 3, 4])}
    assert pattern_routers(store, five, src)[1].routers == {}
    src.close()


def test_stale_store_routers_are_a_one_line_error(tiny_dir, calib_store) -> None:
    folder = tiny_dir("qwen3_moe")
    src = resolve_model(folder)
    ra = recalibrate(src, _keep(src, [0, 2, 3, 5]), _corpus(), options=FAST)
    store = _store_with(calib_store, folder, [ra])
    (name,) = store.calibrated
    meta, tensors = store.routers(name)
    meta["keep"] = _keep(src, [0, 2, 3, 6]).to_json()  # the keep set changed under the name
    store.set_routers(name, meta, tensors)
    with pytest.raises(StoreError) as err:
        pattern_routers(store, {"alpha": _keep(src, [0, 1, 2, 3])}, src)
    msg = str(err.value)
    assert "no longer match" in msg and "\n" not in msg
    # tensors cut to another count under a matching digest: also refused in one line
    meta["keep"] = ra.keep.to_json()
    store.set_routers(name, meta, {k: v[:3] for k, v in tensors.items()})
    with pytest.raises(StoreError) as err:
        verified(store, name, src.arch)
    assert "do not fit" in str(err.value) and "\n" not in str(err.value)
    src.close()


def test_mixed_rows_use_their_patterns_routers(tiny_dir) -> None:
    src = resolve_model(tiny_dir("qwen3_moe"))
    patterns = {
        "a": _keep(src, [0, 2, 3, 5]),
        "b": _keep(src, [1, 2, 4, 7]),
        "c": _keep(src, [0, 1, 6, 7]),
    }
    routers = {
        "a": recalibrate(src, patterns["a"], _corpus(), options=FAST).tensors,
        "b": None,  # the source's routers
        "c": recalibrate(src, patterns["c"], _corpus(seed=5), options=FAST).tensors,
    }
    union = union_keep(patterns, src.num_experts)
    model = ResidentModel(src, union, dtype=torch.float32).model.eval()
    routing = RowRouting(model, src.arch, union, patterns, routers)
    assert routing.verify(model) is None
    ids = _ids().repeat(4, 1)  # [B, S]: the same prompt, one row per pattern (and one idle)
    names = ["c", "a", "b", "a"]
    with torch.no_grad(), routing.applied(routing.rows(names), ids.shape[1]):
        mixed = model(input_ids=ids).logits  # [B, S, V]
    for row, name in enumerate(names):
        alone = load_pruned(src, patterns[name], dtype=torch.float32, routers=routers[name])
        d = (mixed[row] - _logits(alone, ids[:1])[0]).abs().max()
        assert float(d) <= 1e-5, (name, float(d))
    src.close()


async def _collect(req: Any) -> tuple[str, Any]:
    text = ""
    while True:
        kind, value = await asyncio.wait_for(req.next_event(), 60)
        if kind == "delta":
            text += value
        elif kind in ("finish", "error"):
            return text, value


@pytest.mark.parametrize("mixed", ["off", "auto"])
def test_engine_serves_each_pattern_with_its_routers(tiny_dir, calib_store, mixed: str) -> None:
    from premoe.serve import Engine, EngineConfig, SamplingParams

    folder = tiny_dir("qwen3_moe")
    src = resolve_model(folder)
    a = _keep(src, [0, 2, 3, 5])
    ra = recalibrate(src, a, _corpus(), options=FAST)
    store_dir, _ = calib_store(folder)
    store = PatternStore.load(store_dir)
    name = save_to_store(store, "alpha", ra)
    store.save(store_dir, overwrite=True)
    cfg = EngineConfig(
        model=str(folder),
        store=str(store_dir),
        keep=4,
        device="cpu",
        dtype="fp32",
        mixed=mixed,
        max_batch=2,
        max_wait_ms=5,
    )
    engine = Engine(cfg)
    engine.start()
    try:
        health = engine.health()
        assert health["routers"] == {"alpha": name, "__global__": SOURCE}
        assert health["patterns_mode"] == ("swap" if mixed == "off" else "mixed")
        assert engine.patterns["alpha"] == a
        tok = engine.tokenizer
        ids = _corpus(1, 21)[0][:12]

        async def run(task: str) -> str:
            req = engine.submit(ids, "x", SamplingParams(max_tokens=5), task=task)
            text, reason = await _collect(req)
            assert reason in ("stop", "length"), reason
            return text

        refs = {
            "alpha": load_pruned(src, a, dtype=torch.float32, routers=ra.tensors),
            "__global__": load_pruned(src, engine.patterns["__global__"], dtype=torch.float32),
        }
        for task in ("alpha", "__global__", "alpha"):
            text = asyncio.run(run(task))
            assert text == greedy_text(refs[task], tok, ids, 5), task
            if mixed == "off":  # the resident model holds the pattern's own routers
                want = ra.tensors if task == "alpha" else _source_rows(src, engine.patterns[task])
                _assert_routers(engine.resident.model, src, want)
    finally:
        engine.stop()
        src.close()


def test_cli_generate_names_routers_and_stale_store_fails(tiny_dir, calib_store, capsys) -> None:
    from tests.helpers import assert_one_line_error, load_json, run_cli

    folder = tiny_dir("qwen3_moe")
    src = resolve_model(folder)
    ra = recalibrate(src, _keep(src, [0, 2, 3, 5]), _corpus(), options=FAST)
    store_dir, _ = calib_store(folder)
    store = PatternStore.load(store_dir)
    name = save_to_store(store, "alpha", ra)
    store.save(store_dir, overwrite=True)
    args = ["generate", str(folder), "-s", str(store_dir), "abc", "--task", "alpha"]
    args += ["--keep", "4", "--max-new-tokens", "3", "--device", "cpu", "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert load_json(out)["routers"] == name
    code, out, err = run_cli([*args, "--no-calibrated-routers"], capsys)
    assert code == 0, err
    assert load_json(out)["routers"] == SOURCE
    meta, tensors = store.routers(name)
    meta["keep"] = _keep(src, [0, 2, 3, 6]).to_json()
    store.set_routers(name, meta, tensors)
    store.save(store_dir, overwrite=True)
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "no longer match", "--no-calibrated-routers")
    src.close()


def test_find_in_store_refuses_a_stale_entry(tiny_dir, calib_store) -> None:
    from premoe.calibrate.routers import find_in_store

    folder = tiny_dir("qwen3_moe")
    src = resolve_model(folder)
    a = _keep(src, [0, 2, 3, 5])
    ra = recalibrate(src, a, _corpus(), options=FAST)
    store = _store_with(calib_store, folder, [ra])
    assert find_in_store(store, "alpha", a) is not None
    (name,) = store.calibrated
    meta, tensors = store.routers(name)
    meta["keep"] = _keep(src, [0, 2, 3, 6]).to_json()
    store.set_routers(name, meta, tensors)
    with pytest.raises(StoreError, match="no longer match"):
        find_in_store(store, "alpha", a)
    src.close()
