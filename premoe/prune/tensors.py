"""Pruned tensors read from a checkpoint: kept experts renumbered, router rows sliced.

Shape legend: E experts in the source, E' kept, H hidden, I expert intermediate size.
Reads only what the pruned model holds: per-expert tensors of dropped experts are never opened,
and fused `[E, ...]` tensors are read row by row (`CheckpointReader.get_rows`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from premoe.arch.keys import ExpertKey, KeyMap, RouterKey
from premoe.io.reader import CheckpointReader
from premoe.prune.keepsets import KeepSets


def pruned_tensor_names(keymap: KeyMap, reader: CheckpointReader, keep: KeepSets) -> list[str]:
    """Source keys that the pruned checkpoint reads (dropped per-expert tensors left out, and the
    MoE tensors of MTP layers that `keep` leaves out, i.e. dropped MTP layers; `validate`
    guarantees every model MoE layer is in `keep`)."""
    out = []
    for key in reader.keys():
        role = keymap.role(key)
        if role is not None and role.layer not in keep.layers:
            continue
        if isinstance(role, ExpertKey) and role.expert is not None:
            if role.expert not in keep.layers[role.layer]:
                continue
        out.append(key)
    return out


def pruned_tensor(
    keymap: KeyMap, reader: CheckpointReader, keep: KeepSets, key: str
) -> tuple[str, torch.Tensor]:
    """(output name, tensor) of source `key` in the pruned checkpoint, same layout as the source."""
    role = keymap.role(key)
    if role is None:
        return key, reader.get(key)
    kept = list(keep.layers[role.layer])
    if isinstance(role, RouterKey):
        return key, reader.get_rows(key, kept, dim=role.tensor.dim)  # [E', H] / [E'] / [1, E']
    if role.expert is None:
        return key, reader.get_rows(key, kept)  # [E', ...]
    return keymap.renumbered(role, kept.index(role.expert)), reader.get(key)


def iter_pruned_tensors(
    keymap: KeyMap, reader: CheckpointReader, keep: KeepSets
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the pruned checkpoint, shard by shard of the source."""
    wanted = set(pruned_tensor_names(keymap, reader, keep))
    for keys in reader.keys_by_shard().values():
        for key in keys:
            if key in wanted:
                yield pruned_tensor(keymap, reader, keep, key)
