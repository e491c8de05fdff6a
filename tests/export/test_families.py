"""Invariant 2 for every registered family and on-disk layout: the exported checkpoint loads with
plain transformers and equals both the masked full model and the in-process pruned model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from premoe.export import export_pruned
from premoe.plan import SizeModel
from premoe.prune import KeepSets, masked_routing
from premoe.source import resolve_model
from tests.export.helpers import sliced_model, token_ids
from tests.tiny import LAYOUTS

# 4 of 8 experts, different per layer, non-contiguous; 2 per group of 4 (exact for n_group=2)
KEEP = [[1, 2, 5, 6], [0, 3, 4, 7]]


@pytest.mark.parametrize(("family", "layout"), LAYOUTS)
def test_export_loads_and_equals_masked_and_in_process(
    family, layout, tiny_checkpoint, tmp_path
) -> None:
    folder = tiny_checkpoint(family, layout)
    src = resolve_model(folder)
    keep = KeepSets.from_mapping({n: KEEP[i % 2] for i, n in enumerate(src.moe_layers)})
    out = tmp_path / "pruned"
    result = export_pruned(src, keep, out, provenance={"tasks": ["t"]})
    sizes = SizeModel.from_source(src)

    # only kept bytes read; size as planned
    assert result.bytes_read == result.tensor_bytes == sizes.resident(4)
    assert result.file_bytes == pytest.approx(sizes.file_bytes(4), rel=0.01)
    assert result.group_plan.exact

    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert src.arch.num_experts(pruned.config) == 4
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    in_process = sliced_model(full, src.arch, keep)
    ids = token_ids(full.config)
    with torch.no_grad():
        with masked_routing(full, src.arch, keep):
            reference = full(ids, use_cache=False).logits
        unmasked = full(ids, use_cache=False).logits
        exported = pruned(ids, use_cache=False).logits
        sliced = in_process(ids, use_cache=False).logits
    assert (exported - reference).abs().max().item() <= 1e-5
    assert (exported - sliced).abs().max().item() <= 1e-5
    assert (unmasked - reference).abs().max().item() > 1e-4  # the keep set matters

    prov = json.loads((out / "premoe.json").read_text())
    assert prov["keep"] == keep.to_json()
    assert prov["source"]["fingerprint"]["family"] == src.arch.name
    assert prov["num_experts"] == {"source": 8, "pruned": 4}
    assert prov["tasks"] == ["t"] and prov["premoe_version"]
    src.close()
