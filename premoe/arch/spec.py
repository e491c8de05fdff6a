"""The declarative description of one MoE model family (`ArchSpec`).

Everything premoe knows about a family lives in one `ArchSpec` value in `families.py`: config
keys, which layers are MoE, how the router routes, and where every expert-indexed tensor lives in
memory and on disk. Code elsewhere reads these fields; it never matches family names.

Names are relative to a decoder layer (`model.layers.{l}.`), so `"mlp.gate.weight"` means
`model.layers.3.mlp.gate.weight` for layer 3.

Shape legend: E routed experts, H hidden size, I expert intermediate size, K top-k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Scoring = Literal["softmax", "sigmoid"]
# How the router turns logits [T, E] into a top-K choice:
#   "scores":       top-K of the scores (softmax or sigmoid of the logits, plus a correction bias
#                   when the family has one), optionally group-limited;
#   "logits_topk":  top-K of the raw logits, then softmax/sigmoid over the K chosen (gpt-oss,
#                   Granite, Llama 4);
#   "sparsemixer":  PhiMoE's sparsemixer (top-2 with a threshold mask).
Selection = Literal["scores", "logits_topk", "sparsemixer"]


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """Read a possibly dotted config key (`"ffn_config.moe_num_experts"`)."""
    obj = config
    for part in key.split("."):
        obj = obj.get(part, default) if isinstance(obj, dict) else getattr(obj, part, default)
        if obj is None:
            return default
    return obj


# ---- which decoder layers hold an MoE block: one small rule per scheme, chosen by name ----------


def _all_layers(config: Any) -> list[int]:
    return list(range(config.num_hidden_layers))


def _first_k_dense(config: Any) -> list[int]:
    k = int(config_value(config, "first_k_dense_replace", 0) or 0)
    return list(range(k, config.num_hidden_layers))


def _sparse_step(config: Any) -> list[int]:
    step = int(config_value(config, "decoder_sparse_step", 1) or 1)
    dense = set(config_value(config, "mlp_only_layers", []) or [])
    return [i for i in range(config.num_hidden_layers) if i not in dense and (i + 1) % step == 0]


def _period(config: Any) -> list[int]:
    period = int(config.expert_layer_period)
    offset = int(config.expert_layer_offset)
    return [i for i in range(config.num_hidden_layers) if i % period == offset]


def _listed(config: Any) -> list[int]:
    return sorted(int(i) for i in (config.moe_layers or []))


def _ernie(config: Any) -> list[int]:
    start = int(config.moe_layer_start_index)
    end = config.moe_layer_end_index
    end = config.num_hidden_layers - 1 if end is None or end < 0 else int(end)
    interval = int(config.moe_layer_interval or 1)
    return [i for i in range(start, end + 1) if (i + 1) % interval == 0]


MOE_LAYER_RULES: dict[str, Callable[[Any], list[int]]] = {
    "all": _all_layers,
    "first_k_dense_replace": _first_k_dense,
    "decoder_sparse_step": _sparse_step,
    "expert_layer_period": _period,
    "moe_layers": _listed,
    "ernie_start_end_interval": _ernie,
}


@dataclass(frozen=True)
class ExpertTensor:
    """One expert-indexed parameter of the MoE block.

    `memory`: its name in the fused in-memory layout (relative to the layer); it has E on dim 0,
    which is also the fused on-disk layout (`save_pretrained(save_original_format=False)`).
    `per_expert`: the per-expert on-disk suffixes whose tensors, concatenated on dim 0, give one
    expert's slice (`("w1.weight", "w3.weight")` -> gate_up); empty when the family has no
    per-expert layout. `disk`: the fused on-disk name if it differs from `memory` (Granite).
    """

    memory: str
    per_expert: tuple[str, ...] = ()
    disk: str | None = None

    @property
    def fused_disk(self) -> str:
        return self.disk or self.memory


@dataclass(frozen=True)
class RouterTensor:
    """A tensor with one entry per expert that lives with the router (weight rows, biases).

    `dim` is the expert dimension (0 for `[E, H]` weights and `[E]` biases, -1 for Ernie's
    `[1, E]` correction bias). `disk`/`per_expert_disk` give its on-disk name in the fused and
    per-expert layouts when they differ from the in-memory name.
    """

    memory: str
    dim: int = 0
    role: Literal["weight", "logit_bias", "correction_bias"] = "weight"
    disk: str | None = None
    per_expert_disk: str | None = None

    def disk_name(self, layout: Literal["fused", "per_expert"]) -> str:
        if layout == "per_expert" and self.per_expert_disk:
            return self.per_expert_disk
        return self.disk or self.memory


@dataclass(frozen=True)
class RouterSpec:
    """How the family routes (DESIGN.md: routing, model-faithful)."""

    module: str  # router module, relative to the layer ("mlp.gate")
    scoring: Scoring
    selection: Selection = "scores"
    renormalize: bool | str = False  # a bool, or the config key that decides it
    grouped: bool = False  # group-limited choice via config n_group / topk_group
    scaling_key: str | None = None  # config key of a routed scaling factor


@dataclass(frozen=True)
class MtpSpec:
    """Multi-token-prediction layers stored beside the decoder layers (DeepSeek-V3, GLM-4.5:
    decoder layer N..N+n-1; Qwen3-Next: `mtp.layers.i`). Each holds its own MoE block with the
    same relative names, router and expert count as a decoder MoE layer. Logical layer ids
    continue the decoder's: num_hidden_layers + i."""

    count_key: str  # config key holding the number of MTP layers
    prefix: str | None = None  # key prefix of MTP layers; None: they continue `layers_prefix`

    def count(self, config: Any) -> int:
        return int(config_value(config, self.count_key, 0) or 0)


