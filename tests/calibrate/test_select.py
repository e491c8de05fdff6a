"""Recon selection: the chosen set reconstructs the block at least as well as the top-weight set,
super experts are kept, and the pruned model computes what the search assumed."""

from __future__ import annotations

import torch

from premoe.calibrate.select import (
    _errors,
    block_output,
    greedy_keep,
    recon_select,
    super_experts,
)
from premoe.profile.metrics import RoutingRule


def test_greedy_beats_top_weight_and_batch_errors_match() -> None:
    g = torch.Generator().manual_seed(0)
    rule = RoutingRule("softmax", "scores", 16, 2, True)
    logits, f = torch.randn(300, 16, generator=g), torch.randn(300, 16, 8, generator=g)
    ids, rel, base = greedy_keep(logits, f, rule, 4)
    assert len(set(ids)) == 4 and rel <= base + 1e-9
    target = block_output(logits, f, rule, None)
    allowed = torch.zeros(16, dtype=torch.bool)
    allowed[ids] = True
    direct = float(((block_output(logits, f, rule, allowed) - target) ** 2).sum())
    assert abs(_errors(logits, f, rule, target, [ids], None)[0] - direct) <= 1e-3 * direct
    bias = torch.randn(16, generator=g)
    srule = RoutingRule("sigmoid", "scores", 16, 2, True)
    target = block_output(logits, f, srule, None, bias)
    direct = float(((block_output(logits, f, srule, allowed, bias) - target) ** 2).sum())
    assert abs(_errors(logits, f, srule, target, [ids], bias)[0] - direct) <= 1e-3 * direct


def test_super_experts_are_found_and_kept() -> None:
    g = torch.Generator().manual_seed(1)
    rule = RoutingRule("softmax", "scores", 16, 2, True)
    logits, f = torch.randn(200, 16, generator=g), torch.randn(200, 16, 8, generator=g)
    f[7, 5] *= 1000.0  # expert 5 explodes on one token
    assert super_experts(f, 10.0) == [5]
    ids, _, _ = greedy_keep(logits, f, rule, 4, forced=[5])
    assert 5 in ids


def test_recon_select_on_a_tiny_model(tiny_dir) -> None:
    from transformers import AutoModelForCausalLM

    from premoe.calibrate.recalibrate import batches
    from premoe.source import resolve_model
    from tests.calibrate.test_recalibrate import _corpus

    folder = tiny_dir("qwen3_moe")
    src = resolve_model(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sel = recon_select(model, src.arch, src.moe_layers, batches(_corpus(8), 4, 0), 4)
    assert sel.keep.count == 4 and set(sel.keep.layers) == set(src.moe_layers)
    for layer in src.moe_layers:
        info = sel.provenance["layers"][str(layer)]
        assert info["relative_error"] <= info["relative_error_top_weight"] + 1e-9
    sel.keep.validate(src.arch, src.config)
    src.close()
