"""Keep sets: which original experts each MoE layer keeps, validated before any heavy work.

A `KeepSets` maps every MoE layer id to a sorted tuple of original expert ids. Sorting keeps the
relative order of the kept experts, so renumbering 0..E'-1 preserves contiguous group structure.

Group-limited routers (DeepSeek-V3, GLM-4.5: `n_group`, `topk_group`) split the E experts into
`n_group` contiguous blocks. Pruning stays exact when every group keeps the same number c of
experts, c >= 2 (the group score is the sum of a group's top-2), and the `topk_group` best groups
still offer at least K experts. Otherwise the pruned model falls back to one group
(`n_group = topk_group = 1`), which changes routing; `GroupPlan` records which case applies.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from premoe.arch.spec import ArchSpec
from premoe.errors import KeepSetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupPlan:
    n_group: int  # in the pruned model
    topk_group: int
    exact: bool  # False: group structure could not be kept, fell back to one group
    reason: str = ""


@dataclass(frozen=True)
class KeepSets:
    """Kept original expert ids per MoE layer (uniform count unless `allow_ragged`)."""

    layers: dict[int, tuple[int, ...]]

    @classmethod
    def from_mapping(cls, keep: Mapping[int, Sequence[int]]) -> KeepSets:
        return cls({int(k): tuple(sorted(int(e) for e in v)) for k, v in keep.items()})

    @classmethod
    def uniform(cls, layers: Sequence[int], experts: Sequence[int]) -> KeepSets:
        return cls.from_mapping({layer: experts for layer in layers})

    @property
    def count(self) -> int:
        """The kept count per layer (the largest, for ragged keep sets)."""
        return max(len(v) for v in self.layers.values())

    @property
    def is_uniform(self) -> bool:
        return len({len(v) for v in self.layers.values()}) == 1

    def to_json(self) -> dict[str, list[int]]:
        return {str(k): list(v) for k, v in sorted(self.layers.items())}

    @classmethod
    def from_json(cls, data: Mapping[str, Sequence[int]]) -> KeepSets:
        return cls.from_mapping({int(k): v for k, v in data.items()})

    def validate(
        self,
        arch: ArchSpec,
        config: Any,
        *,
        top_k: int | None = None,
        allow_ragged: bool = False,
    ) -> GroupPlan:
        """Check the keep sets against the model; return how group routing will be handled.

        `top_k` is the routed count of the pruned model (default: the model's own).
        """
        num_experts = arch.num_experts(config)
        model_k = arch.top_k(config)
        k = model_k if top_k is None else top_k
        moe_layers = arch.moe_layer_ids(config)
        mtp = set(arch.mtp_layer_ids(config))  # MTP layers may be pruned too, to the same K
        missing = sorted(set(moe_layers) - set(self.layers))
        extra = sorted(set(self.layers) - set(moe_layers) - mtp)
        if missing or extra:
            raise KeepSetError(
                f"keep sets must cover exactly the MoE layers {moe_layers}; "
                f"missing {missing}, not MoE {extra}"
            )
        if k < 1 or k > model_k:
            raise KeepSetError(f"top-k must be between 1 and the model's {model_k}, got {k}")
        for layer, ids in sorted(self.layers.items()):
            if len(set(ids)) != len(ids):
                raise KeepSetError(f"layer {layer}: duplicate expert ids in {list(ids)}")
            bad = [e for e in ids if not 0 <= e < num_experts]
            if bad:
                raise KeepSetError(
                    f"layer {layer}: expert ids {bad} out of range; the model has "
                    f"{num_experts} experts (ids 0..{num_experts - 1})"
                )
            if len(ids) < k:
                raise KeepSetError(
                    f"layer {layer} keeps {len(ids)} experts but {k} are routed per token; "
                    f"keep at least {k} (or lower the routed count with --top-k)"
                )
        if not allow_ragged and not self.is_uniform:
            counts = sorted({len(v) for v in self.layers.values()})
            raise KeepSetError(
                f"keep counts differ between layers ({counts}); standard model code needs the "
                "same expert count in every layer"
            )
        return self._group_plan(arch, config, num_experts, k)

    def _group_plan(self, arch: ArchSpec, config: Any, num_experts: int, k: int) -> GroupPlan:
        n_group, topk_group = arch.groups(config)
        if n_group <= 1:
            return GroupPlan(1, 1, True)
        size = num_experts // n_group
        reason = ""
        for layer, ids in sorted(self.layers.items()):
            per_group = [sum(1 for e in ids if e // size == g) for g in range(n_group)]
            c = per_group[0]
            if any(p != c for p in per_group):
                reason = f"layer {layer} keeps {per_group} experts per group (unequal)"
            elif c < 2:
                reason = f"layer {layer} keeps {c} expert per group (the group score needs 2)"
            elif topk_group * c < k:
                reason = f"{topk_group} groups of {c} kept experts cannot supply top-{k}"
            if reason:
                break
        if not reason:
            return GroupPlan(n_group, topk_group, True)
        log.warning(
            "group-limited routing cannot be kept exactly (%s); the pruned model uses one group "
            "(n_group=topk_group=1), which changes routing. Keep the same number of experts, "
            "at least 2, in each of the %d groups to stay exact.",
            reason,
            n_group,
        )
        return GroupPlan(1, 1, False, reason)
