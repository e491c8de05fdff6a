"""Exact pruning core: keep sets, pruned config, pruned tensors, masked-routing reference."""

from premoe.prune.config import pruned_config
from premoe.prune.keepsets import GroupPlan, KeepSets
from premoe.prune.mask import masked_routing
from premoe.prune.tensors import iter_pruned_tensors, pruned_tensor, pruned_tensor_names

__all__ = [
    "GroupPlan",
    "KeepSets",
    "iter_pruned_tensors",
    "masked_routing",
    "pruned_config",
    "pruned_tensor",
    "pruned_tensor_names",
]
