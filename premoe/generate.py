"""The simplest end-to-end path: route a prompt, load its pattern's experts, generate.

`generate(model, store, prompt)`:

1. checks that the store was made for `model` (fingerprint), and the prompt;
2. computes the prompt's routing key on the expert-free prefix of the model (`load_prefix`:
   embeddings and layers up to the first MoE layer's router, experts on the meta device) and
   routes it (`premoe.route.route`: best stored task, or the fallback pattern);
3. picks the keep set from the routed task's scores (`premoe.policy.select_experts`: a fixed
   count, a byte budget or a score coverage);
4. loads the pruned model from the original checkpoint and generates under a miss policy
   (`premoe.load.decode`): ``mask`` (the pattern only), ``reroute`` (switch patterns when the
   dropped mass says the pattern is wrong) or ``fetch`` (exact: missing experts are fetched into
   the slots, `premoe.load.fetch`). The dropped mass (`premoe.load.miss`) of the prompt and of
   the generated tokens is reported unless `measure=False`.

With calibrated routers on (the default when the store has some, `premoe.calibrate.served`), a
task with stored calibrated routers for the kept count runs with their keep set and routers, on
the first load and after every ``reroute`` swap.
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
from premoe.calibrate.served import PatternRouters, pattern_routers
from premoe.errors import UsageError
from premoe.fingerprint import fingerprint_source
from premoe.load.decode import (
    DEFAULT_REROUTE_THRESHOLD,
    DEFAULT_WINDOW,
    Decoded,
    Rerouter,
    Switch,
    check_policy,
    decode,
)
from premoe.load.fetch import FetchingModel
from premoe.load.host_cache import HostExpertCache
from premoe.load.loader import (
    ExpertQuantization,
    Progress,
    as_source,
    load_prefix,
)
from premoe.load.miss import MissMeter, shadow_meter
from premoe.load.resident import ResidentModel
from premoe.patterns.store import GLOBAL
from premoe.plan import check_store_layers, open_store, store_scores
from premoe.policy import select_experts
from premoe.prune.keepsets import KeepSets
from premoe.route import QueryKeyer, route
from premoe.route.keys import encode_prompt
from premoe.route.retrieve import check_fallback
from premoe.runtime import resolve_device, resolve_dtype, synchronize
from premoe.sizes import SizeModel
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
    miss_policy: str = "mask"
    decoded: Decoded | None = None  # dropped mass, switches
    fetch: dict[str, Any] | None = None  # FetchStats (fetch policy)
    final_task: str = ""  # the pattern at the end (differs from `task` after a reroute)
    routers: str = "source"  # the routers of the first pattern: a stored name or "source"

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0

    def miss_json(self) -> dict[str, Any]:
        """The `miss` object of `--json`: policy, dropped mass (prompt and generated tokens:
        mean and max over tokens), pattern switches, fetch costs."""
        d = self.decoded
        return {
            "policy": self.miss_policy,
            "dropped_mass": None
            if d is None or d.mass is None or d.prompt_mass is None
            else {"prompt": d.prompt_mass.to_json(), "generated": d.mass.to_json()},
            "switches": [] if d is None else [sw.to_json() for sw in d.switches],
            "final_task": self.final_task or self.task,
            "fetch": self.fetch,
        }

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
            "miss": self.miss_json(),
            "routers": self.routers,
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
    miss_policy: str = "mask",
    measure: bool = True,
    miss_window: int = DEFAULT_WINDOW,
    miss_threshold: float = DEFAULT_REROUTE_THRESHOLD,
    reroute_context: int | None = None,
    host_cache: int | str | None = None,
    quantize: ExpertQuantization | None = None,
    calibrated_routers: bool | None = None,
) -> GenerateResult:
    """Route `prompt` to a stored pattern of `store` (a path or `PatternStore`), load `model`
    with that pattern's experts only, and generate up to `max_new_tokens` tokens (greedy).

    The kept count is `keep`, or the largest that fits `budget` bytes, or the smallest whose
    kept scores cover `coverage` of every layer (default 0.9). `task` skips routing and uses
    that stored task (or `__global__`, all tasks pooled). `threshold`/`fallback` are those of
    `premoe.route.route`.

    `miss_policy`: ``mask``, ``reroute`` or ``fetch`` (`premoe.load.decode`). `measure`: report
    the dropped mass (``reroute`` always measures). `miss_window`/`miss_threshold`: the
    ``reroute`` check (mean dropped mass over that many tokens). `reroute_context`: retrieval
    on the last that many tokens of the text so far when rerouting (default: twice the window;
    0: the whole text). On the demo's topic-change prompts the recent text routes to the new
    topic where the whole text, dominated by the old one, does not. `host_cache`: a pinned host
    cache budget that ``fetch`` reads from (and fills). `calibrated_routers`: None (default)
    uses the store's calibrated routers where it has them for the pattern; False never (the
    ``fetch`` policy runs the full routers and never uses them).
    """

    if quantize is not None and miss_policy == "fetch":
        raise UsageError("--miss-policy fetch keeps experts dense; drop --quantize or the policy")
    if sum(x is not None for x in (keep, budget, coverage)) > 1:
        raise UsageError("give at most one of --keep, --budget and --coverage")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError("the prompt is empty; give some text to generate from")
    check_policy(miss_policy, miss_window, miss_threshold)
    if reroute_context is not None and reroute_context < 0:
        raise UsageError(f"--reroute-context must be >= 0, got {reroute_context}")
    context = 2 * miss_window if reroute_context is None else reroute_context
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
        cache = HostExpertCache(host_cache) if host_cache is not None else None
        reroute = miss_policy == "reroute"
        own_keyer = reroute and st.key.get("kind") == "router_input"

        # 1. route on the expert-free prefix
        prefix_s = route_s = 0.0
        keyer: QueryKeyer | None = None
        if task is None or (reroute and not own_keyer):
            t0 = time.perf_counter()
            key_layer = int(st.key.get("layer", src.moe_layers[0]))
            prefix = load_prefix(src, layer=key_layer, device=dev, dtype=dt)
            keyer = QueryKeyer.for_store(st, prefix, tokenizer, check=False)
            synchronize(dev)
            prefix_s = time.perf_counter() - t0
        if task is None:
            assert keyer is not None
            t0 = time.perf_counter()
            found = route(st, keyer, prompt, threshold=threshold, fallback=fallback)
            route_s = time.perf_counter() - t0
            chosen, similarity, is_fallback = found.task, found.similarity, found.fallback
            candidates = [{"task": c.task, "similarity": c.similarity} for c in found.candidates]
        else:
            chosen, similarity, is_fallback, candidates = task, float("nan"), False, []
        if not (reroute and not own_keyer):
            keyer = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()

        # 2. the keep set from the task's scores
        sizes = SizeModel.from_source(src).at_dtype(
            dt,
            "source" if quantize is None else quantize.scheme,
            block=quantize.block if quantize else (128, 128),
            group_size=quantize.group_size if quantize else 128,
        )

        def selection_for(name: str, count: int | None = None) -> Any:
            scores = st.pooled_scores(metric) if name == GLOBAL else st.scores(name, metric)
            given = count is not None
            return select_experts(
                scores,
                src.moe_layers,
                num_experts=src.num_experts,
                routed=src.top_k,
                keep=count if given else keep,
                budget=None if given else budget,
                coverage=None
                if given
                else (
                    DEFAULT_COVERAGE
                    if keep is None and budget is None and coverage is None
                    else coverage
                ),
                bytes_for=sizes.resident,
                groups=src.arch.groups(src.config),
            )

        def pattern_for(name: str, count: int | None = None) -> tuple[KeepSets, PatternRouters]:
            keep_sets = selection_for(name, count).keep
            if miss_policy == "fetch":
                return keep_sets, PatternRouters()
            found, routers = pattern_routers(st, {name: keep_sets}, src, enabled=calibrated_routers)
            return found[name], routers

        selection = selection_for(chosen)
        count = selection.keep.count
        first_keep, first_routers = pattern_for(chosen)

        # 3. load the pruned model (K slots per MoE layer)
        t0 = time.perf_counter()
        fetching: FetchingModel | None = None
        resident: ResidentModel | None = None
        meter: MissMeter | None = None
        if miss_policy == "fetch":
            fetching = FetchingModel(
                src, selection.keep, device=dev, dtype=dt, host_cache=cache, progress=progress
            )
            net, info = fetching.model, fetching.load_info
            meter = fetching.meter() if measure else None
        else:
            resident = ResidentModel(
                src,
                first_keep,
                device=dev,
                dtype=dt,
                host_cache=cache,
                progress=progress,
                quantize=quantize,
                routers=first_routers.tensors(chosen),
            )
            net, info = resident.model, resident.load_info
            assert info is not None
            meter = shadow_meter(net, src, first_keep.layers) if measure or reroute else None
        synchronize(dev)
        load_s = time.perf_counter() - t0

        # 4. generate under the miss policy
        rerouter: Rerouter | None = None
        state = {"task": chosen}
        if reroute:
            assert resident is not None and meter is not None
            if keyer is None:
                keyer = QueryKeyer(net, tokenizer, src.arch, st.key, cuda_graphs=False)
            rerouter = _rerouter(
                st,
                keyer,
                tokenizer,
                resident,
                meter,
                lambda name: pattern_for(name, count),
                state,
                threshold=threshold,
                fallback=fallback,
                context=context or None,
            )
        eos = tokenizer.eos_token_id
        eos_ids = [] if eos is None else [int(eos)]
        if meter is not None:
            meter.attach()
        try:
            decoded = decode(
                net,
                ids,
                max_new_tokens=max_new_tokens,
                eos_ids=eos_ids,
                meter=meter,
                rerouter=rerouter,
                window=miss_window,
                threshold=miss_threshold,
                do_sample=do_sample,
                synchronize=lambda: synchronize(dev),
                after_prompt=None if fetching is None else fetching.adapt,
            )
        finally:
            if meter is not None:
                meter.detach()
        new = decoded.tokens
        text = tokenizer.decode(new, skip_special_tokens=True)
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
            keep_count=count,
            top_k=src.top_k,
            resident_bytes=info.param_bytes if fetching is None else fetching.resident_bytes,
            full_bytes=full,
            bytes_read=info.bytes_read,
            prefix_seconds=prefix_s,
            route_seconds=route_s,
            load_seconds=load_s,
            generate_seconds=decoded.seconds,
            new_tokens=len(new),
            device=str(dev),
            dtype=info.dtype,
            selection=selection.provenance,
            model_fingerprint=fingerprint,
            miss_policy=miss_policy,
            decoded=decoded if meter is not None else None,
            fetch=None if fetching is None else fetching.stats.to_json(),
            final_task=state["task"],
            routers=first_routers.label(chosen),
        )
        if fetching is not None:
            fetching.close()
        del net, resident, fetching
        return result
    finally:
        if owned:
            src.close()


def _rerouter(
    store: Any,
    keyer: Any,
    tokenizer: Any,
    resident: ResidentModel,
    meter: MissMeter,
    keep_for: Any,
    state: dict[str, str],
    *,
    threshold: float | None,
    fallback: str,
    context: int | None,
) -> Rerouter:
    """The ``reroute`` policy's decision: retrieval on the text so far (its last `context`
    tokens); a pattern that already failed in this request is not taken again, the pooled
    `fallback` is taken instead (once); the swap is in place (`ResidentModel.swap_to`)."""
    tried = {state["task"]}

    def reroute(ids: list[int], mass: float, token: int) -> Switch | None:
        text = tokenizer.decode(ids[-context:] if context else ids, skip_special_tokens=True)
        found = route(store, keyer, text, threshold=threshold, fallback=fallback)
        target, reason = found.task, "retrieval"
        if target in tried:
            if fallback in tried:
                return None
            target, reason = fallback, "fallback"
        new_keep, routers = keep_for(target)  # (KeepSets, PatternRouters)
        resident.swap_to(new_keep, routers=routers.tensors(target))
        meter.set_resident(new_keep.layers)
        switch = Switch(token, state["task"], target, float(found.similarity), mass, reason)
        tried.add(target)
        state["task"] = target
        return switch

    return reroute
