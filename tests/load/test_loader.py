"""`load_pruned` equals the exported checkpoint and the masked full model, reading kept bytes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from premoe.arch.keys import ExpertKey, RouterKey
from premoe.errors import KeepSetError, UsageError
from premoe.load import keep_for_budget, load_pruned, load_pruned_with_info, size_model
from premoe.prune import KeepSets, masked_routing
from premoe.source import resolve_model
from tests.load.helpers import (
    FAMILY_LAYOUTS,
    assert_same_weights,
    export_pruned,
    keep_from_lists,
    logits,
)
from tests.tiny import build_tiny, save_tiny

KEEP = [[0, 3, 5, 7], [1, 2, 6, 7]]  # 2 per group of 4 in both: deepseek_v3 groups stay exact


@pytest.mark.parametrize(("family", "layout"), FAMILY_LAYOUTS)
def test_load_equals_export_and_masked_full(family, layout, tiny_checkpoint, tmp_path) -> None:
    folder = tiny_checkpoint(family, layout)
    src = resolve_model(folder)
    keep = keep_from_lists(src, KEEP)
    model, info = load_pruned_with_info(src, keep, dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(
        export_pruned(src, keep, tmp_path / "export"), dtype=torch.float32
    ).eval()
    # invariant 2: same tensors (names, dtypes, values, buffers such as rotary inv_freq) and logits
    assert_same_weights(model, exported)
    out = logits(model)
    assert (out - logits(exported)).abs().max().item() <= 1e-6
    # invariant 1: the full model routed only to the kept experts
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with masked_routing(full, src.arch, keep, single_group=not info.plan.exact):
        reference = logits(full)
    assert (out - reference).abs().max().item() <= 1e-5
    assert (logits(full) - reference).abs().max().item() > 1e-4  # the mask matters
    # an ordinary transformers model: generate works and agrees with the export
    ids = torch.tensor([[5, 9, 17, 33]])
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, exported.generate(ids, max_new_tokens=4, do_sample=False))
    assert info.param_bytes == sum(p.numel() * 4 for p in exported.parameters())


@pytest.mark.parametrize(("family", "layout"), [("qwen3_moe", "original"), ("gpt_oss", "original")])
def test_reads_only_kept_bytes(family, layout, tiny_checkpoint) -> None:
    src = resolve_model(tiny_checkpoint(family, layout))
    keep = keep_from_lists(src, [[1, 6]])
    e = src.num_experts
    expected = 0
    for key in src.reader.keys():
        role = src.keymap.role(key)
        n = src.reader.nbytes(key)
        if role is None:
            expected += n
        elif isinstance(role, RouterKey) or (isinstance(role, ExpertKey) and role.expert is None):
            expected += n * len(keep.layers[role.layer]) // e  # kept rows of a fused tensor
        elif role.expert in keep.layers[role.layer]:
            expected += n
    total = sum(src.reader.nbytes(k) for k in src.reader.keys())
    _, info = load_pruned_with_info(src, keep, dtype=torch.float32)
    assert info.bytes_read == expected
    assert info.bytes_read < 0.6 * total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("family", "overrides"),
    [("deepseek_v3", {}), ("gpt_oss", {}), ("qwen3_moe", {"tie_word_embeddings": True})],
)
def test_dtypes_fp32_modules_and_ties_match_from_pretrained(
    family, overrides, dtype, tmp_path
) -> None:
    # deepseek_v3 keeps its router in fp32 (_keep_in_fp32_modules_strict), gpt_oss its norms in
    # fp16 runs (_keep_in_fp32_modules); qwen3 with tied embeddings must stay tied
    folder = save_tiny(build_tiny(family, **overrides), tmp_path / "m", "original")
    src = resolve_model(folder)
    keep = keep_from_lists(src, [[0, 3, 5, 7]])
    model = load_pruned(src, keep, dtype=dtype)
    exported = AutoModelForCausalLM.from_pretrained(
        export_pruned(src, keep, tmp_path / "export"), dtype=dtype
    ).eval()
    assert_same_weights(model, exported)
    assert torch.equal(logits(model), logits(exported))
    if overrides.get("tie_word_embeddings"):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    strict = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    if family == "deepseek_v3" and "gate.weight" in strict:  # transformers >= 5.2x
        assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32


def test_auto_dtype_follows_the_config(tiny_checkpoint) -> None:
    src = resolve_model(tiny_checkpoint("qwen3_moe"))
    model = load_pruned(src, keep_from_lists(src, [[0, 1, 2]]))
    assert next(model.parameters()).dtype == torch.float32  # the tiny checkpoints are fp32


def test_sizes_predict_the_loaded_model(tiny_checkpoint) -> None:
    src = resolve_model(tiny_checkpoint("mixtral"))
    sizes = size_model(src, torch.float32)
    for k in (2, 5):
        keep = keep_from_lists(src, [list(range(k))])
        _, info = load_pruned_with_info(src, keep, dtype=torch.float32)
        assert info.param_bytes == sizes.resident(k)
    budget = sizes.resident(5) + sizes.per_k_bytes // 2
    assert keep_for_budget(src, budget, torch.float32) == 5
    with pytest.raises(UsageError, match="experts routed per token"):
        keep_for_budget(src, sizes.resident(1), torch.float32)  # top-2 needs 2
    with pytest.raises(UsageError, match="without any routed expert"):
        keep_for_budget(src, 1000, torch.float32)


def test_bad_input(tiny_checkpoint) -> None:
    src = resolve_model(tiny_checkpoint("qwen3_moe"))
    layers = src.moe_layers
    with pytest.raises(KeepSetError, match="out of range"):
        load_pruned(src, KeepSets.uniform(layers, [0, 8]))
    with pytest.raises(KeepSetError, match="routed per token"):
        load_pruned(src, KeepSets.uniform(layers, [3]))
    with pytest.raises(KeepSetError, match="cover exactly the MoE layers"):
        load_pruned(src, KeepSets.uniform(layers[:1], [0, 1]))
    with pytest.raises(UsageError, match="unknown dtype"):
        load_pruned(src, KeepSets.uniform(layers, [0, 1]), dtype="int3")
    with pytest.raises(UsageError, match="unknown device"):
        load_pruned(src, KeepSets.uniform(layers, [0, 1]), device="tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            load_pruned(src, KeepSets.uniform(layers, [0, 1]), device="cuda")
