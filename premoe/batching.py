"""Token batches shared by profiling, TAER keys, evaluation and recalibration.

Shape legend: B batch, S sequence length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch


def input_device(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


def pad_batch(
    rows: Sequence[Sequence[int]], pad_id: int, *, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, S], attention mask [B, S]) of token-id rows padded with `pad_id` to the longest,
    on the right (or, with `left`, on the left as generation wants)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, toks in enumerate(rows):
        cols = slice(width - len(toks), width) if left else slice(0, len(toks))
        ids[row, cols] = torch.tensor(toks, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def iter_batches(
    token_ids: list[list[int]], batch_size: int, pad_id: int, *, pin: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Right-padded batches, longest samples first: (ids [B, S], mask [B, S], sample indices)."""
    order = sorted(range(len(token_ids)), key=lambda i: (-len(token_ids[i]), i))
    for start in range(0, len(order), batch_size):
        sel = order[start : start + batch_size]
        ids, mask = pad_batch([token_ids[i] for i in sel], pad_id)
        if pin:
            ids, mask = ids.pin_memory(), mask.pin_memory()
        yield ids, mask, sel


def pad_token_id(tokenizer: Any, config: Any) -> int:
    for value in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(config, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            return value
    return 0
