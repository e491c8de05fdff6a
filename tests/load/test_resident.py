"""`ResidentModel.swap_to`: swaps are invisible, in place, and move only the missing experts."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from premoe.errors import KeepSetError, UsageError
from premoe.load import HostExpertCache, ResidentModel, load_pruned
from premoe.prune import KeepSets
from premoe.source import resolve_model
from tests.load.helpers import (
    FAMILY_LAYOUTS,
    assert_same_weights,
    expert_disk_bytes,
    export_pruned,
    keep_from_lists,
    logits,
    random_keep,
)


def missing(old: KeepSets, new: KeepSets) -> list[tuple[int, int]]:
    return [(n, e) for n, ids in new.layers.items() for e in ids if e not in old.layers[n]]


@pytest.mark.parametrize(("family", "layout"), FAMILY_LAYOUTS)
def test_swaps_are_invisible(family, layout, tiny_checkpoint, tmp_path) -> None:
    src = resolve_model(tiny_checkpoint(family, layout))
    rng = random.Random(f"{family}-{layout}")
    keep = random_keep(src, rng, 4)
    resident = ResidentModel(src, keep, dtype=torch.float32)
    ptrs = {n: t.data_ptr() for n, t in resident.model.state_dict(keep_vars=True).items()}
    moved = permuted = 0
    for _ in range(6):
        new = random_keep(src, rng, 4)  # 4 of 8: random sets overlap
        lacking = missing(resident.keep, new)
        before = src.reader.bytes_read
        stats = resident.swap_to(new)
        # only the missing experts were read, and only from the checkpoint (no cache)
        assert stats.experts_moved == stats.per_source["disk"].experts == len(lacking)
        assert src.reader.bytes_read - before == sum(expert_disk_bytes(src, *p) for p in lacking)
        assert stats.bytes == len(lacking) * resident.expert_bytes
        moved += stats.experts_moved
        permuted += stats.device_moves
        # in place: every parameter and buffer kept its storage
        now = resident.model.state_dict(keep_vars=True)
        assert {n: t.data_ptr() for n, t in now.items()} == ptrs
        # invisible: equal to a fresh load of the current pattern
        fresh = load_pruned(src, new, dtype=torch.float32)
        assert_same_weights(resident.model, fresh)
        assert (logits(resident.model) - logits(fresh)).abs().max().item() <= 1e-6
        assert resident.keep == new
    assert moved > 0 and permuted > 0  # the sequence exercised loads and slot permutations
    exported = AutoModelForCausalLM.from_pretrained(
        export_pruned(src, resident.keep, tmp_path / "export"), dtype=torch.float32
    ).eval()
    assert_same_weights(resident.model, exported)
    assert (logits(resident.model) - logits(exported)).abs().max().item() <= 1e-6


def test_group_plan_follows_the_pattern(tiny_checkpoint) -> None:
    # deepseek_v3, 2 groups of 4: [0,1,4,5] keeps groups exact, [0,1,2,4] falls back to one group
    src = resolve_model(tiny_checkpoint("deepseek_v3"))
    exact, ragged = keep_from_lists(src, [[0, 1, 4, 5]]), keep_from_lists(src, [[0, 1, 2, 4]])
    resident = ResidentModel(src, exact, dtype=torch.float32)
    for keep in (ragged, exact):
        stats = resident.swap_to(keep)
        assert stats.group_plan_changed
        fresh = load_pruned(src, keep, dtype=torch.float32)
        assert resident.model.config.n_group == fresh.config.n_group
        assert torch.equal(logits(resident.model), logits(fresh))


def test_half_shared_patterns_move_only_the_other_half(tiny_checkpoint) -> None:
    src = resolve_model(tiny_checkpoint("qwen3_moe"))
    a, b = keep_from_lists(src, [[0, 1, 2, 3]]), keep_from_lists(src, [[2, 3, 4, 5]])
    resident = ResidentModel(src, a, dtype=torch.float32)
    layers = len(src.moe_layers)
    for target in (b, a, b):
        stats = resident.swap_to(target)
        assert stats.experts_moved == 2 * layers
        assert stats.bytes == 2 * layers * resident.expert_bytes
        assert stats.device_moves == 2 * layers  # shared experts change slot (sorted order)
    again = resident.swap_to(b)
    assert again.experts_moved == again.bytes == again.device_moves == again.router_bytes == 0


def test_host_cache_serves_swaps_without_reading_the_checkpoint(tiny_checkpoint) -> None:
    src = resolve_model(tiny_checkpoint("mixtral"))
    a, b = keep_from_lists(src, [[0, 1, 2, 3]]), keep_from_lists(src, [[1, 4, 6, 7]])
    cache = HostExpertCache("1MiB")
    resident = ResidentModel(src, a, dtype=torch.float32, host_cache=cache)
    assert resident.prefetch(b) == 4 * len(src.moe_layers) * resident.expert_bytes
    before = src.reader.bytes_read
    stats = resident.swap_to(b)
    assert src.reader.bytes_read == before
    assert stats.per_source["cache"].experts == stats.experts_moved == 3 * len(src.moe_layers)
    assert torch.equal(logits(resident.model), logits(load_pruned(src, b, dtype=torch.float32)))
    # misses are read from the checkpoint once, then served from the cache
    stats = resident.swap_to(a)
    assert stats.per_source["disk"].experts == 3 * len(src.moe_layers)
    before = src.reader.bytes_read
    stats = resident.swap_to(b)
    assert stats.per_source["cache"].experts == 3 * len(src.moe_layers)
    assert src.reader.bytes_read == before
    assert torch.equal(logits(resident.model), logits(load_pruned(src, b, dtype=torch.float32)))


def test_host_cache_is_lru_within_its_budget() -> None:
    cache = HostExpertCache(3 * 400, pin=False)
    entry = (torch.zeros(100),)  # 400 bytes
    for e in range(3):
        assert cache.put(0, e, entry)
    assert cache.get(0, 0) is not None  # 0 is now the most recent
    cache.put(0, 3, entry)
    assert cache.keys() == [(0, 2), (0, 0), (0, 3)]
    assert cache.nbytes == 1200 and cache.stats.evictions == 1
    assert not cache.put(0, 9, (torch.zeros(1000),))  # larger than the whole budget
    assert cache.get(0, 1) is None and cache.stats.misses == 1


def test_bad_input(tiny_checkpoint) -> None:
    src = resolve_model(tiny_checkpoint("qwen3_moe"))
    keep = keep_from_lists(src, [[0, 1, 2, 3]])
    resident = ResidentModel(src, keep, dtype=torch.float32)
    with pytest.raises(KeepSetError, match="resident model has 4 slots"):
        resident.swap_to(keep_from_lists(src, [[0, 1, 2]]))
    with pytest.raises(KeepSetError, match="cover exactly the MoE layers"):
        resident.swap_to(KeepSets.uniform(src.moe_layers[:1], [0, 1, 2, 3]))
    with pytest.raises(KeepSetError, match="out of range"):
        resident.swap_to(keep_from_lists(src, [[0, 1, 2, 9]]))
    assert resident.keep == keep  # a refused swap changes nothing
    with pytest.raises(UsageError, match="cannot hold one expert"):
        ResidentModel(src, keep, dtype=torch.float32, host_cache=HostExpertCache(64))
    with pytest.raises(KeepSetError, match="no host cache"):
        resident.prefetch(keep)


def test_wrap_adopts_a_loaded_model(tiny_checkpoint) -> None:
    src = resolve_model(tiny_checkpoint("gpt_oss"))
    a, b = keep_from_lists(src, [[0, 2, 4, 6]]), keep_from_lists(src, [[1, 2, 3, 6]])
    resident = ResidentModel.wrap(load_pruned(src, a, dtype=torch.float32), src, a)
    resident.swap_to(b)
    assert torch.equal(logits(resident.model), logits(load_pruned(src, b, dtype=torch.float32)))
    assert resident.resident_bytes == sum(p.numel() * 4 for p in resident.model.parameters())
