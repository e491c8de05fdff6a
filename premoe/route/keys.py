"""Query keys, computed exactly as the store's per-sample keys were, touching no expert.

Both key kinds depend only on the first MoE layer's router: ``router_input`` on the hidden state
entering it, ``tcess`` on its output. `QueryKeyer` hooks that router and aborts the forward pass
there by raising a private exception, so the embeddings, attention and dense layers before it run
and no expert does: the key can be computed while no expert (or only some) is resident, even with
the expert weights on the meta device. The pooling functions are the profiler's own
(`premoe.profile.hooks`), so a query gives the key its text would have had as a calibration
sample.

Shape legend: B batch, S sequence length, H hidden size, E experts, D key dimension.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from premoe.arch import ArchSpec, arch_for_config
from premoe.errors import UsageError
from premoe.patterns.store import KEY_KINDS, PatternStore
from premoe.profile.hooks import correction_bias, mean_router_input, router_module, sample_tcess
from premoe.profile.metrics import RoutingRule, decode_router_output
from premoe.profile.profiler import input_device, pad_token_id

log = logging.getLogger(__name__)


def encode_prompt(tokenizer: Any, prompt: str, max_length: int | None = None) -> list[int]:
    """Token ids of a query, as the profiler tokenizes a sample; an empty prompt is an error."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError("the prompt is empty; give some text to route")
    kwargs: dict[str, Any] = {"truncation": True, "max_length": max_length} if max_length else {}
    ids = list(tokenizer(prompt, **kwargs)["input_ids"])
    if not ids:
        raise UsageError("the prompt has no tokens after tokenization")
    return ids


class _KeyReady(Exception):
    """Raised from the router hook to stop the forward pass once the key's input is captured."""


class QueryKeyer:
    """Computes routing keys of prompts for one model and key spec; reusable across queries."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        arch: ArchSpec | None = None,
        key_spec: dict[str, Any] | None = None,
        *,
        threshold: float = 0.0,
        max_length: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.arch = arch or arch_for_config(model.config)
        spec = dict(key_spec or {"kind": "router_input"})
        if spec.get("kind") not in KEY_KINDS:
            raise UsageError(f"unknown key kind {spec.get('kind')!r}; known: {KEY_KINDS}")
        layers = self.arch.moe_layer_ids(model.config)
        self.layer = int(spec.get("layer", layers[0]))
        if self.layer not in layers:
            raise UsageError(f"key layer {self.layer} is not an MoE layer of this model")
        self.kind: str = spec["kind"]
        self.spec = spec
        self.threshold = float(threshold)
        self.rule = RoutingRule.from_arch(self.arch, model.config)
        max_pos = getattr(model.config, "max_position_embeddings", None)
        self.max_length = max_length or (max_pos if isinstance(max_pos, int) else 4096)

    @classmethod
    def for_store(
        cls, store: PatternStore, model: Any, tokenizer: Any, *, check: bool = True
    ) -> QueryKeyer:
        """A keyer that makes `store`'s kind of key (after checking the model is the store's)."""
        arch = arch_for_config(model.config)
        if check:
            from premoe.fingerprint import fingerprint_model

            store.check_model(fingerprint_model(model, arch))
        return cls(
            model,
            tokenizer,
            arch,
            store.key,
            threshold=float(store.metric_options.get("threshold", 0.0)),
        )

    def encode(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.max_length)

    def key(self, prompt: str) -> np.ndarray:
        """The key [D] of one prompt (float32, not normalised: the store normalises)."""
        return self.keys([prompt])[0]

    def key_tensor(self, prompt: str) -> torch.Tensor:
        """The key [D] of one prompt as a float32 tensor left on the model's device: what
        `route` searches with, so that a model on a GPU is searched there (`PatternStore.search`)
        with no copy to the host in between."""
        return self.tensor_keys_from_ids([self.encode(prompt)])[0]

    def keys(self, prompts: Sequence[str]) -> np.ndarray:
        """Keys [B, D] of several prompts, in one right-padded batch."""
        return self.keys_from_ids([self.encode(p) for p in prompts])

    def keys_from_ids(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Keys [B, D] (float32, on the host) of already tokenized queries."""
        return self.tensor_keys_from_ids(token_ids).cpu().numpy()

    def tensor_keys_from_ids(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Keys [B, D] float32 on the model's device."""
        if not token_ids or any(len(t) == 0 for t in token_ids):
            raise UsageError("every query needs at least one token")
        pad = pad_token_id(self.tokenizer, self.model.config)
        width = max(len(t) for t in token_ids)
        ids = torch.full((len(token_ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, t in enumerate(token_ids):
            ids[row, : len(t)] = torch.tensor(list(t), dtype=torch.long)
            mask[row, : len(t)] = 1
        device = input_device(self.model)
        ids, mask = ids.to(device), mask.to(device)
        # no padding: let attention use its plain causal path (building a padding mask costs
        # more than the layers before the first router on a GPU); the pooling still uses `mask`
        padded = any(len(t) != width for t in token_ids)
        captured: dict[str, torch.Tensor] = {}
        router = router_module(self.model, self.arch, self.layer)

        def pre_hook(module: torch.nn.Module, args: Any) -> None:
            captured["key"] = mean_router_input(args[0], mask)  # [B, H]
            raise _KeyReady

        def post_hook(module: torch.nn.Module, args: Any, out: Any) -> None:
            bias = correction_bias(self.model, self.arch, self.layer)
            routing = decode_router_output(out, self.rule, bias)
            captured["key"] = sample_tcess(routing, mask, self.rule, self.threshold)  # [B, E]
            raise _KeyReady

        if self.kind == "router_input":
            handle = router.register_forward_pre_hook(pre_hook)
        else:
            handle = router.register_forward_hook(post_hook)
        try:
            with torch.inference_mode():
                self.model.model(
                    input_ids=ids, attention_mask=mask if padded else None, use_cache=False
                )
        except _KeyReady:
            pass
        finally:
            handle.remove()
        if "key" not in captured:
            raise RuntimeError(f"the router of layer {self.layer} never ran")
        return captured["key"].float()
