"""Device memory of the server (issue #17): mixed mode only when the union of the patterns, the
activation headroom and --min-kv-slots KV slots fit the memory allowed (--budget, or what the
device offers with --keep alone); the KV slots get what the weights leave; /health and /metrics
say which mode, how many bytes are resident and how big the KV cache is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from premoe.errors import UsageError
from premoe.serve import Engine, EngineConfig, kvcache, memory, rowmask
from premoe.serve.patterns import build_patterns
from premoe.source import resolve_model

ROOT = Path(__file__).resolve().parents[2]
MODEL, STORE = ROOT / "premoe/demo/model", ROOT / "patterns/demo"
MAX_BATCH = 16


def plan(nbytes: int | None, *, per_slot: int = 100, headroom: int = 1000) -> memory.MemoryPlan:
    source = "--budget" if nbytes is not None else "unknown (not checked)"
    return memory.MemoryPlan(memory.Allowed(nbytes, source), per_slot, headroom, min_slots=4)


def test_mixed_only_when_union_headroom_and_min_slots_fit() -> None:
    union = 10_000
    need = union + 1000 + 4 * 100
    assert plan(need).choose_mode(union, forced=False)[0]
    mixed, why = plan(need - 1).choose_mode(union, forced=False)
    assert not mixed and "exceeds" in why and "4 KV slots" in why
    with pytest.raises(UsageError, match="--mixed on is not possible"):
        plan(need - 1).choose_mode(union, forced=True)
    assert plan(None).choose_mode(10**15, forced=False)[0]  # nothing known: not checked


def test_budget_keeps_room_for_kv_and_activations() -> None:
    p = plan(50_000)
    assert p.reserve == 1000 + 4 * 100
    assert p.weights_budget() == 50_000 - p.reserve
    assert plan(None).weights_budget() is None
    with pytest.raises(UsageError, match="does not even hold"):
        plan(1200).weights_budget()


def test_kv_slots_are_what_the_weights_leave() -> None:
    slots = memory.kv_slots(
        allowed=10_000, resident=6000, headroom=1000, per_slot=100, max_batch=64
    )
    assert slots == 30
    assert memory.kv_slots(allowed=10_000, resident=0, headroom=0, per_slot=100, max_batch=8) == 8
    assert memory.kv_slots(allowed=None, resident=10**12, headroom=0, per_slot=1, max_batch=8) == 8
    with pytest.raises(UsageError, match="no memory left for the KV cache"):
        memory.kv_slots(allowed=10_000, resident=9000, headroom=950, per_slot=100, max_batch=8)


def test_plan_uses_the_kv_cache_size_per_slot() -> None:
    src = resolve_model(str(MODEL))
    p = memory.make_plan(
        src.config,
        budget="1GiB",
        device=torch.device("cpu"),
        dtype=torch.float32,
        fraction=0.9,
        max_batch=2,
        min_kv_slots=4,
        prefill_tokens=512,
        max_len=64,
    )
    assert p.per_slot == kvcache.bytes_per_slot(src.config, 64, torch.float32)
    assert p.min_slots == 2  # never more than --max-batch
    assert p.allowed == memory.Allowed(2**30, "--budget") and p.headroom > 0
    src.close()


def load(**kw: object) -> Engine:
    cfg = EngineConfig(
        model=str(MODEL),
        device="cpu",
        dtype="fp32",
        max_batch=MAX_BATCH,
        **kw,  # type: ignore[arg-type]
    )
    engine = Engine(cfg)
    engine.load()
    return engine


def check_reported(engine: Engine) -> None:
    """/health and /metrics carry the mode, the resident bytes and the KV cache."""
    h = engine.health()
    assert h["resident_bytes"] == engine.resident.resident_bytes  # type: ignore[union-attr]
    assert h["patterns_mode"] == ("mixed" if engine.mixed else "swap")
    assert h["patterns_mode_reason"]
    assert engine.cont is not None and h["kv_slots"] == engine.cont.slots
    assert h["kv_bytes"] == engine.cont.slots * h["memory"]["kv_bytes_per_slot"]
    assert engine.cont.cache.nbytes == h["kv_bytes"]
    text = engine.metrics.render()
    assert f"premoe_patterns_mixed {int(engine.mixed)}" in text
    assert f"premoe_kv_cache_bytes {h['kv_bytes']}" in text
    assert f"premoe_resident_bytes {h['resident_bytes']}" in text


def test_keep_alone_mixes_when_the_device_has_room() -> None:
    engine = load(store=str(STORE), keep=16)
    assert engine.mixed and engine.info["resident_experts_per_layer"] > 16
    assert engine.info["memory"]["allowed_by"].startswith("available host memory")
    assert engine.cont is not None and engine.cont.slots == MAX_BATCH
    check_reported(engine)


def test_budget_decides_mixed_or_swap_at_its_boundary() -> None:
    src = resolve_model(str(MODEL))
    _, patterns, _ = build_patterns(STORE, src, keep=16, budget=None, dtype=torch.float32)
    union = rowmask.union_keep(patterns, src.num_experts).count
    union_bytes = memory.weights_bytes(src, torch.float32, union)
    single_bytes = memory.weights_bytes(src, torch.float32, 16)
    src.close()
    probe = load(patterns=patterns, budget=str(10 * 2**30))
    assert probe.memory is not None
    reserve = probe.memory.reserve
    per_slot, headroom = probe.memory.per_slot, probe.memory.headroom

    fits = load(patterns=patterns, budget=str(union_bytes + reserve))
    assert fits.mixed and fits.info["resident_experts_per_layer"] == union
    assert fits.resident is not None and fits.resident.resident_bytes == union_bytes
    assert fits.cont is not None and fits.cont.slots == 4  # exactly --min-kv-slots fit
    check_reported(fits)

    budget = union_bytes + reserve - 1
    swaps = load(patterns=patterns, budget=str(budget))
    assert not swaps.mixed and "exceeds" in swaps.info["patterns_mode_reason"]
    assert swaps.resident is not None and swaps.resident.resident_bytes == single_bytes
    left = (budget - single_bytes - headroom) // per_slot
    assert swaps.cont is not None and swaps.cont.slots == min(MAX_BATCH, left)
    check_reported(swaps)

    with pytest.raises(UsageError, match="--mixed on is not possible"):
        load(patterns=patterns, budget=str(budget), mixed="on")


def test_budget_with_a_store_leaves_room_for_the_kv_cache() -> None:
    budget = 10 * 2**20
    engine = load(store=str(STORE), budget=str(budget))
    assert engine.memory is not None and engine.resident is not None and engine.cont is not None
    used = engine.resident.resident_bytes + engine.memory.headroom + engine.info["kv_bytes"]
    assert used <= budget
    assert engine.cont.slots >= engine.memory.min_slots
    check_reported(engine)
