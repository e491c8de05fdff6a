"""Query keys, computed exactly as the store's per-sample keys were, touching no expert.

Both key kinds depend only on the first MoE layer's router: ``router_input`` on the hidden state
entering it, ``tcess`` on its output. `QueryKeyer` hooks that router and aborts the forward pass
there by raising a private exception, so the embeddings, attention and dense layers before it run
and no expert does: the key can be computed while no expert (or only some) is resident, even with
the expert weights on the meta device. The pooling functions are the profiler's own
(`premoe.profile.hooks`), so a query gives the key its text would have had as a calibration
sample.

On a GPU a single query's key is replayed from a CUDA graph (`_KeyGraphs`), one per power-of-two
length bucket: eagerly, the prefix is some 70 small kernels whose launch cost on the host is most
of the key's time (H100, 15 B model, 512 tokens: 0.28 ms of GPU work, 1.6 ms in all).

Shape legend: B batch, S sequence length, H hidden size, E experts, D key dimension.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from premoe.arch import ArchSpec, arch_for_config
from premoe.arch.model import correction_bias, router_module
from premoe.arch.routing import RoutingRule, decode_router_output
from premoe.batching import input_device, pad_batch, pad_token_id
from premoe.errors import UsageError
from premoe.fingerprint import fingerprint_model
from premoe.patterns.store import KEY_KINDS, PatternStore
from premoe.profile.hooks import mean_router_input, sample_tcess

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


GRAPH_MIN_TOKENS = 16
GRAPH_MAX_TOKENS = 4096
"""Single queries of up to this many tokens use CUDA graphs (longer ones run eagerly: their
prefill dwarfs the key anyway, and a graph's activations stay reserved)."""


def graph_device(model: Any) -> torch.device | None:
    """The CUDA device holding all of `model`'s materialised parameters, else None (CPU models,
    several devices, accelerate offload: no graphs)."""
    devices = {p.device for p in model.parameters() if not p.is_meta}
    if (
        len(devices) != 1
        or getattr(model, "hf_device_map", None)
        and any(str(d) in ("cpu", "disk") for d in model.hf_device_map.values())
    ):
        return None
    device = devices.pop()
    return device if device.type == "cuda" else None


_Captured = tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]  # graph, ids+mask [2, S], key


class _KeyGraphs:
    """One query's key as CUDA graphs, one per length bucket (GRAPH_MIN_TOKENS, 2x, ...).

    The query is right-padded to its bucket and the prefix runs with plain causal attention, so
    no real token attends to the padding and the pooled key covers the real tokens only: the
    eager key's value, up to the rounding of kernels picked for another length. Weights are read
    where they are, so in-place expert swaps (router rows) are seen by the next replay. A capture
    that fails (an operation that cannot be captured) turns graphs off for this keyer, with a
    warning."""

    def __init__(self, keyer: QueryKeyer, device: torch.device) -> None:
        self.keyer = keyer
        self.device = device
        self.failed = False
        self.graphs: dict[int, _Captured] = {}

    def key(self, ids: Sequence[int]) -> torch.Tensor | None:
        """The key [1, D] of one query, or None when it must be computed eagerly."""
        n = len(ids)
        if self.failed or n > GRAPH_MAX_TOKENS:
            return None
        bucket = max(GRAPH_MIN_TOKENS, 1 << (n - 1).bit_length())
        entry = self.graphs.get(bucket) or self._capture(bucket)
        if entry is None:
            return None
        graph, buf, out = entry
        host = torch.zeros((2, bucket), dtype=torch.long)  # rows: ids, mask
        host[0].fill_(self.keyer.pad_id)
        host[0, :n] = torch.tensor(list(ids), dtype=torch.long)
        host[1, :n] = 1
        buf.copy_(host)
        graph.replay()
        return out.clone()

    def _capture(self, bucket: int) -> _Captured | None:
        buf = torch.zeros((2, bucket), dtype=torch.long, device=self.device)  # [2, S] ids, mask
        buf[0].fill_(self.keyer.pad_id)
        buf[1, 0] = 1
        ids, mask = buf[0:1], buf[1:2]  # [1, S] views
        try:
            side = torch.cuda.Stream(self.device)  # warm-up off the default stream, as required
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.keyer.run_prefix(ids, mask, padded=False)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.keyer.run_prefix(ids, mask, padded=False)  # [1, D]
        except Exception as exc:
            self.failed = True
            log.warning(
                "could not capture the query key as a CUDA graph (%s: %s); computing keys eagerly",
                type(exc).__name__,
                exc,
            )
            return None
        log.debug("captured the query key for %d tokens as a CUDA graph", bucket)
        self.graphs[bucket] = (graph, buf, out)
        return self.graphs[bucket]


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
        cuda_graphs: bool | None = None,
    ) -> None:
        """`cuda_graphs`: replay single queries' keys from CUDA graphs (None: when the model is
        on one CUDA device; see `_KeyGraphs`)."""
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer, model.config)
        device = graph_device(model) if cuda_graphs is not False else None
        if cuda_graphs and device is None:
            raise UsageError("CUDA graphs for query keys need the model on one CUDA device")
        self._graphs = _KeyGraphs(self, device) if device is not None else None
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
        if len(token_ids) == 1 and self._graphs is not None:
            key = self._graphs.key(token_ids[0])
            if key is not None:
                return key
        ids, mask = pad_batch(token_ids, self.pad_id)  # [B, S] each
        padded = any(len(t) != ids.shape[1] for t in token_ids)
        device = input_device(self.model)
        return self.run_prefix(ids.to(device), mask.to(device), padded=padded)

    def run_prefix(self, ids: torch.Tensor, mask: torch.Tensor, *, padded: bool) -> torch.Tensor:
        """Run the model up to the key's router on ids, mask [B, S] (on the model's device) and
        return the keys [B, D] float32. Without `padded`, attention takes its plain causal path
        (no padding mask is built; the pooling still uses `mask`)."""
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
