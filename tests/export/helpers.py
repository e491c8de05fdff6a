"""Test helpers: an in-process pruned model made by slicing a full in-memory model."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM

from premoe.arch import ArchSpec
from premoe.prune import KeepSets, pruned_config


def sliced_model(full: Any, arch: ArchSpec, keep: KeepSets, *, top_k: int | None = None) -> Any:
    """`from_config(pruned config)` holding `full`'s weights with only the kept experts: fused
    expert params sliced on dim 0, router tensors on their expert dim (invariant 2's other side)."""
    plan = keep.validate(arch, full.config, top_k=top_k)
    config = pruned_config(arch, full.config, keep, plan, top_k=top_k)
    state = dict(full.state_dict())
    for layer, kept in keep.layers.items():
        prefix = f"model.layers.{layer}."
        idx = torch.tensor(kept, dtype=torch.long)
        for t in arch.experts:
            key = prefix + t.memory
            state[key] = state[key].index_select(0, idx)  # [E', ...]
        for r in arch.router_tensors:
            key = prefix + r.memory
            state[key] = state[key].index_select(r.dim % state[key].dim(), idx)  # [E', H] / [E']
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    return model.eval()


def token_ids(config: Any, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, (2, 9), generator=g)  # [B, S]
