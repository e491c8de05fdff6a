"""Non-uniform keep sets in process: each MoE layer holds its own count, the model equals the
full model routed only to the kept experts, and a resident model swaps between keep sets of the
same per-layer counts (exports stay uniform)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from premoe.errors import KeepSetError
from premoe.export import export_pruned
from premoe.load import ResidentModel, load_pruned, load_pruned_with_info
from premoe.load.loader import moe_layer, tensor_of
from premoe.prune import masked_routing
from premoe.source import resolve_model
from tests.load.helpers import assert_same_weights, keep_from_lists, logits

# 4 and 6 kept, cycled over the MoE layers; 2 and 3 per group of 4: deepseek_v3 groups stay exact
RAGGED = [[0, 3, 5, 7], [0, 1, 2, 4, 5, 6]]
OTHER = [[1, 2, 4, 6], [1, 2, 3, 5, 6, 7]]  # the same counts, other experts


def _counts(model, src) -> dict[int, int]:
    arch = src.arch
    return {
        n: tensor_of(moe_layer(model, arch, n), arch.router_weight.memory).shape[0]
        for n in src.moe_layers
    }


@pytest.mark.parametrize(
    ("family", "layout"),
    [
        ("qwen3_moe", "original"),
        ("mixtral", "fused"),
        ("deepseek_v3", "original"),
        ("gpt_oss", "original"),
        ("granitemoe", "original"),
    ],
)
def test_ragged_load_equals_masked_full(family, layout, tiny_checkpoint) -> None:
    folder = tiny_checkpoint(family, layout)
    src = resolve_model(folder)
    keep = keep_from_lists(src, RAGGED)
    assert not keep.is_uniform
    model, info = load_pruned_with_info(src, keep, dtype=torch.float32)
    assert _counts(model, src) == {n: len(v) for n, v in keep.layers.items()}
    for n in src.moe_layers:  # every expert-indexed parameter sized to the layer's count
        for t in src.arch.experts:
            assert tensor_of(moe_layer(model, src.arch, n), t.memory).shape[0] == len(
                keep.layers[n]
            )
    out = logits(model)
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with masked_routing(full, src.arch, keep, single_group=not info.plan.exact):
        reference = logits(full)
    assert (out - reference).abs().max().item() <= 1e-5
    assert (logits(full) - reference).abs().max().item() > 1e-4  # the mask matters
    ids = torch.tensor([[5, 9, 17, 33]])
    model.generate(ids, max_new_tokens=3, do_sample=False)  # an ordinary transformers model
    src.close()


def test_ragged_resident_swaps_and_exports_stay_uniform(tiny_checkpoint, tmp_path) -> None:
    src = resolve_model(tiny_checkpoint("qwen3_moe"))
    keep, other = keep_from_lists(src, RAGGED), keep_from_lists(src, OTHER)
    resident = ResidentModel(src, keep, dtype=torch.float32)
    ptrs = {n: t.data_ptr() for n, t in resident.model.state_dict(keep_vars=True).items()}
    for target in (other, keep, other):
        stats = resident.swap_to(target)
        assert stats.experts_moved > 0
        fresh = load_pruned(src, target, dtype=torch.float32)
        assert_same_weights(resident.model, fresh)
        assert (logits(resident.model) - logits(fresh)).abs().max().item() <= 1e-6
    now = resident.model.state_dict(keep_vars=True)
    assert {n: t.data_ptr() for n, t in now.items()} == ptrs
    # other per-layer counts need a new model; the uniform export refuses ragged keep sets
    with pytest.raises(KeepSetError, match="load a new model"):
        resident.swap_to(keep_from_lists(src, [RAGGED[1], RAGGED[0]]))
    with pytest.raises(KeepSetError, match="differ between layers"):
        export_pruned(src, keep, tmp_path / "out")
    resident.close()
    src.close()


def test_nonuniform_allocation_loads(tiny_checkpoint) -> None:
    from premoe.policy import select_nonuniform

    src = resolve_model(tiny_checkpoint("qwen3_moe"))
    layers = src.moe_layers
    scores = torch.zeros(len(layers), src.num_experts)
    scores[0, :2] = 1.0  # layer 0's mass on two experts, the others' spread: they get more
    g = torch.Generator().manual_seed(0)
    scores[1:] = torch.rand(len(layers) - 1, src.num_experts, generator=g) + 1
    keep = select_nonuniform(scores, layers, 4 * len(layers), routed=src.top_k)
    assert not keep.is_uniform
    model = load_pruned(src, keep, dtype=torch.float32)
    assert _counts(model, src) == {n: len(v) for n, v in keep.layers.items()}
    assert model.config.premoe_keep_counts == {str(n): len(v) for n, v in keep.layers.items()}
    src.close()
