"""Keep sets for multi-token-prediction (MTP) layers, and dropping them.

vLLM and SGLang build an MTP layer (DeepSeek-V3 / GLM-4.5 decoder layer N, Qwen3-Next
`mtp.layers.i`) from the same expert count as every other MoE layer, so an export prunes it to
the same K, with its own router rows and correction bias sliced.

Which experts: a store that profiled the MTP layer decides like for any layer. Otherwise the
documented rule here applies: keep the experts whose router rows have the largest L2 norm (the
router's data-free prior: the experts it can prefer most strongly), the same number in every
routing group so group-limited routing stays exact. The MTP layer only drafts tokens for
speculative decoding, which the main model verifies, so this choice can change the acceptance
rate, never the outputs. `drop_mtp` instead removes the layer and sets its count to 0.

Shape legend: E experts, H hidden size.
"""

from __future__ import annotations

import logging

import torch

from premoe.arch.keys import KeyMap
from premoe.io.reader import CheckpointReader

log = logging.getLogger(__name__)

MTP_RULE = "router-row-norm"


def mtp_keep(
    keymap: KeyMap, reader: CheckpointReader, count: int, n_group: int = 1
) -> dict[int, tuple[int, ...]]:
    """Keep sets of `count` experts for every MTP layer of the checkpoint (the rule above)."""
    out: dict[int, tuple[int, ...]] = {}
    for layer in keymap.mtp_layers:
        w = reader.get(keymap.router_key(layer)).float()  # [E, H]
        norms = w.norm(dim=-1)  # [E]
        e = norms.shape[0]
        groups = n_group if n_group > 1 and e % n_group == 0 and count % n_group == 0 else 1
        size, per = e // groups, count // groups
        kept: list[int] = []
        for g in range(groups):
            top = torch.topk(norms[g * size : (g + 1) * size], per).indices + g * size
            kept += top.tolist()
        out[layer] = tuple(sorted(kept))
        log.info(
            "MTP layer %d was not profiled: keeping %d experts by router-row norm (drafts only; "
            "outputs are verified by the main model)",
            layer,
            count,
        )
    return out


def in_layers(key: str, keymap: KeyMap, layers: list[int]) -> bool:
    """Whether checkpoint `key` belongs to one of `layers` (by their key prefixes)."""
    return key.startswith(tuple(keymap.layer_prefix(layer) + "." for layer in layers))
