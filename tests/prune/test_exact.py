"""Invariant 1: a pruned model equals the full model whose routers may choose only kept experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from premoe.prune import KeepSets, iter_pruned_tensors, masked_routing, pruned_config
from premoe.source import resolve_model
from tests.tiny import LAYOUTS

KEEP_CASES = {
    # name: per-MoE-layer keep lists (cycled over layers); 8 experts, top-2
    "noncontiguous": [[1, 4, 6]],
    "per_layer": [[0, 3, 5, 7], [1, 2, 6, 7]],
    "group_exact": [[0, 2, 5, 7]],  # 2 per group of 4 for n_group=2
}


def write_pruned(folder: Path, keep_lists: list[list[int]], out: Path) -> tuple:
    src = resolve_model(folder)
    layers = src.moe_layers
    keep = KeepSets.from_mapping({n: keep_lists[i % len(keep_lists)] for i, n in enumerate(layers)})
    plan = keep.validate(src.arch, src.config)
    cfg = pruned_config(src.arch, src.config, keep, plan)
    out.mkdir()
    save_file(dict(iter_pruned_tensors(src.keymap, src.reader, keep)), out / "model.safetensors")
    cfg.save_pretrained(out)
    return src, keep, plan


@pytest.mark.parametrize("case", sorted(KEEP_CASES))
@pytest.mark.parametrize(("family", "layout"), LAYOUTS)
def test_pruned_equals_masked_full(family, layout, case, tiny_checkpoint, tmp_path) -> None:
    folder = tiny_checkpoint(family, layout)
    src, keep, plan = write_pruned(folder, KEEP_CASES[case], tmp_path / "pruned")
    if family == "deepseek_v3":
        assert plan.exact == (case != "noncontiguous")  # [1, 4, 6]: groups keep 1 and 2
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    assert src.arch.num_experts(pruned.config) == keep.count
    ids = torch.randint(
        3, full.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        unmasked = full(ids, use_cache=False).logits
        with masked_routing(full, src.arch, keep, single_group=not plan.exact):
            reference = full(ids, use_cache=False).logits
        after = full(ids, use_cache=False).logits
        out = pruned(ids, use_cache=False).logits
    assert torch.equal(unmasked, after), "masked_routing must restore the model"
    assert (out - reference).abs().max().item() <= 1e-5
    # the mask matters: without it the full model routes elsewhere (so this test can fail)
    assert (unmasked - reference).abs().max().item() > 1e-4
