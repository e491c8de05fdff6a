"""Shared helpers of the loader tests: exported reference checkpoints, keep sets, logits."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from premoe.arch.keys import ExpertKey
from premoe.prune import KeepSets, iter_pruned_tensors, pruned_config
from premoe.source import ModelSource

# the families the issue names, in both on-disk layouts where they exist
FAMILY_LAYOUTS = [
    ("qwen3_moe", "original"),
    ("qwen3_moe", "fused"),
    ("mixtral", "original"),  # per-expert w1/w2/w3 under block_sparse_moe
    ("mixtral", "fused"),
    ("deepseek_v3", "original"),  # grouped routing + correction bias
    ("deepseek_v3", "fused"),
    ("gpt_oss", "original"),  # fused on disk, transposed, biases
    ("granitemoe", "original"),  # fused on disk under renamed input/output_linear
    ("granitemoe", "fused"),
]
IDS = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1))  # tiny vocab 96


def keep_from_lists(src: ModelSource, lists: list[list[int]]) -> KeepSets:
    """Per-MoE-layer keep lists, cycled over the layers."""
    return KeepSets.from_mapping({n: lists[i % len(lists)] for i, n in enumerate(src.moe_layers)})


def random_keep(src: ModelSource, rng: random.Random, count: int) -> KeepSets:
    return KeepSets.from_mapping(
        {n: rng.sample(range(src.num_experts), count) for n in src.moe_layers}
    )


def export_pruned(src: ModelSource, keep: KeepSets, out: Path) -> Path:
    """The exported checkpoint of `keep` (the invariant-2 reference), as test_exact writes it."""
    plan = keep.validate(src.arch, src.config)
    cfg = pruned_config(src.arch, src.config, keep, plan)
    out.mkdir(parents=True)
    save_file(dict(iter_pruned_tensors(src.keymap, src.reader, keep)), out / "model.safetensors")
    cfg.save_pretrained(out)
    return out


def expert_disk_bytes(src: ModelSource, layer: int, expert: int) -> int:
    """Bytes the checkpoint holds for one expert of one layer (all its tensors)."""
    total = 0
    for key in src.reader.keys():
        role = src.keymap.role(key)
        if not isinstance(role, ExpertKey) or role.layer != layer:
            continue
        if role.expert is None:
            total += src.reader.nbytes(key) // src.num_experts
        elif role.expert == expert:
            total += src.reader.nbytes(key)
    return total


def logits(model: Any, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def assert_same_weights(a: Any, b: Any) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert set(ba) == set(bb)
    for k in ba:
        assert ba[k].dtype == bb[k].dtype, k
        assert torch.equal(ba[k], bb[k]), k
