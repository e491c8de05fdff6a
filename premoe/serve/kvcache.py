"""A per-slot KV cache for continuous batching: one fixed row (slot) per running request.

Shape legend: N slots, Hk KV heads, L the context window (`max_len`), D head dim, B rows of one
forward, S tokens per row of that forward.

Every attention layer holds `keys`/`values` of shape `[N, Hk, L + 1, D]`, allocated once. A
request owns one slot from admission to its end; its tokens sit at columns 0, 1, 2, ... of the
slot, so rows never need left padding and a request can join or leave between any two steps.
Column L is scratch: padding tokens (short rows of a batched prefill, idle slots of a decode step)
are written there and never read.

Before each forward the caller `plan`s it: which slots the B rows are (`None`: slots 0..B-1,
whose cache is then a view, no copy), the column each of the B x S new tokens is written to, and
how many columns the attention reads (`kv_len`). The attention mask (4-D, additive) is built by
the caller; transformers returns a 4-D mask unchanged, so the same code runs on every full-
attention family. Models with sliding-window or linear-attention layers are not supported here
(`supports` says so; the engine then uses the batch decoder).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache


def supports(config: Any) -> str | None:
    """None when every layer is full attention with a plain KV cache, else why not."""
    types = getattr(config, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return f"layer types {sorted(set(types))}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(config, "num_key_value_heads", None) is None and not hasattr(
        config, "num_attention_heads"
    ):
        return "no attention heads in the config"
    return None


def _dims(config: Any) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of `config`."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers), kv, head_dim


def bytes_per_slot(config: Any, max_len: int, dtype: torch.dtype) -> int:
    layers, kv, head_dim = _dims(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * kv * (max_len + 1) * head_dim * itemsize


class SlotKVCache(Cache):
    """The cache described in the module docstring (a transformers `Cache`)."""

    is_compileable = False

    def __init__(
        self, config: Any, slots: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__(layers=[])
        layers, kv, head_dim = _dims(config)
        shape = (slots, kv, max_len + 1, head_dim)  # [N, Hk, L + 1, D]
        # one tensor per role, indexed by layer: a compiled layer indexes it with its (symbolic)
        # layer index, so every layer shares one compiled graph (graphs.py)
        self.all_keys = torch.zeros((layers, *shape), dtype=dtype, device=device)  # [Ly, N, ...]
        self.all_values = torch.zeros((layers, *shape), dtype=dtype, device=device)
        self.slots = slots
        self.max_len = max_len
        self.scratch = max_len
        self._rows: torch.Tensor | None = None  # [B, S] slot of every new token
        self._cols: torch.Tensor | None = None  # [B, S] column of every new token
        self._gather: torch.Tensor | None = None  # [B] slots to read (None: 0..B-1)
        self._kv_len = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.all_keys, self.all_values))

    def plan(self, slots: torch.Tensor | None, cols: torch.Tensor, kv_len: int) -> None:
        """The next forward: rows are `slots` ([B], None: 0..B-1), new token (b, s) goes to
        column `cols[b, s]`, attention reads columns [0, kv_len)."""
        b, s = cols.shape
        if slots is None:
            rows = torch.arange(b, device=cols.device)
        else:
            rows = slots
        self._rows = rows[:, None].expand(b, s)  # [B, S]
        self._cols = cols
        self._gather = slots
        self._kv_len = kv_len

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kw: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._rows is not None and self._cols is not None, "plan() the forward first"
        # one index_put into the whole tensor (the layer as an index tensor): written through a
        # view (`all_keys[layer_idx]`), a compiled step would copy the layer's whole cache
        layer = torch.full_like(self._rows, layer_idx)  # [B, S]
        k, v = self.all_keys, self.all_values  # [Ly, N, Hk, L + 1, D]
        k[layer, self._rows, :, self._cols] = key_states.transpose(1, 2).to(k.dtype)  # [B,S,Hk,D]
        v[layer, self._rows, :, self._cols] = value_states.transpose(1, 2).to(v.dtype)
        k, v = k[layer_idx], v[layer_idx]  # [N, Hk, L + 1, D]
        n = self._kv_len
        if self._gather is None:
            b = self._rows.shape[0]
            return k[:b, :, :n], v[:b, :, :n]  # [B, Hk, kv_len, D], views
        return k[self._gather, :, :n], v[self._gather, :, :n]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._kv_len, 0
