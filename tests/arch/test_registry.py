from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from premoe.arch import ARCHS, arch_for_config, arch_for_model_type, supported_model_types
from premoe.arch.keys import ExpertKey, KeyMap, RouterKey
from premoe.errors import CheckpointError, UnsupportedArchitectureError
from tests.tiny import FAMILIES, LAYOUTS, arch_by_name, build_tiny, tiny_config

REQUIRED = {
    "mixtral", "minimax", "qwen2_moe", "qwen3_moe", "qwen3_next", "deepseek_v2", "deepseek_v3",
    "glm4_moe", "olmoe", "gpt_oss", "granitemoe", "phimoe", "jamba", "ernie4_5_moe",
    "hunyuan_v1_moe", "minimax_m2", "llama4_text",
}  # fmt: skip


def test_registry_covers_required_families() -> None:
    assert REQUIRED <= set(supported_model_types())
    assert len({a.name for a in ARCHS}) == len(ARCHS)


def test_unsupported_model_type_names_the_supported_ones() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="qwen3_moe") as err:
        arch_for_model_type("llama")
    assert "'llama'" in str(err.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_matches_the_real_model(family: str) -> None:
    """MoE layers, router module, expert and router tensors exist where the spec says."""
    model = build_tiny(family)
    arch = arch_for_config(model.config)
    assert arch.name == family
    moe = arch.moe_layer_ids(model.config)
    assert moe, "tiny config must have MoE layers"
    e = arch.num_experts(model.config)
    for i, layer in enumerate(model.model.layers):
        has_router = any(n == arch.router.module for n, _ in layer.named_modules())
        assert has_router == (i in moe), f"layer {i}: router present={has_router}"
        if i not in moe:
            continue
        for t in arch.experts:
            assert layer.get_parameter(t.memory).shape[0] == e
        for t in arch.router_tensors:
            owner, name = t.memory.rsplit(".", 1)
            assert getattr(layer.get_submodule(owner), name).shape[t.dim] == e
    json.dumps(arch.capabilities())


@pytest.mark.parametrize(("family", "layout"), LAYOUTS)
def test_keymap_classifies_every_moe_tensor(family: str, layout: str, tiny_checkpoint) -> None:
    folder = tiny_checkpoint(family, layout)
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    config = tiny_config(family)
    arch = arch_by_name(family)
    km = KeyMap(arch, config, keys)
    per_expert = layout == "original" and arch.has_per_expert_layout()
    assert km.layout == ("per_expert" if per_expert else "fused")
    roles = [km.role(k) for k in keys]
    experts = [r for r in roles if isinstance(r, ExpertKey)]
    routers = [r for r in roles if isinstance(r, RouterKey)]
    n_layers = len(arch.moe_layer_ids(config))
    per_layer = arch.num_experts(config) * sum(len(t.per_expert) for t in arch.experts)
    assert len(experts) == n_layers * (per_layer if per_expert else len(arch.experts))
    assert len(routers) == n_layers * len(arch.router_tensors)
    # nothing else under the MoE block is expert-indexed: shared experts stay untouched
    for key, role in zip(keys, roles, strict=True):
        if role is None:
            assert ".experts." not in key or "shared" in key, key


def test_keymap_reports_missing_expert(tiny_checkpoint) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = [k for k in f.keys() if "experts.3.up_proj" not in k]
    with pytest.raises(CheckpointError, match="experts.3.up_proj"):
        KeyMap(arch_by_name("qwen3_moe"), tiny_config("qwen3_moe"), keys)
