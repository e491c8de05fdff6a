"""The simplest end-to-end path: route a prompt, load its pattern's experts, generate.

`generate(model, store, prompt)`:

1. checks that the store was made for `model` (fingerprint), and the prompt;
2. computes the prompt's routing key on the expert-free prefix of the model (`load_prefix`:
   embeddings and layers up to the first MoE layer's router, experts on the meta device) and
   routes it (`premoe.route.route`: best stored task, or the fallback pattern);
3. picks the keep set from the routed task's scores (`premoe.policy.select_experts`: a fixed
   count, a byte budget or a score coverage);
4. loads the pruned model from the original checkpoint (`load_pruned`) and generates.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import premoe
from premoe.errors import UsageError
from premoe.load.loader import (
    Progress,
    as_source,
    load_prefix,
    load_pruned_with_info,
    size_model,
)
from premoe.runtime import resolve_device, resolve_dtype, synchronize
from premoe.source import ModelSource, load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_COVERAGE = 0.9
"""Score coverage used when neither a kept count nor a budget is given."""


@dataclass
class GenerateResult:
    """What `generate` did. `to_json()` is the `premoe generate --json` contract."""

    prompt: str
    text: str  # the generated continuation (without the prompt)
    task: str  # the pattern used
    similarity: float
    fallback: bool
    routed: bool  # False when the task was given (no routing)
    candidates: list[dict[str, Any]]
    metric: str
    keep_count: int
    top_k: int
    resident_bytes: int
    full_bytes: int
    bytes_read: int
    prefix_seconds: float  # building the expert-free prefix that computes the key
    route_seconds: float  # key + search
    load_seconds: float
    generate_seconds: float
    new_tokens: int
    device: str
    dtype: str
    selection: dict[str, Any] = field(default_factory=dict)
    model_fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "text": self.text,
            "pattern": {
                "task": self.task,
                "similarity": None if math.isnan(self.similarity) else self.similarity,
                "fallback": self.fallback,
                "routed": self.routed,
                "candidates": self.candidates,
            },
            "keep": self.keep_count,
            "top_k": self.top_k,
            "metric": self.metric,
            "resident_bytes": self.resident_bytes,
            "full_bytes": self.full_bytes,
            "bytes_read": self.bytes_read,
            "timing": {
                "prefix_seconds": self.prefix_seconds,
                "route_seconds": self.route_seconds,
                "load_seconds": self.load_seconds,
                "generate_seconds": self.generate_seconds,
                "new_tokens": self.new_tokens,
                "tokens_per_second": self.tokens_per_second,
            },
            "device": self.device,
            "dtype": self.dtype,
            "selection": self.selection,
            "model": self.model_fingerprint,
            "premoe_version": premoe.__version__,
        }


def fit_context(prompt_len: int, max_new_tokens: int, config: Any) -> int:
    """`max_new_tokens`, lowered to what fits the model's context after the prompt (with a
    warning); a prompt that leaves no room is a `UsageError` (as the server's 400)."""
    window = getattr(config, "max_position_embeddings", None)
    if not isinstance(window, int) or window <= 0:
        return max_new_tokens
    room = window - prompt_len
    if room < 1:
        raise UsageError(
            f"this model's maximum context length is {window} tokens; the prompt has "
            f"{prompt_len} tokens: shorten it"
        )
    if max_new_tokens > room:
        log.warning(
            "the prompt has %d tokens of the model's %d: generating at most %d new tokens",
            prompt_len,
            window,
            room,
        )
        return room
    return max_new_tokens


def generate(
    model: str | Path | ModelSource,
    store: Any,
    prompt: str,
    *,
    keep: int | None = None,
    budget: int | str | None = None,
    coverage: float | None = None,
    task: str | None = None,
    metric: str | None = None,
    threshold: float | None = None,
    fallback: str | None = None,
    max_new_tokens: int = 64,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    do_sample: bool = False,
    progress: Progress | None = None,
) -> GenerateResult:
    """Route `prompt` to a stored pattern of `store` (a path or `PatternStore`), load `model`
    with that pattern's experts only, and generate up to `max_new_tokens` tokens (greedy).

    The kept count is `keep`, or the largest that fits `budget` bytes, or the smallest whose
    kept scores cover `coverage` of every layer (default 0.9). `task` skips routing and uses
    that stored task (or `__global__`, all tasks pooled). `threshold`/`fallback` are those of
    `premoe.route.route`.
    """
    from premoe.fingerprint import fingerprint_source
    from premoe.patterns.store import GLOBAL
    from premoe.plan import check_store_layers, open_store, store_scores
    from premoe.policy import select_experts
    from premoe.route import QueryKeyer, route
    from premoe.route.keys import encode_prompt
    from premoe.route.retrieve import check_fallback

    if sum(x is not None for x in (keep, budget, coverage)) > 1:
        raise UsageError("give at most one of --keep, --budget and --coverage")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError("the prompt is empty; give some text to generate from")
    src, owned = as_source(model)
    try:
        fingerprint = fingerprint_source(src)
        st = open_store(store, fingerprint)
        check_store_layers(st, src)
        metric = metric or st.default_metric
        fallback = GLOBAL if fallback is None else fallback
        check_fallback(st, fallback)
        # unknown task or metric: a clear error, before any weight is read
        store_scores(st, [task] if task is not None and task != GLOBAL else [], metric)
        tokenizer = load_tokenizer(src.path)
        ids = encode_prompt(tokenizer, prompt)  # no tokens: a clear error before any weight
        max_new_tokens = fit_context(len(ids), max_new_tokens, src.config)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, src)

        # 1. route on the expert-free prefix
        prefix_s = route_s = 0.0
        if task is None:
            t0 = time.perf_counter()
            key_layer = int(st.key.get("layer", src.moe_layers[0]))
            prefix = load_prefix(src, layer=key_layer, device=dev, dtype=dt)
            keyer = QueryKeyer.for_store(st, prefix, tokenizer, check=False)
            synchronize(dev)
            prefix_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            found = route(st, keyer, prompt, threshold=threshold, fallback=fallback)
            route_s = time.perf_counter() - t0
            del keyer, prefix
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            chosen, similarity, is_fallback = found.task, found.similarity, found.fallback
            candidates = [{"task": c.task, "similarity": c.similarity} for c in found.candidates]
        else:
            chosen, similarity, is_fallback, candidates = task, float("nan"), False, []

        # 2. the keep set from the task's scores
        scores = st.pooled_scores(metric) if chosen == GLOBAL else st.scores(chosen, metric)
        sizes = size_model(src, dt)
        selection = select_experts(
            scores,
            src.moe_layers,
            num_experts=src.num_experts,
            routed=src.top_k,
            keep=keep,
            budget=budget,
            coverage=DEFAULT_COVERAGE
            if keep is None and budget is None and coverage is None
            else coverage,
            bytes_for=sizes.resident,
            groups=src.arch.groups(src.config),
        )

        # 3. load the pruned model
        t0 = time.perf_counter()
        net, info = load_pruned_with_info(
            src, selection.keep, device=dev, dtype=dt, progress=progress
        )
        synchronize(dev)
        load_s = time.perf_counter() - t0

        # 4. generate
        input_ids = torch.tensor([ids], device=dev)
        pad = tokenizer.pad_token_id
        pad = tokenizer.eos_token_id if pad is None else pad
        with torch.inference_mode():
            synchronize(dev)
            t0 = time.perf_counter()
            out = net.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=pad,
            )
            synchronize(dev)
            gen_s = time.perf_counter() - t0
        new = out[0, input_ids.shape[1] :]
        text = tokenizer.decode(new.tolist(), skip_special_tokens=True)
        full = sizes.resident(src.num_experts)
        result = GenerateResult(
            prompt=prompt,
            text=text,
            task=chosen,
            similarity=float(similarity),
            fallback=is_fallback,
            routed=task is None,
            candidates=candidates,
            metric=metric,
            keep_count=selection.keep.count,
            top_k=src.arch.top_k(net.config),
            resident_bytes=info.param_bytes,
            full_bytes=full,
            bytes_read=info.bytes_read,
            prefix_seconds=prefix_s,
            route_seconds=route_s,
            load_seconds=load_s,
            generate_seconds=gen_s,
            new_tokens=int(new.numel()),
            device=str(dev),
            dtype=info.dtype,
            selection=selection.provenance,
            model_fingerprint=fingerprint,
        )
        del net
        return result
    finally:
        if owned:
            src.close()
