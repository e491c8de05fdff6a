"""Model fingerprints: bind stores and exports to the model they were made from.

A fingerprint holds the family, layer and expert counts, a hash of the config (without fields that
change when a model is merely copied or loaded differently) and a hash of the router weights of
every MoE layer. Router weights are hashed after rounding to bf16, so the same model gives the same
hash whether it is read from disk in fp32 or bf16 or taken from a model in memory.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from premoe.arch import ArchSpec
from premoe.arch.model import moe_layer

_VOLATILE = {
    "_name_or_path",
    "transformers_version",
    "_commit_hash",
    "torch_dtype",
    "dtype",
    "_experts_implementation",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "architectures",
    "use_cache",
    "output_router_logits",
}

_IDENTITY_KEYS = ("family", "num_experts", "moe_layers", "config_hash", "router_hash")
"""Fingerprint fields that must agree for two fingerprints to be of the same model."""


def config_hash(config: Any) -> str:
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE}
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _router_hash(weights: list[torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for w in weights:
        h.update(
            w.detach().to("cpu", torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes()
        )
    return h.hexdigest()


def _fingerprint(arch: ArchSpec, config: Any, routers: list[torch.Tensor]) -> dict[str, Any]:
    return {
        "family": arch.name,
        "model_type": config.model_type,
        "num_layers": int(config.num_hidden_layers),
        "moe_layers": arch.moe_layer_ids(config),
        "num_experts": arch.num_experts(config),
        "top_k": arch.top_k(config),
        "hidden_size": int(getattr(config, "hidden_size", 0) or 0),
        "config_hash": config_hash(config),
        "router_hash": _router_hash(routers),
    }


def fingerprint_source(source: Any) -> dict[str, Any]:
    """Fingerprint of a `ModelSource` (reads only the router weights)."""
    km = source.keymap
    routers = [source.reader.get(km.router_key(layer)) for layer in source.moe_layers]
    return _fingerprint(source.arch, source.config, routers)


def fingerprint_model(model: Any, arch: ArchSpec) -> dict[str, Any]:
    """Fingerprint of an in-memory transformers model (equals that of its checkpoint)."""
    config = model.config
    routers = [
        moe_layer(model, arch, i).get_parameter(arch.router_weight.memory)
        for i in arch.moe_layer_ids(config)
    ]
    return _fingerprint(arch, config, routers)


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in _IDENTITY_KEYS)


def describe_difference(expected: dict[str, Any], actual: dict[str, Any]) -> str:
    for key in _IDENTITY_KEYS:
        if expected.get(key) != actual.get(key):
            return f"{key} {expected.get(key)!r} != {actual.get(key)!r}"
    return "identical"
