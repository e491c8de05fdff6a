"""Tiny random MoE checkpoints for tests, one per registered family and on-disk layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from premoe.arch import ARCHS, ArchSpec, arch_for_model_type

FAMILIES = [a.name for a in ARCHS]
# (family, layout): "original" is what save_pretrained writes by default (the hub layout:
# per-expert where the family has one); "fused" is save_original_format=False (in-memory names),
# listed where it differs from the original.
LAYOUTS = [(a.name, "original") for a in ARCHS] + [
    (a.name, "fused")
    for a in ARCHS
    if a.has_per_expert_layout() or any(t.disk for t in (*a.experts, *a.router_tensors))
]


def arch_by_name(name: str) -> ArchSpec:
    return next(a for a in ARCHS if a.name == name)


def tiny_config(family: str, **overrides: Any) -> Any:
    arch = arch_by_name(family)
    return AutoConfig.for_model(arch.model_types[0], **{**arch.example_config, **overrides})


def build_tiny(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A random fp32 model of `family`, with non-trivial router biases where it has them."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    arch = arch_for_model_type(config.model_type)
    with torch.no_grad():
        for layer in arch.moe_layer_ids(config):
            mod = model.model.layers[layer]
            # default init gives routers std 0.02: near-uniform routing; sharpen it
            mod.get_parameter(arch.router_weight.memory).normal_(0, 0.5)
            for t in arch.router_tensors:
                if t.role != "weight":
                    owner, name = t.memory.rsplit(".", 1)
                    getattr(mod.get_submodule(owner), name).normal_(0, 0.3)
    return model.eval()


def save_tiny(model: Any, folder: Path, layout: str) -> Path:
    model.save_pretrained(folder, save_original_format=(layout == "original"))
    return folder
