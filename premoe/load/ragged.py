"""Non-uniform (ragged) keep sets in process: each MoE layer sized to its own kept count.

Stock model code builds every MoE block from one config value (the expert count), so an exported
checkpoint must be uniform. In process there is no such limit: `load_pruned` builds the skeleton
with the largest count, then `resize_blocks` rebuilds, still on the meta device, the MoE block of
every layer that keeps fewer experts from a copy of the config carrying that layer's count (every
supported family's block is built from its config alone). Its experts tensor then has E'_l slots
and its router E'_l rows; the loader fills them like any other layer. `model.config` keeps the
largest count; `model.config.premoe_keep_counts` records the count of every MoE layer.

Shape legend: E'_l kept experts of layer l.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from premoe.arch.spec import ArchSpec
from premoe.errors import KeepSetError
from premoe.load.build import params_on_meta
from premoe.prune.keepsets import KeepSets

log = logging.getLogger(__name__)


def resize_blocks(model: Any, arch: ArchSpec, keep: KeepSets) -> list[int]:
    """Rebuild the MoE block of every layer of `model` (a skeleton: parameters on meta, built
    for `keep.count` experts) that keeps fewer experts. Returns the layers rebuilt."""
    if keep.is_uniform:
        return []
    if "." in arch.num_experts_key:
        raise KeepSetError(
            f"{arch.name}: non-uniform keep sets are not supported in process (nested expert "
            f"count {arch.num_experts_key}); keep the same count in every layer"
        )
    resized = []
    for layer, ids in sorted(keep.layers.items()):
        if len(ids) == keep.count:
            continue
        path = f"{arch.layers_prefix}.{layer}.{arch.block}"
        old = model.get_submodule(path)
        config = copy.deepcopy(model.config)
        setattr(config, arch.num_experts_key, len(ids))
        try:
            with params_on_meta():
                new = type(old)(config)
        except TypeError as err:
            raise KeepSetError(
                f"{arch.name}: cannot build an MoE block of {len(ids)} experts for layer {layer} "
                f"({err}); keep the same count in every layer"
            ) from None
        dtypes = {name: p.dtype for name, p in old.named_parameters()}
        with torch.no_grad():
            for name, p in list(new.named_parameters()):
                want = dtypes.get(name)
                if want is not None and p.dtype != want:
                    owner, attr = name.rpartition(".")[::2]
                    mod = new.get_submodule(owner) if owner else new
                    mod._parameters[attr] = torch.nn.Parameter(
                        p.to(want), requires_grad=p.requires_grad
                    )
            kinds = {name: b.dtype for name, b in old.named_buffers()}
            for name, b in list(new.named_buffers()):
                want = kinds.get(name)
                if want is not None and b.dtype != want:
                    owner, attr = name.rpartition(".")[::2]
                    mod = new.get_submodule(owner) if owner else new
                    mod._buffers[attr] = b.to(want)
        new.train(old.training)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, new)
        resized.append(layer)
    model.config.premoe_keep_counts = {str(k): len(v) for k, v in sorted(keep.layers.items())}
    log.info(
        "non-uniform keep sets: MoE blocks of %d layers rebuilt with fewer experts (counts %s)",
        len(resized),
        sorted({len(v) for v in keep.layers.values()}),
    )
    return resized


__all__ = ["resize_blocks"]
