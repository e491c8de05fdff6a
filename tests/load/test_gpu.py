"""CUDA paths of the loader and swaps: side-stream copies, pinned cache, stream ordering, memory.

Marked `gpu`: run with `pytest -m gpu tests/load` on a machine with CUDA.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from premoe.load import HostExpertCache, ResidentModel, load_pruned, load_pruned_with_info
from premoe.source import resolve_model
from tests.helpers import GPU
from tests.load.helpers import (
    IDS,
    assert_same_weights,
    export_pruned,
    keep_from_lists,
    random_keep,
)
from tests.tiny import build_tiny, save_tiny

pytestmark = GPU


def cuda_logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids.cuda(), use_cache=False).logits


@pytest.mark.parametrize(
    ("family", "layout"),
    [("qwen3_moe", "original"), ("gpt_oss", "original"), ("deepseek_v3", "original")],
)
def test_cuda_load_equals_from_pretrained(family, layout, tiny_checkpoint, tmp_path) -> None:
    src = resolve_model(tiny_checkpoint(family, layout))
    keep = keep_from_lists(src, [[0, 3, 5, 7]])
    for dtype in (torch.float32, torch.bfloat16):
        model = load_pruned(src, keep, device="cuda", dtype=dtype)
        ref = (
            AutoModelForCausalLM.from_pretrained(
                export_pruned(src, keep, tmp_path / f"export-{dtype}"), dtype=dtype
            )
            .to("cuda")
            .eval()
        )
        assert_same_weights(model, ref)  # buffers (rotary inv_freq) included
        diff = (cuda_logits(model).float() - cuda_logits(ref).float()).abs().max().item()
        assert diff <= 1e-6


@pytest.mark.parametrize("blocking", [True, False])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_cuda_swaps_are_invisible(family, blocking, tiny_checkpoint) -> None:
    src = resolve_model(tiny_checkpoint(family))
    rng = random.Random(family)
    cache = HostExpertCache("64KiB")  # a few experts: hits, misses and evictions
    resident = ResidentModel(src, random_keep(src, rng, 4), device="cuda", host_cache=cache)
    ptrs = {n: t.data_ptr() for n, t in resident.model.state_dict(keep_vars=True).items()}
    for step in range(8):
        keep = random_keep(src, rng, 4)
        if step % 3 == 2:
            resident.host_cache = None  # the checkpoint path through pinned staging
        lacking = sum(
            len(set(ids) - set(resident.keep.layers[n])) for n, ids in keep.layers.items()
        )
        stats = resident.swap_to(keep, blocking=blocking)
        resident.host_cache = cache
        assert stats.experts_moved == lacking
        # no host sync: the compute stream must wait for the side-stream copies by itself
        out = cuda_logits(resident.model)
        fresh = load_pruned(src, keep, device="cuda")
        assert (out - cuda_logits(fresh)).abs().max().item() <= 1e-5  # stale weights: >> 1e-3
        assert_same_weights(resident.model, fresh)
    now = {n: t.data_ptr() for n, t in resident.model.state_dict(keep_vars=True).items()}
    assert now == ptrs
    assert cache.stats.hits > 0 and cache.stats.evictions > 0


def test_cuda_peak_memory_is_the_kept_bytes(tmp_path) -> None:
    model = build_tiny(
        "qwen3_moe",
        hidden_size=512,
        intermediate_size=512,
        moe_intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=16,
        vocab_size=1024,
    )
    src = resolve_model(save_tiny(model, tmp_path / "m", "original"))
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    keep = keep_from_lists(src, [[1, 4, 9, 15]])
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loaded, info = load_pruned_with_info(src, keep, device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= 1.02 * (info.param_bytes + info.buffer_bytes)
    assert peak < 0.5 * full
    del loaded
