"""Where an `ArchSpec`'s modules live in a loaded transformers model: the one place that walks a
model's structure (decoder layers, MoE block, router, experts, correction bias).

Names come from the spec (`layers_prefix`, `router.module`, `experts[*].memory`, router tensors),
so code elsewhere never spells `model.model.layers` or a family's module names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from premoe.arch.spec import ArchSpec
from premoe.errors import CheckpointError


def tensor_of(module: nn.Module, name: str) -> torch.Tensor:
    """Parameter or buffer `name` (dotted, relative to `module`)."""
    owner, _, attr = name.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    t = getattr(mod, attr, None)
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"the model has no tensor {name!r}")
    return t


def decoder_stack(model: Any, arch: ArchSpec) -> nn.Module:
    """The module holding the decoder layers, embeddings and final norm (`model.model`)."""
    return model.get_submodule(arch.layers_prefix.rpartition(".")[0])


def decoder_layers(model: Any, arch: ArchSpec) -> nn.ModuleList:
    """The model's decoder layers (`arch.layers_prefix`)."""
    return model.get_submodule(arch.layers_prefix)


def moe_layer(model: Any, arch: ArchSpec, layer: int) -> nn.Module:
    """Decoder layer `layer` (an MoE layer of the model)."""
    return model.get_submodule(f"{arch.layers_prefix}.{layer}")


def router_module(model: Any, arch: ArchSpec, layer: int) -> nn.Module:
    return moe_layer(model, arch, layer).get_submodule(arch.router.module)


def experts_module(model: Any, arch: ArchSpec, layer: int) -> nn.Module:
    return moe_layer(model, arch, layer).get_submodule(arch.experts[0].memory.rsplit(".", 1)[0])


def correction_bias(model: Any, arch: ArchSpec, layer: int) -> torch.Tensor | None:
    """Layer `layer`'s correction bias [E] (or [1, E]) when the family has one."""
    spec = arch.correction_bias
    if spec is None:
        return None
    return tensor_of(moe_layer(model, arch, layer), spec.memory)


def layer_of(key: str, prefix: str) -> int | None:
    """The decoder-layer index of checkpoint key `key` (`{prefix}.{i}.*`), or None."""
    if not key.startswith(prefix + "."):
        return None
    head = key[len(prefix) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None