@dataclass(frozen=True)
class ArchSpec:
    """Everything premoe needs to know about one MoE family."""

    name: str
    model_types: tuple[str, ...]
    num_experts_key: str  # config attribute holding E (read and rewritten)
    top_k_key: str  # config attribute holding K
    moe_layers: str  # a key of MOE_LAYER_RULES
    block: str  # MoE block module, relative to the layer ("mlp")
    router: RouterSpec
    experts: tuple[ExpertTensor, ...]
    router_tensors: tuple[RouterTensor, ...]
    per_expert_block: str | None = None  # block name in the per-expert disk layout, if any
    shared: tuple[str, ...] = ()  # shared-expert modules left untouched (relative to layer)
    layers_prefix: str = "model.layers"
    mtp: MtpSpec | None = None
    memory_transposed: bool = False  # fused expert weights held [E, K, N] (in x out) in memory
    notes: str = ""
    tested: bool = True
    example_config: dict[str, Any] = field(default_factory=dict)  # tiny config for tests

    # -- config reading --------------------------------------------------------------------------
    def num_experts(self, config: Any) -> int:
        return int(config_value(config, self.num_experts_key))

    def top_k(self, config: Any) -> int:
        return int(config_value(config, self.top_k_key))

    def moe_layer_ids(self, config: Any) -> list[int]:
        return MOE_LAYER_RULES[self.moe_layers](config)

    def mtp_layer_ids(self, config: Any) -> list[int]:
        """Logical ids of the declared MTP layers (num_hidden_layers + i); [] when none."""
        if self.mtp is None:
            return []
        n = int(config.num_hidden_layers)
        return list(range(n, n + self.mtp.count(config)))

    def renormalize(self, config: Any) -> bool:
        r = self.router.renormalize
        return bool(config_value(config, r, False)) if isinstance(r, str) else r

    def groups(self, config: Any) -> tuple[int, int]:
        """(n_group, topk_group); (1, 1) when the router is not group-limited."""
        if not self.router.grouped:
            return 1, 1
        n = int(config_value(config, "n_group", 1) or 1)
        k = int(config_value(config, "topk_group", 1) or 1)
        return n, k

    def scaling(self, config: Any) -> float:
        if self.router.scaling_key is None:
            return 1.0
        return float(config_value(config, self.router.scaling_key, 1.0) or 1.0)

    def has_per_expert_layout(self) -> bool:
        return all(t.per_expert for t in self.experts)

    @property
    def correction_bias(self) -> RouterTensor | None:
        return next((t for t in self.router_tensors if t.role == "correction_bias"), None)

    @property
    def router_weight(self) -> RouterTensor:
        return next(t for t in self.router_tensors if t.role == "weight")

    def capabilities(self) -> dict[str, Any]:
        """A JSON-able summary for `premoe archs`."""
        return {
            "family": self.name,
            "model_types": list(self.model_types),
            "num_experts_key": self.num_experts_key,
            "top_k_key": self.top_k_key,
            "moe_layers": self.moe_layers,
            "routing": {
                "scoring": self.router.scoring,
                "selection": self.router.selection,
                "renormalize": self.router.renormalize,
                "grouped": self.router.grouped,
                "correction_bias": self.correction_bias is not None,
                "logit_bias": any(t.role == "logit_bias" for t in self.router_tensors),
                "scaling": self.router.scaling_key,
            },
            "layouts": ["fused"] + (["per_expert"] if self.has_per_expert_layout() else []),
            "shared_experts": list(self.shared),
            "mtp": None if self.mtp is None else self.mtp.count_key,
            "tested": self.tested,
            "notes": self.notes,
        }
